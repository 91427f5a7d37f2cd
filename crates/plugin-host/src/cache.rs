//! On-disk cache of compiled plugins: compiling a component with Cranelift takes tens of
//! milliseconds, loading a precompiled one well under a millisecond.
//!
//! A cached artifact is native code that the process maps executable and runs, so the cache
//! is trusted only as far as it is provably ours:
//!
//! - **The directory** must be a directory owned by the effective user, with no write
//!   permission for group or others (it is created `0700`). Otherwise the cache is not used
//!   at all (plugins are compiled in memory) and a warning says why: anyone else who can
//!   write there could plant code.
//! - **Each artifact** is opened without following a symbolic link and must be a regular
//!   file owned by the effective user and not writable by group or others. It is read into
//!   memory once, and that buffer is what is checked and loaded (no window between check
//!   and use).
//! - **Integrity**: each artifact ends with a trailer, an XXH3-128 digest of the artifact and
//!   of the file's name (the key), written with it. A truncated, corrupted or renamed file
//!   (an artifact stored under another plugin's key) does not match and is a cache miss: the
//!   plugin is compiled again and the entry rewritten. The digest is not a signature (its
//!   key is in the same directory): planting is stopped by the ownership rules above, the
//!   digest stops accidents.
//!
//! Entries are keyed by the component's bytes and the engine's compatibility hash (wasmtime
//! version and every setting that changes generated code), so an entry is only ever loaded
//! into an engine that could have produced it. Writes go to a temporary file (`0600`,
//! created exclusively) renamed into place, so concurrent processes never see half a file.

use anyhow::{Context, Result, bail};
use std::fs::{DirBuilder, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;
use xxhash_rust::xxh3::Xxh3Default;

/// Marks the end of an artifact written by this version of the cache.
const MAGIC: &[u8; 8] = b"lbwasmC1";
/// Digest (16 bytes) + magic.
const TRAILER: usize = 16 + MAGIC.len();
/// Larger files are not ours to load (a compiled plugin is a few hundred KiB).
const MAX_ARTIFACT: u64 = 256 << 20;

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

/// Compiles `bytes`, or loads the compiled artifact from `dir` when present and trusted.
pub fn load(engine: &Engine, bytes: &[u8], dir: Option<&Path>) -> Result<Component> {
    let compile = || Component::new(engine, bytes).map_err(super::wasm_err);
    let Some(dir) = dir else {
        return compile();
    };
    if let Err(e) = trusted_dir(dir) {
        warn_untrusted(dir, &e);
        return compile();
    }
    let mut h = Xxh3Default::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let engine_key = h.finish();
    let name = format!(
        "{:016x}-{:032x}.cwasm",
        engine_key,
        xxhash_rust::xxh3::xxh3_128(bytes)
    );
    let file = dir.join(&name);
    match read_artifact(&file, &name) {
        Ok(Some(artifact)) => {
            // SAFETY: `artifact` is the content of a file in a directory only we can write,
            // owned by us and not writable by others, whose digest (bound to its name, which
            // holds the engine's compatibility hash) matches the one we wrote with it; it is
            // this very buffer, not the file again, that is loaded.
            match unsafe { Component::deserialize(engine, artifact) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "discarding unusable cached plugin")
                }
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %format!("{e:#}"), "ignoring an untrusted or corrupted cached plugin; compiling it again")
        }
    }
    let component = compile()?;
    if let Err(e) = store(&component, dir, &file, &name) {
        tracing::debug!(dir = %dir.display(), error = %format!("{e:#}"), "plugin cache not written");
    }
    Ok(component)
}

/// One warning per directory and process: every plugin load would repeat it.
fn warn_untrusted(dir: &Path, e: &anyhow::Error) {
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if !warned.iter().any(|d| d == dir) {
        warned.push(dir.to_path_buf());
        tracing::warn!(dir = %dir.display(), reason = %format!("{e:#}"), "plugin cache not used: compiling plugins in memory (fix: a directory owned by this user, chmod 700)");
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `dir` (`0700`) if missing, then checks that it is ours alone to write.
fn trusted_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        match DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    if meta.uid() != euid() {
        bail!(
            "{} is owned by uid {}, not by this user (uid {})",
            dir.display(),
            meta.uid(),
            euid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "{} is writable by group or others (mode {:o})",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// The artifact stored under `name`, without its trailer: `None` when there is no such file,
/// an error when it is not ours or does not match its digest.
fn read_artifact(file: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(file)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("opening it (a symbolic link is refused)"),
    };
    // Checked on the open descriptor: what is read is what was checked.
    let meta = f.metadata().context("reading its metadata")?;
    if !meta.is_file() {
        bail!("not a regular file");
    }
    if meta.uid() != euid() {
        bail!("owned by uid {}, not by this user", meta.uid());
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        );
    }
    if meta.len() > MAX_ARTIFACT {
        bail!("{} bytes: larger than any compiled plugin", meta.len());
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    (&mut f).take(MAX_ARTIFACT + 1).read_to_end(&mut data)?;
    let Some(body_len) = data.len().checked_sub(TRAILER) else {
        bail!("truncated ({} bytes)", data.len());
    };
    if &data[data.len() - MAGIC.len()..] != MAGIC {
        bail!("no lbwasm trailer (truncated, or not written by this version)");
    }
    let stored = &data[body_len..body_len + 16];
    if stored != digest(name, &data[..body_len]) {
        bail!("digest mismatch (corrupted, or another plugin's artifact)");
    }
    data.truncate(body_len);
    Ok(Some(data))
}

/// XXH3-128 of the entry's name and the artifact: binds the artifact to its key.
fn digest(name: &str, artifact: &[u8]) -> [u8; 16] {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(name.as_bytes());
    h.update(&[0]);
    h.update(artifact);
    h.digest128().to_le_bytes()
}

fn store(component: &Component, dir: &Path, file: &Path, name: &str) -> Result<()> {
    // Unique per writer: threads of one process (parallel tests, workers) may store the
    // same plugin at once, and must not write into each other's file.
    static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("{name}.tmp{}-{n}", std::process::id()));
    let artifact = component.serialize().map_err(super::wasm_err)?;
    let written = (|| -> Result<()> {
        let mut f: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&artifact)?;
        f.write_all(&digest(name, &artifact))?;
        f.write_all(MAGIC)?;
        std::fs::rename(&tmp, file)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_binds_the_name() {
        assert_ne!(digest("a.cwasm", b"code"), digest("b.cwasm", b"code"));
        assert_ne!(digest("a.cwasm", b"code"), digest("a.cwasm", b"codf"));
    }
}
