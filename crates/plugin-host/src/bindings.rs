//! Host bindings generated from `wit/balancer.wit`, and nothing else.

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "balancer",
    // An out-of-range index from the guest is its bug: trap it rather than invent figures.
    imports: { "lbwasm:balancer/load.figures": trappable },
});

pub use self::lbwasm::balancer::types::{
    Protocol as WitProtocol, Server as WitServer, ServerLoad as WitServerLoad,
};
