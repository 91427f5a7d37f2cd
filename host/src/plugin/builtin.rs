//! The built-in plugins, compiled by `build.rs` and embedded in the binary.

include!(concat!(env!("OUT_DIR"), "/builtins.rs"));

/// The component bytes of built-in plugin `name`.
pub fn get(name: &str) -> Option<&'static [u8]> {
    BUILTINS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Names of every built-in plugin.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUILTINS.iter().map(|(n, _)| *n)
}
