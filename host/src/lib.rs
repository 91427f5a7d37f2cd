//! lbwasm: a load balancer whose balancing algorithms are sandboxed WebAssembly components.
//!
//! This crate is the `lbwasm` program: its command line ([`cli`]) and the wiring of the
//! crates that do the work (see `docs/architecture.md`). It re-exports them under the
//! names programs running lbwasm in-process (the tests, benchmarks) use.

pub mod cli;

pub use lbwasm_admin as admin;
pub use lbwasm_plugin_host as plugin;
pub use lbwasm_proxy::{config, serve};
pub use lbwasm_sim::{backend, simulate};

/// Hands the built-in plugins' bytes (`lbwasm-builtins`) to the plugin host: the binary's
/// first step, and that of any program running the proxy in-process (the tests). They live
/// in their own crate so that editing a plugin never rebuilds the proxy.
pub fn install_builtins() {
    plugin::builtin::install(lbwasm_builtins::ALL);
}
