//! Builds the built-in plugins listed in `plugins/builtins.txt` and embeds their bytes.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let root = lbwasm_wasm_build::workspace_root();
    let names = lbwasm_wasm_build::builtin_names(&root);
    println!("cargo:rerun-if-changed=build.rs");
    let out = lbwasm_wasm_build::build(&root, &names, &["wit", "plugins"]);

    let mut src = String::from("/// (name, component bytes) of every built-in plugin.\n");
    src.push_str("pub static ALL: &[(&str, &[u8])] = &[\n");
    for name in &names {
        let wasm = out.join(format!("{name}.wasm"));
        assert!(
            wasm.exists(),
            "plugin {name} was not built: {} is missing",
            wasm.display()
        );
        writeln!(
            src,
            "    ({name:?}, include_bytes!({:?})),",
            wasm.display().to_string()
        )
        .unwrap();
    }
    src.push_str("];\n");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out_dir.join("builtins.rs"), src).expect("write builtins.rs");
}
