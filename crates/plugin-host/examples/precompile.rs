//! Compiles a plugin component with the proxy's engine settings and writes the native
//! object wasmtime would run, so that the code Cranelift made of a plugin can be read:
//!
//! ```text
//! cargo run --release -p lbwasm-plugin-host --example precompile -- \
//!     target/plugins/wasm32-wasip2/plugin/least_connections.wasm /tmp/lc.cwasm
//! objdump -d --no-show-raw-insn /tmp/lc.cwasm | less
//! ```
//!
//! The low 12 bits of the `[JIT]` addresses `perf report` shows for the plugin are the
//! offsets' low 12 bits here (the code is mapped page-aligned): several hot addresses that
//! land in one function and its loops identify it.

use lbwasm_plugin_host::{Runtime, RuntimeConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(input), Some(output)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: precompile PLUGIN.wasm OUTPUT.cwasm");
    };
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let bytes = std::fs::read(&input).map_err(|e| anyhow::anyhow!("{input}: {e}"))?;
    let object = runtime
        .engine()
        .precompile_component(&bytes)
        .map_err(|e| anyhow::anyhow!("{input}: {e}"))?;
    std::fs::write(&output, object).map_err(|e| anyhow::anyhow!("{output}: {e}"))?;
    Ok(())
}
