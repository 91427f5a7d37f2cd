//! Loading a plugin: [`Runtime::load`] compiles (or takes from the cache) a component,
//! links it against the world, and configures one instance so that bad options, start-up
//! traps and a bad description are refused at load time, not on the first request.

use super::bindings::BalancerPre;
use super::component::{Plugin, PluginSource};
use super::instance::Instance;
use super::runtime::Runtime;
use super::stats::{PluginStats, SharedCounters};
use super::store::StoreData;
use super::{builtin, cache, wasm_err};
use anyhow::{Context, Result, anyhow, bail};
use std::sync::Arc;
use wasmtime::component::Component;

impl Runtime {
    /// Loads a plugin, validates it against the `balancer` world, and configures one
    /// instance with `options` so that bad options are refused here, at start-up.
    pub fn load(&self, source: &PluginSource, options: &[(String, String)]) -> Result<Arc<Plugin>> {
        let name = source.to_string();
        let bytes: std::borrow::Cow<'static, [u8]> = match source {
            PluginSource::Builtin(n) if builtin::is_builtin(n) => builtin::get(n)
                .ok_or_else(|| {
                    anyhow!(
                        "built-in plugin `{n}` is not in this program (built-ins not installed)"
                    )
                })?
                .into(),
            PluginSource::Builtin(n) => bail!(
                "no built-in plugin named `{n}` (built-ins: {}; a file path must end in .wasm)",
                builtin::names().collect::<Vec<_>>().join(", ")
            ),
            PluginSource::File(p) => std::fs::read(p)
                .with_context(|| format!("reading plugin {}", p.display()))?
                .into(),
        };
        self.load_bytes(&name, &bytes, options)
    }

    /// [`Runtime::load`] from bytes in memory; `name` is used in messages.
    pub fn load_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        options: &[(String, String)],
    ) -> Result<Arc<Plugin>> {
        if !bytes.starts_with(b"\0asm") {
            bail!("plugin {name} is not a WebAssembly file (no \\0asm header)");
        }
        let component = cache::load(
            &self.inner().engine,
            bytes,
            self.inner().config.cache_dir.as_deref(),
        )
        .map_err(|e| anyhow!("plugin {name} is not a valid WebAssembly component: {e:#}"))?;
        let pre = self
            .pre(&component)
            .with_context(|| format!("plugin {name}"))?;
        let mut plugin = Plugin {
            name: name.to_string(),
            runtime: self.clone(),
            pre,
            options: options.to_vec(),
            shared: Arc::new(SharedCounters::default()),
            stats: PluginStats::default(),
            description: String::new(),
            size: bytes.len(),
        };
        // One instance now: configure errors, start-up traps and describe() surface here.
        let mut probe = Instance::new(&plugin, self.inner().deadline_ticks)
            .with_context(|| format!("plugin {name}"))?;
        let description = probe
            .describe()
            .with_context(|| format!("plugin {name}: describe()"))?;
        plugin.description = checked_description(description)
            .map_err(|e| anyhow!("plugin {name}: describe(): {e}"))?;
        drop(probe);
        // Counters touched by the probe's configure are reset so that every worker starts at 0.
        plugin.shared.reset();
        Ok(Arc::new(plugin))
    }

    /// Links a component against our imports (anything else it imports traps if called:
    /// no WASI capability is granted) and type-checks its exports against the world.
    pub(super) fn pre(&self, component: &Component) -> Result<BalancerPre<StoreData>> {
        let mut linker = self.inner().linker.clone();
        linker
            .define_unknown_imports_as_traps(component)
            .map_err(wasm_err)?;
        let instance_pre = linker.instantiate_pre(component).map_err(wasm_err)?;
        BalancerPre::new(instance_pre).map_err(|e| {
            let missing = super::inspect::missing_exports(&self.inner().engine, component);
            if missing.is_empty() {
                anyhow!("does not implement the world lbwasm:balancer/balancer@0.2.0: {e:#}")
            } else {
                anyhow!(
                    "does not implement the world lbwasm:balancer/balancer@0.2.0: missing or mistyped exports: {}",
                    missing.join(", ")
                )
            }
        })
    }
}

/// Longest description a plugin may give: it is one line, shown by `lbwasm plugins`, the
/// admin API and the dashboard (a plugin describing itself in megabytes would have every
/// client of those carry them).
pub const MAX_DESCRIPTION: usize = 1024;

/// Refuses a description over [`MAX_DESCRIPTION`] bytes; control characters (newlines, escape
/// sequences a terminal would obey) become spaces.
fn checked_description(text: String) -> Result<String> {
    if text.len() > MAX_DESCRIPTION {
        bail!(
            "the description is {} bytes; a plugin describes itself in one line of at most {MAX_DESCRIPTION} bytes",
            text.len()
        );
    }
    if text.chars().any(char::is_control) {
        return Ok(text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect());
    }
    Ok(text)
}
