//! `lbwasm cluster seed` and `lbwasm cluster status`: the cluster seen from outside any
//! replica.

use std::fmt::Write as _;

use anyhow::{Context as _, Result};

use super::state::{self, Desired};
use super::{Store, keys};
use crate::config::{ClusterConfig, Config};

/// Writes the file's listeners (pools, plugins, options) into the cluster store, each
/// only if the store has none for it. Returns what it did, in words.
pub async fn seed(config: &Config) -> Result<String> {
    let c = config
        .cluster
        .as_ref()
        .context("no cluster: give --etcd URL and --cluster NAME (or a [cluster] table)")?;
    let mut store = Store::connect(c).await?;
    let now = store.load().await?;
    let mut specs = Vec::new();
    let mut present = Vec::new();
    for l in &config.listeners {
        if now.entries.contains_key(&keys::plugin(&l.name)) {
            present.push(l.name.clone());
            continue;
        }
        let (spec, blob) = state::spec_of(l)?;
        specs.push((l.name.clone(), spec, blob));
    }
    let seeded = if specs.is_empty() {
        Vec::new()
    } else {
        store.seed(&now, specs, "lbwasm cluster seed").await?
    };
    let mut out = String::new();
    if !seeded.is_empty() {
        let _ = writeln!(out, "seeded cluster {:?}: {}", c.name, seeded.join(", "));
    }
    if !present.is_empty() {
        let _ = writeln!(
            out,
            "already in the store, left as they are: {}",
            present.join(", ")
        );
    }
    if out.is_empty() {
        out.push_str("nothing written: another writer seeded the same listeners first\n");
    }
    Ok(out)
}

/// The cluster's configuration and replicas; the flag is true when every replica runs
/// the latest configuration revision and the plugins the store names.
pub async fn status(c: &ClusterConfig) -> Result<(String, bool)> {
    let mut store = Store::connect(c).await?;
    let m = store.load().await?;
    let d = Desired::from_mirror(&m);
    let latest = m.entries.get(keys::CHANGED).map_or(0, |e| e.mod_revision);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {:?} on {}: store revision {}, configuration revision {}{}",
        c.name,
        c.endpoints.join(","),
        m.revision,
        latest,
        if m.seeded() { "" } else { " (not seeded)" }
    );
    for (name, l) in &d.listeners {
        let plugin = l
            .plugin
            .as_ref()
            .map_or_else(|| "(none)".into(), |p| p.label());
        let draining = l.backends.values().filter(|b| b.draining).count();
        let _ = writeln!(
            out,
            "listener {name}: plugin {plugin}, {} backends ({draining} draining)",
            l.backends.len()
        );
    }
    for p in &d.problems {
        let _ = writeln!(out, "unreadable key: {p}");
    }
    let _ = writeln!(
        out,
        "\n{:<24} {:<22} {:>8}  {:<11} plugins",
        "replica", "admin", "applied", "state"
    );
    let mut all_same = true;
    for r in d.replicas.values() {
        let mut differs = Vec::new();
        for (listener, spec) in &d.listeners {
            let wanted = spec.plugin.as_ref().map(|p| p.plugin.as_str());
            if wanted.is_some() && r.plugins.get(listener).map(String::as_str) != wanted {
                differs.push(listener.as_str());
            }
        }
        let state = if r.applied_revision < latest {
            "BEHIND"
        } else if !differs.is_empty() {
            "DIFFERS"
        } else {
            "up to date"
        };
        all_same &= state == "up to date";
        let plugins: Vec<String> = r.plugins.iter().map(|(l, p)| format!("{l}={p}")).collect();
        let _ = writeln!(
            out,
            "{:<24} {:<22} {:>8}  {:<11} {}{}",
            r.replica,
            r.admin.as_deref().unwrap_or("-"),
            r.applied_revision,
            state,
            plugins.join(" "),
            if differs.is_empty() {
                String::new()
            } else {
                format!("  (plugin differs on {})", differs.join(", "))
            }
        );
    }
    if d.replicas.is_empty() {
        out.push_str("(no live replica)\n");
    }
    Ok((out, all_same))
}
