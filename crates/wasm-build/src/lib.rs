//! Builds wasm plugin crates of the workspace from a build script: the built-in plugins
//! (`lbwasm-builtins`) and the test fixtures (`lbwasm-fixtures`) share it.
//!
//! One nested `cargo build --profile plugin --target wasm32-wasip2` per call, in its own
//! target directory (`target/plugins`) so it never waits on the lock the outer build holds.
//! Our machines set `RUSTUP_AUTO_INSTALL=0`, so the target named in `rust-toolchain.toml`
//! is not installed by itself: [`ensure_target`] adds it with rustup when it is missing, or
//! stops with the command to run.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target plugins are built for.
pub const TARGET: &str = "wasm32-wasip2";

/// Builds the wasm crates `packages` of the workspace at `root` (unless
/// `LBWASM_SKIP_PLUGIN_BUILD` is set: then the components already built are used) and
/// returns the directory their `.wasm` files are in. Tells cargo to run the calling build
/// script again when `watch` (directories under `root`) change.
pub fn build(root: &Path, packages: &[String], watch: &[&str]) -> PathBuf {
    for dir in watch {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=LBWASM_SKIP_PLUGIN_BUILD");
    let target_dir = root.join("target").join("plugins");
    {
        // Two build scripts (built-ins, fixtures) run at once on a fresh machine: one
        // `rustup target add` at a time, the second finds the target there.
        std::fs::create_dir_all(&target_dir).expect("create target/plugins");
        let lock = std::fs::File::create(target_dir.join(".target-add.lock"))
            .expect("create target/plugins/.target-add.lock");
        lock.lock().expect("lock target/plugins/.target-add.lock");
        ensure_target();
    }
    if env::var_os("LBWASM_SKIP_PLUGIN_BUILD").is_none() {
        build_plugins(root, &target_dir, packages);
    }
    target_dir.join(TARGET).join("plugin")
}

/// The built-in plugins, from `plugins/builtins.txt` (the one list of them): one crate name
/// per line, `#` comments.
pub fn builtin_names(root: &Path) -> Vec<String> {
    let list = root.join("plugins").join("builtins.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    let text = std::fs::read_to_string(&list)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", list.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// The workspace root, from a crate's build script (crates sit one or two levels below it).
pub fn workspace_root() -> PathBuf {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .find(|d| d.join("wit").is_dir() && d.join("plugins").is_dir())
        .expect("a crate of the lbwasm workspace")
        .to_path_buf()
}

/// Makes sure the active toolchain has the wasm32-wasip2 standard library.
pub fn ensure_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(sysroot) = &sysroot
        && sysroot.join("lib/rustlib").join(TARGET).exists()
    {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target (rustup target add {TARGET})");
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", TARGET]);
    if let Ok(toolchain) = env::var("RUSTUP_TOOLCHAIN") {
        cmd.args(["--toolchain", &toolchain]);
    }
    match cmd.status() {
        Ok(s) if s.success() => {}
        other => panic!(
            "the {TARGET} target is missing and `rustup target add {TARGET}` failed ({other:?}); \
             run `rustup target add {TARGET}` and build again"
        ),
    }
}

/// The nested `cargo build` of `packages`.
fn build_plugins(root: &Path, target_dir: &Path, packages: &[String]) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--profile",
            "plugin",
            "--target",
            TARGET,
            "--message-format",
            "short",
        ])
        .arg("--target-dir")
        .arg(target_dir);
    for name in packages {
        cmd.args(["-p", name]);
    }
    // The outer build's settings are for the host, not for wasm: don't let them leak in.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd.output().expect("run cargo to build the wasm plugins");
    if !output.status.success() {
        panic!(
            "building the wasm plugins failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
