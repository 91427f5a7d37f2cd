//! The built-in plugins: named by `plugins/builtins.txt` (the one list), their bytes
//! handed over once by the program that embeds them ([`install`]).
//!
//! The bytes live in `lbwasm-builtins`, a crate only the binary depends on, so that editing
//! a plugin rebuilds that crate and relinks the binary, never this crate or the proxy.

use std::sync::OnceLock;

/// The list, compiled in: configurations naming a built-in are checked against it even
/// where no bytes were installed (the proxy's own unit tests).
const LIST: &str = include_str!("../../../plugins/builtins.txt");

/// (name, component bytes) of every built-in, from [`install`].
static BYTES: OnceLock<&'static [(&'static str, &'static [u8])]> = OnceLock::new();

/// Makes `all` (`lbwasm_builtins::ALL`) the built-in plugins' bytes; the first call wins.
pub fn install(all: &'static [(&'static str, &'static [u8])]) {
    let _ = BYTES.set(all);
}

/// The component bytes of built-in plugin `name`; none if it is not a built-in, or if the
/// program installed none (`lbwasm_builtins` not linked in).
pub fn get(name: &str) -> Option<&'static [u8]> {
    BYTES
        .get()?
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
}

/// Whether `name` is a built-in plugin.
pub fn is_builtin(name: &str) -> bool {
    names().any(|n| n == name)
}

/// Names of every built-in plugin.
pub fn names() -> impl Iterator<Item = &'static str> + Clone {
    LIST.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}
