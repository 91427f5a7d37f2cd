//! [`Plugin`]: one loaded, validated component with its options, shared by every worker;
//! [`PluginSource`]: where it came from.

use super::bindings::BalancerPre;
use super::runtime::Runtime;
use super::stats::{ChooseHistogram, PluginStats, SharedCounters, StatsSnapshot};
use super::store::StoreData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a plugin comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginSource {
    /// A built-in, by name.
    Builtin(String),
    /// A component file.
    File(PathBuf),
}

impl PluginSource {
    /// `round_robin` → built-in; anything ending in `.wasm` or containing a path separator → file.
    pub fn parse(s: &str) -> Self {
        if s.ends_with(".wasm") || s.contains('/') || s.contains(std::path::MAIN_SEPARATOR) {
            PluginSource::File(PathBuf::from(s))
        } else {
            PluginSource::Builtin(s.to_string())
        }
    }

    /// The file, if this is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            PluginSource::File(p) => Some(p),
            PluginSource::Builtin(_) => None,
        }
    }
}

impl std::fmt::Display for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::Builtin(n) => f.write_str(n),
            PluginSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A loaded, validated plugin with its options. Shared by every worker; each worker makes its
/// own [`Selector`] from it.
pub struct Plugin {
    pub(super) name: String,
    pub(super) runtime: Runtime,
    pub(super) pre: BalancerPre<StoreData>,
    pub(super) options: Vec<(String, String)>,
    pub(super) shared: Arc<SharedCounters>,
    pub(super) stats: PluginStats,
    pub(super) description: String,
    pub(super) size: usize,
}

impl Plugin {
    /// Built-in name or file path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's own one-line description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Component size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The options it was configured with.
    pub fn options(&self) -> &[(String, String)] {
        &self.options
    }

    /// Call, fault and fallback counters summed over every worker.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Time spent in `choose`, summed over every worker.
    pub fn choose_histogram(&self) -> ChooseHistogram {
        self.stats.histogram()
    }
}
