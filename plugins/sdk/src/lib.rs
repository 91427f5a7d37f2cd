//! `lbwasm-plugin`: everything a balancing plugin needs besides its algorithm.
//!
//! A plugin is a type implementing [`Plugin`] plus one line, `lbwasm_plugin::export_plugin!(T);`.
//! The SDK owns the WIT boundary: it keeps the pool pushed by the host as a [`Pool`] of plain
//! Rust [`Server`]s, reads live load and request details through the [`Host`] trait, and
//! carries the helpers every algorithm would otherwise copy (eligibility, weights, hashing,
//! option parsing, table membership, hash rings, load forecasts). Because algorithms only see these types, they run natively in unit tests
//! against [`testing::MockHost`]; the WIT bindings exist only on `wasm32`.

pub mod forecast;
pub mod hash;
pub mod host;
pub mod key;
pub mod members;
pub mod options;
pub mod pool;
pub mod ring;
pub mod select;
pub mod testing;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod rt;

pub use host::{Host, Protocol, ServerLoad};
pub use key::KeySource;
pub use options::Options;
pub use pool::{Pool, Server};

/// A balancing algorithm.
///
/// The host calls, per instance (one instance per proxy worker thread): [`Plugin::configure`]
/// once, [`Plugin::set_servers`] whenever the pool changes, and [`Plugin::choose`] per request.
pub trait Plugin: Sized + 'static {
    /// One line for `lbwasm plugins`.
    const DESCRIPTION: &'static str;

    /// Builds the plugin from its options. Read every option through `options`; the SDK
    /// refuses any option the plugin did not read, naming it.
    fn configure(options: &mut Options) -> Result<Self, String>;

    /// The pool changed (membership, health, weights or a new load report). Rebuild derived
    /// tables here, not in `choose`.
    fn set_servers(&mut self, pool: &Pool) {
        let _ = pool;
    }

    /// Index into `pool.servers` of the backend for this request; `None` only when no
    /// eligible server exists.
    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32>;
}

/// Exports a [`Plugin`] type as the component's `balancer` world.
///
/// ```ignore
/// struct MyAlgo;
/// impl lbwasm_plugin::Plugin for MyAlgo { /* ... */ }
/// lbwasm_plugin::export_plugin!(MyAlgo);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::rt::reexport::*;
            ::std::thread_local! {
                static STATE: ::core::cell::RefCell<$crate::rt::State<$ty>> =
                    ::core::cell::RefCell::new($crate::rt::State::new());
            }
            struct Export;
            impl Guest for Export {
                fn describe() -> String {
                    <$ty as $crate::Plugin>::DESCRIPTION.to_string()
                }
                fn configure(options: Vec<(String, String)>) -> Result<(), String> {
                    STATE.with(|s| s.borrow_mut().configure(options))
                }
                fn set_servers(servers: Vec<WitServer>) {
                    STATE.with(|s| s.borrow_mut().set_servers(servers))
                }
                fn choose(sequence: u64) -> Option<u32> {
                    STATE.with(|s| s.borrow_mut().choose(sequence, None))
                }
                fn choose_loaded(
                    sequence: u64,
                    in_flight: (u64, u64, u64, u64, u64, u64, u64, u64),
                ) -> Option<u32> {
                    STATE.with(|s| s.borrow_mut().choose(sequence, Some(in_flight)))
                }
            }
            $crate::rt::bindings::__export_lbwasm_balancer!(Export with_types_in $crate::rt::bindings);
        };
    };
}
