//! Configuration files as the tests write them: a `[[listener]]` table, a whole file with
//! an admin endpoint, parsed as the binary would parse it. Every address is 127.0.0.1 port
//! 0; the bound ones are read back from the running proxy.

use std::net::SocketAddr;
use std::path::Path;

use lbwasm::backend::BackendHandle;
use lbwasm::config::{self, Config};

/// A `[[listener]]` table: `keys` are extra `key = value` lines, `sections` extra tables
/// (`[listener.health]` ...), then one `[[listener.backend]]` per backend.
pub fn listener(
    name: &str,
    plugin: &str,
    backends: &[(SocketAddr, u32)],
    keys: &str,
    sections: &str,
) -> String {
    let mut s = format!(
        "[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nplugin = \"{plugin}\"\n{keys}\n{sections}\n"
    );
    for (addr, weight) in backends {
        s.push_str(&format!(
            "[[listener.backend]]\naddress = \"{addr}\"\nweight = {weight}\n"
        ));
    }
    s
}

/// A whole configuration: `workers` workers, an admin endpoint (with `token` if given),
/// then `listeners`.
pub fn with_admin(workers: usize, listeners: &str, token: Option<&str>) -> String {
    let token = token
        .map(|t| format!("token = \"{t}\"\n"))
        .unwrap_or_default();
    format!("workers = {workers}\n[admin]\nlisten = \"127.0.0.1:0\"\n{token}\n{listeners}")
}

/// `text` parsed as a file named `serve-test.toml`; a test's own config must be valid.
pub fn parse(text: &str) -> Config {
    config::parse_str(text, Path::new("serve-test.toml"))
        .unwrap_or_else(|e| panic!("bad test config: {e}\n{text}"))
}

/// Backends at weight 1.
pub fn weight_1(addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<(SocketAddr, u32)> {
    addrs.into_iter().map(|a| (a, 1)).collect()
}

/// Demo backends at weight 1.
pub fn addrs(bs: &[BackendHandle]) -> Vec<(SocketAddr, u32)> {
    weight_1(bs.iter().map(BackendHandle::addr))
}
