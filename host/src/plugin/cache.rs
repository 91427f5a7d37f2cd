//! On-disk cache of compiled plugins: compiling a component with Cranelift takes tens of
//! milliseconds, loading a precompiled one about a hundred microseconds.
//!
//! Entries are keyed by the component's bytes and the engine's compatibility hash (wasmtime
//! version and every setting that changes generated code), so an entry is only ever loaded
//! into an engine that could have produced it. Writes go to a temporary file renamed into
//! place, so concurrent processes (parallel tests) never see half a file.

use anyhow::{Context, Result};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;
use xxhash_rust::xxh3::Xxh3Default;

/// Where compiled plugins go: `$LBWASM_CACHE_DIR`, else `$XDG_CACHE_HOME/lbwasm`, else
/// `~/.cache/lbwasm`; `None` (no caching) when none can be determined.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LBWASM_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("lbwasm"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("lbwasm"))
}

/// Compiles `bytes`, or loads the compiled artifact from `dir` when present.
pub fn load(engine: &Engine, bytes: &[u8], dir: Option<&Path>) -> Result<Component> {
    let Some(dir) = dir else {
        return Component::new(engine, bytes).map_err(super::wasm_err);
    };
    let mut h = Xxh3Default::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let engine_key = h.finish();
    let file = dir.join(format!(
        "{:016x}-{:032x}.cwasm",
        engine_key,
        xxhash_rust::xxh3::xxh3_128(bytes)
    ));
    if file.exists() {
        // SAFETY: the file is in our own cache directory, was written by `serialize` of an
        // engine with the same compatibility hash (part of its name), and renamed into place
        // only once complete.
        match unsafe { Component::deserialize_file(engine, &file) } {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "discarding unusable cached plugin")
            }
        }
    }
    let component = Component::new(engine, bytes).map_err(super::wasm_err)?;
    if let Err(e) = store(&component, dir, &file) {
        tracing::debug!(dir = %dir.display(), error = %e, "plugin cache not written");
    }
    Ok(component)
}

fn store(component: &Component, dir: &Path, file: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Unique per writer: threads of one process (parallel tests, workers) may store the
    // same plugin at once, and must not write into each other's file.
    static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = file.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, component.serialize().map_err(super::wasm_err)?)?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}
