//! The built-in plugins' component bytes, compiled from `plugins/` by `build.rs`.
//!
//! Their own crate, which only the `lbwasm` binary (and tests) depend on: editing a plugin
//! rebuilds this crate and relinks the binary, never the proxy. The binary hands [`ALL`]
//! to the plugin host at start (`lbwasm_plugin_host::builtin::install`).

include!(concat!(env!("OUT_DIR"), "/builtins.rs"));
