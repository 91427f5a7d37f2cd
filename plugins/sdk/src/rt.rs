//! The wasm side of the boundary: WIT bindings and the glue the `export_plugin!` macro uses.

#[doc(hidden)]
// Generated: `choose-loaded`'s export takes the sequence and eight packed in-flight words.
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "balancer",
        pub_export_macro: true,
        export_macro_name: "__export_lbwasm_balancer",
        default_bindings_module: "lbwasm_plugin::rt::bindings",
    });
}

/// Names the export macro needs, in one place.
pub mod reexport {
    pub use super::bindings::Guest;
    pub use super::bindings::lbwasm::balancer::types::Server as WitServer;
}

use std::borrow::Cow;

use crate::host::{Host, Protocol, ServerLoad};
use crate::{Options, Plugin, Pool, Server};
use bindings::lbwasm::balancer::{load, request, shared, types};

/// Per-instance plugin state behind the exports.
pub struct State<P> {
    plugin: Option<P>,
    pool: Pool,
}

impl<P: Plugin> State<P> {
    pub const fn new() -> Self {
        State {
            plugin: None,
            pool: Pool::empty(),
        }
    }

    pub fn configure(&mut self, options: Vec<(String, String)>) -> Result<(), String> {
        let mut opts = Options::new(options);
        let plugin = P::configure(&mut opts)?;
        opts.finish()?;
        self.plugin = Some(plugin);
        if let Some(p) = self.plugin.as_mut() {
            p.set_servers(&self.pool);
        }
        Ok(())
    }

    pub fn set_servers(&mut self, servers: Vec<types::Server>) {
        self.pool = Pool::new(servers.into_iter().map(from_wit).collect());
        if let Some(p) = self.plugin.as_mut() {
            p.set_servers(&self.pool);
        }
    }

    /// `packed`: the in-flight counts `choose-loaded` brings (pools of up to 16 servers).
    pub fn choose(&mut self, sequence: u64, packed: Option<Packed>) -> Option<u32> {
        if self.plugin.is_none() {
            // The host always configures first; be safe if a custom host does not.
            self.configure(Vec::new()).ok()?;
        }
        let plugin = self.plugin.as_mut()?;
        let in_flight = packed.map(|p| {
            let mut out = [0u32; 16];
            for (k, v) in [p.0, p.1, p.2, p.3, p.4, p.5, p.6, p.7]
                .into_iter()
                .enumerate()
            {
                out[2 * k] = v as u32;
                out[2 * k + 1] = (v >> 32) as u32;
            }
            out
        });
        let servers = self.pool.servers.len();
        plugin.choose(
            &self.pool,
            &WasmHost {
                sequence,
                in_flight,
                servers,
            },
        )
    }
}

impl<P: Plugin> Default for State<P> {
    fn default() -> Self {
        Self::new()
    }
}

fn from_wit(s: types::Server) -> Server {
    Server {
        id: s.id,
        address: s.address,
        weight: s.weight.max(1),
        healthy: s.healthy,
        max_connections: s.max_connections,
        warmup: s.warmup,
        cpu_percent: s.cpu_percent,
        memory_percent: s.memory_percent,
        backend_connections: s.backend_connections,
        load_sample: s.load_sample,
        load_sampled_at_ms: s.load_sampled_at_ms,
    }
}

/// [`Host`] over the component's imports.
struct WasmHost {
    sequence: u64,
    /// Brought by `choose-loaded`: then `in_flight()` needs no host call.
    in_flight: Option<[u32; 16]>,
    servers: usize,
}

/// `choose-loaded`'s in-flight counts, two per `u64`.
pub type Packed = (u64, u64, u64, u64, u64, u64, u64, u64);

impl Host for WasmHost {
    fn sequence(&self) -> u64 {
        self.sequence
    }
    fn in_flight(&self) -> Cow<'_, [u32]> {
        match &self.in_flight {
            Some(v) => Cow::Borrowed(&v[..self.servers.min(16)]),
            None => Cow::Owned(load::in_flight()),
        }
    }
    fn latency_us(&self) -> Vec<u32> {
        load::latency_us()
    }
    fn server_load(&self, index: u32) -> ServerLoad {
        let l = load::figures(index);
        ServerLoad {
            in_flight: l.in_flight,
            latency_us: l.latency_us,
            requests: l.requests,
            failures: l.failures,
        }
    }
    fn now_ms(&self) -> u64 {
        load::now_ms()
    }
    fn protocol(&self) -> Protocol {
        match request::kind() {
            types::Protocol::Http => Protocol::Http,
            types::Protocol::Tcp => Protocol::Tcp,
        }
    }
    fn method(&self) -> String {
        request::method()
    }
    fn path(&self) -> String {
        request::path()
    }
    fn header(&self, name: &str) -> Option<String> {
        request::header(name)
    }
    fn client_ip(&self) -> String {
        request::client_ip()
    }
    fn hash_key(&self) -> Option<String> {
        request::hash_key()
    }
    fn attempt(&self) -> u32 {
        request::attempt()
    }
    fn next(&self, counter: u8) -> u64 {
        shared::next(counter)
    }
    fn add(&self, counter: u8, delta: i64) -> i64 {
        shared::add(counter, delta)
    }
    fn get(&self, counter: u8) -> i64 {
        shared::get(counter)
    }
}
