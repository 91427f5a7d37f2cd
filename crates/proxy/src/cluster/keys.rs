//! The cluster's keys, relative to its prefix `/lbwasm/NAME/` (see the module's table).

use std::net::SocketAddr;

/// The prefix every key of cluster `name` lives under.
pub fn prefix(name: &str) -> String {
    format!("/lbwasm/{name}/")
}

/// The key whose presence says the cluster has been seeded.
pub const META: &str = "meta";

/// Bumped by every configuration write: its `mod_revision` is the cluster's configuration
/// revision (a deletion leaves no key whose revision would say it).
pub const CHANGED: &str = "changed";

/// A listener's plugin and options.
pub fn plugin(listener: &str) -> String {
    format!("listeners/{listener}/plugin")
}

/// A listener's shared balancing settings.
pub fn settings(listener: &str) -> String {
    format!("listeners/{listener}/settings")
}

/// One backend of a listener.
pub fn backend(listener: &str, addr: SocketAddr) -> String {
    format!("listeners/{listener}/backends/{addr}")
}

/// Chunk `n` of an uploaded component's bytes.
pub fn blob_chunk(digest: &str, n: usize) -> String {
    format!("plugins/{digest}/{n:03}")
}

/// The prefix of a component's chunks.
pub fn blob(digest: &str) -> String {
    format!("plugins/{digest}/")
}

/// A replica's liveness and status key.
pub fn replica(id: &str) -> String {
    format!("replicas/{id}")
}

/// What a relative key names.
#[derive(Debug, PartialEq, Eq)]
pub enum Key<'a> {
    /// [`META`].
    Meta,
    /// `listeners/L/plugin`.
    Plugin(&'a str),
    /// `listeners/L/settings`.
    Settings(&'a str),
    /// `listeners/L/backends/ADDR` (the address as written; parsed by the reader).
    Backend(&'a str, &'a str),
    /// `plugins/DIGEST/NNN`.
    BlobChunk(&'a str, &'a str),
    /// `replicas/R`.
    Replica(&'a str),
    /// Anything else (a newer version's keys): kept in the mirror, otherwise ignored.
    Other,
}

/// Reads a relative key.
pub fn parse(key: &str) -> Key<'_> {
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        ["meta"] => Key::Meta,
        ["listeners", l, "plugin"] => Key::Plugin(l),
        ["listeners", l, "settings"] => Key::Settings(l),
        ["listeners", l, "backends", a] => Key::Backend(l, a),
        ["plugins", d, n] => Key::BlobChunk(d, n),
        ["replicas", r] => Key::Replica(r),
        _ => Key::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_back() {
        let a: SocketAddr = "[::1]:8080".parse().unwrap();
        assert_eq!(parse(&backend("web", a)), Key::Backend("web", "[::1]:8080"));
        assert_eq!(parse(&plugin("web")), Key::Plugin("web"));
        assert_eq!(
            parse(&blob_chunk("sha256:ab", 3)),
            Key::BlobChunk("sha256:ab", "003")
        );
        assert_eq!(parse(&replica("r1")), Key::Replica("r1"));
        assert_eq!(parse(META), Key::Meta);
        assert_eq!(parse(&settings("web")), Key::Settings("web"));
        assert_eq!(parse("listeners/web/tls"), Key::Other);
    }
}
