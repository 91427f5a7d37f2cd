//! The shared state: the cluster's keys as a replica last read them ([`Mirror`], also what
//! it saves to start from when etcd is down) and what they say ([`Desired`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::keys::{self, Key};
use crate::config::{ListenerConfig, PluginRef};

/// One key's value and revisions, as etcd gave them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The value (base64 in the saved snapshot: components are binary).
    #[serde(with = "b64")]
    pub value: Vec<u8>,
    /// The revision of the key's last change: what a write compares against.
    pub mod_revision: i64,
}

/// The cluster's keys (relative to its prefix) at one store revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirror {
    /// The store revision this is the state at.
    pub revision: i64,
    /// The etcd cluster it was read from: another id means the store was replaced.
    pub cluster_id: u64,
    /// Every key under the prefix.
    pub entries: BTreeMap<String, Entry>,
}

impl Mirror {
    /// Whether the cluster has been seeded.
    pub fn seeded(&self) -> bool {
        self.entries.contains_key(keys::META)
    }

    /// Reads a saved snapshot: only one this user wrote (owned by it, writable by no one
    /// else). The default location is the shared temporary directory, where another user
    /// could otherwise plant a configuration a replica would serve while etcd is down.
    pub fn load(path: &Path) -> Result<Mirror> {
        check_private(path)?;
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("{}: not a snapshot", path.display()))
    }

    /// Saves it atomically, readable by the owner only: it holds the cluster's
    /// configuration.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_private(path, &serde_json::to_vec(self)?)
    }

    /// The bytes of component `digest` (`sha256:HEX`) if all its chunks are here and
    /// match the digest.
    pub fn blob(&self, digest: &str) -> Option<Vec<u8>> {
        let prefix = keys::blob(digest);
        let mut bytes = Vec::new();
        for (_, e) in self
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
        {
            bytes.extend_from_slice(&e.value);
        }
        (!bytes.is_empty() && digest_of(&bytes) == digest).then_some(bytes)
    }
}

/// Writes `bytes` to `path` atomically: a new file of mode 0600 (never one that was
/// there: a planted file or symbolic link at the temporary name is removed, then the file
/// is created exclusively), renamed over `path`.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Refuses a file or folder this process's user does not own, or that others may write.
pub fn check_private(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::symlink_metadata(path)
            .with_context(|| format!("reading {}", path.display()))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.file_type().is_symlink() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            anyhow::bail!(
                "{}: refused: not a file of this user that only it may write (owner {}, mode {:o})",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777
            );
        }
    }
    Ok(())
}

/// Creates `dir` (mode 0700) if missing and checks it is this user's alone.
pub fn private_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        let _ = std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir);
    }
    #[cfg(not(unix))]
    let _ = std::fs::create_dir_all(dir);
    check_private(dir)
}

/// `sha256:HEX` of a component: how the cluster names uploaded plugins.
pub fn digest_of(bytes: &[u8]) -> String {
    let hash = sha2::Sha256::digest(bytes);
    let mut hex = String::with_capacity(71);
    hex.push_str("sha256:");
    for b in hash {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// A backend as the cluster shares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// Relative share (default 1).
    #[serde(default = "one")]
    pub weight: u32,
    /// Connection limit (0: none).
    #[serde(default)]
    pub max_connections: u32,
    /// Kept in the pool, given no new requests.
    #[serde(default)]
    pub draining: bool,
    /// Failure domain, for operators and plugins that group by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

/// A listener's plugin as the cluster shares it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// A built-in's name, or `sha256:HEX` of a component stored under `plugins/`.
    pub plugin: String,
    /// What the operator called it (a file name), for reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its options.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl PluginSpec {
    /// The digest, for an uploaded component.
    pub fn digest(&self) -> Option<&str> {
        self.plugin
            .starts_with("sha256:")
            .then_some(self.plugin.as_str())
    }

    /// The options as the plugin host takes them.
    pub fn option_list(&self) -> Vec<(String, String)> {
        self.options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// How reports show it: the built-in's name, or the file name and digest.
    pub fn label(&self) -> String {
        match (&self.name, self.digest()) {
            (Some(n), Some(d)) => format!("{n} ({})", &d[..19.min(d.len())]),
            _ => self.plugin.clone(),
        }
    }
}

/// The balancing settings every replica of a listener must share: what a hashing plugin
/// hashes (else replicas would send one key to different backends) and the retry policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsSpec {
    /// `header:NAME`, `cookie:NAME`, `path`, `client-ip` or `sni`; none: the plugin's own.
    #[serde(default)]
    pub hash_key: Option<String>,
    /// Total tries including the first.
    pub retry_attempts: u32,
    /// Retries may add at most this percentage of requests.
    pub retry_budget_percent: u32,
}

impl SettingsSpec {
    /// A listener's settings as its configuration has them.
    pub fn of(l: &ListenerConfig) -> SettingsSpec {
        SettingsSpec {
            hash_key: l.hash_key.as_ref().map(|k| k.to_text()),
            retry_attempts: l.retry.attempts,
            retry_budget_percent: l.retry.budget_percent,
        }
    }

    /// Lays them over a listener's configuration; false (and nothing changed) when a value
    /// is not one this version accepts.
    pub fn overlay(&self, l: &mut ListenerConfig) -> bool {
        let hash_key = match &self.hash_key {
            Some(text) => match crate::config::HashKey::from_text(text) {
                Some(k) => Some(k),
                None => return false,
            },
            None => None,
        };
        if !(1..=10).contains(&self.retry_attempts) || self.retry_budget_percent > 100 {
            return false;
        }
        l.hash_key = hash_key;
        l.retry.attempts = self.retry_attempts;
        l.retry.budget_percent = self.retry_budget_percent;
        true
    }
}

/// A replica's own report of itself (`replicas/R`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// Its name.
    pub replica: String,
    /// Its admin endpoint, if any.
    #[serde(default)]
    pub admin: Option<String>,
    /// Its process id.
    #[serde(default)]
    pub pid: u32,
    /// The store revision it has applied.
    pub applied_revision: i64,
    /// Each listener's plugin as applied (`PluginSpec::plugin`).
    #[serde(default)]
    pub plugins: BTreeMap<String, String>,
    /// lbwasm's version.
    #[serde(default)]
    pub version: String,
    /// When it started (Unix seconds).
    #[serde(default)]
    pub started: u64,
}

/// One listener's shared configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerSpec {
    /// The plugin, once written.
    pub plugin: Option<PluginSpec>,
    /// The shared balancing settings, once written.
    pub settings: Option<SettingsSpec>,
    /// The backends by address.
    pub backends: BTreeMap<SocketAddr, BackendSpec>,
}

/// What the mirror says: listeners, replicas, and what could not be read.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// Per listener name.
    pub listeners: BTreeMap<String, ListenerSpec>,
    /// Live replicas by name.
    pub replicas: BTreeMap<String, ReplicaInfo>,
    /// Keys whose values do not parse (`key: why`): logged and skipped, never half-applied.
    pub problems: Vec<String>,
}

impl Desired {
    /// Reads the mirror's keys.
    pub fn from_mirror(m: &Mirror) -> Desired {
        let mut d = Desired::default();
        for (key, e) in &m.entries {
            let bad = |why: String| format!("{key}: {why}");
            match keys::parse(key) {
                Key::Plugin(l) => match serde_json::from_slice::<PluginSpec>(&e.value) {
                    Ok(p) => d.listeners.entry(l.to_owned()).or_default().plugin = Some(p),
                    Err(err) => d.problems.push(bad(err.to_string())),
                },
                Key::Backend(l, a) => {
                    let addr = a.parse::<SocketAddr>();
                    let spec = serde_json::from_slice::<BackendSpec>(&e.value);
                    match (addr, spec) {
                        (Ok(addr), Ok(spec)) if spec.weight > 0 => {
                            d.listeners
                                .entry(l.to_owned())
                                .or_default()
                                .backends
                                .insert(addr, spec);
                        }
                        (Err(_), _) => d.problems.push(bad(format!("{a:?} is not IP:PORT"))),
                        (_, Err(err)) => d.problems.push(bad(err.to_string())),
                        (_, Ok(_)) => d.problems.push(bad("weight 0".into())),
                    }
                }
                Key::Settings(l) => match serde_json::from_slice::<SettingsSpec>(&e.value) {
                    Ok(v) => d.listeners.entry(l.to_owned()).or_default().settings = Some(v),
                    Err(err) => d.problems.push(bad(err.to_string())),
                },
                Key::Replica(r) => match serde_json::from_slice::<ReplicaInfo>(&e.value) {
                    Ok(info) => {
                        d.replicas.insert(r.to_owned(), info);
                    }
                    Err(err) => d.problems.push(bad(err.to_string())),
                },
                Key::Meta | Key::BlobChunk(..) | Key::Other => {}
            }
        }
        d
    }
}

/// A component to store: its digest (`sha256:HEX`) and bytes.
pub type Blob = (String, Vec<u8>);

/// A listener to seed: its name, its shared configuration, its component if uploaded.
pub type Seed = (String, ListenerSpec, Option<Blob>);

/// A listener of the configuration file as the cluster would share it, with the bytes of
/// its component when the plugin is a file (stored under its digest).
pub fn spec_of(l: &ListenerConfig) -> Result<(ListenerSpec, Option<Blob>)> {
    let (plugin, blob) = match &l.plugin {
        PluginRef::Builtin(name) => (name.clone(), None),
        PluginRef::File(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("listener {:?}: reading {}", l.name, path.display()))?;
            let digest = digest_of(&bytes);
            (digest.clone(), Some((digest, bytes)))
        }
    };
    let name = match &l.plugin {
        PluginRef::File(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
        PluginRef::Builtin(_) => None,
    };
    let spec = ListenerSpec {
        settings: Some(SettingsSpec::of(l)),
        plugin: Some(PluginSpec {
            plugin,
            name,
            options: l.plugin_options.iter().cloned().collect(),
        }),
        backends: l
            .backends
            .iter()
            .map(|b| {
                let spec = BackendSpec {
                    weight: b.weight,
                    max_connections: b.max_connections,
                    draining: false,
                    zone: None,
                    labels: BTreeMap::new(),
                };
                (b.address, spec)
            })
            .collect(),
    };
    Ok((spec, blob))
}

/// The keys and values that write `spec` as listener `name`'s.
pub fn listener_entries(name: &str, spec: &ListenerSpec) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(spec.backends.len() + 1);
    if let Some(p) = &spec.plugin {
        out.push((keys::plugin(name), json(p)));
    }
    if let Some(v) = &spec.settings {
        out.push((keys::settings(name), json(v)));
    }
    for (addr, b) in &spec.backends {
        out.push((keys::backend(name, *addr), json(b)));
    }
    out
}

/// A value as stored.
pub fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain data serializes")
}

/// Where a replica keeps the components it takes from the cluster (loaded as files).
pub fn blob_dir(state_file: &Path) -> PathBuf {
    let mut dir = state_file.as_os_str().to_owned();
    dir.push(".plugins");
    PathBuf::from(dir)
}

/// serde for bytes as base64 text.
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(v: &str, rev: i64) -> Entry {
        Entry {
            value: v.as_bytes().to_vec(),
            mod_revision: rev,
        }
    }

    #[test]
    fn desired_reads_listeners_and_refuses_bad_values() {
        let mut m = Mirror::default();
        m.entries.insert("meta".into(), entry("{}", 1));
        m.entries.insert(
            "listeners/web/plugin".into(),
            entry(r#"{"plugin":"maglev","options":{"table_size":"251"}}"#, 2),
        );
        m.entries.insert(
            "listeners/web/backends/127.0.0.1:80".into(),
            entry(r#"{"weight":3}"#, 3),
        );
        m.entries
            .insert("listeners/web/backends/nope".into(), entry(r#"{}"#, 4));
        m.entries.insert(
            "listeners/web/backends/127.0.0.1:81".into(),
            entry(r#"{"weight":0}"#, 5),
        );
        m.entries.insert(
            "listeners/web/backends/127.0.0.1:82".into(),
            entry(r#"{"wait":1}"#, 6),
        );
        let d = Desired::from_mirror(&m);
        let web = &d.listeners["web"];
        assert_eq!(web.plugin.as_ref().unwrap().plugin, "maglev");
        assert_eq!(web.backends.len(), 1);
        assert_eq!(web.backends[&"127.0.0.1:80".parse().unwrap()].weight, 3);
        assert_eq!(d.problems.len(), 3, "{:?}", d.problems);
        assert!(m.seeded());
    }

    #[test]
    fn blobs_reassemble_and_are_checked() {
        let bytes: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let digest = digest_of(&bytes);
        let mut m = Mirror::default();
        for (n, chunk) in bytes.chunks(1000).enumerate() {
            m.entries.insert(
                keys::blob_chunk(&digest, n),
                Entry {
                    value: chunk.to_vec(),
                    mod_revision: 1,
                },
            );
        }
        assert_eq!(m.blob(&digest).as_deref(), Some(&bytes[..]));
        m.entries.remove(&keys::blob_chunk(&digest, 1));
        assert_eq!(m.blob(&digest), None, "a missing chunk fails the digest");
        let path =
            std::env::temp_dir().join(format!("lbwasm-mirror-test-{}.json", std::process::id()));
        // A planted link at the temporary name is replaced, not followed.
        let victim = path.with_extension("victim");
        std::fs::write(&victim, "keep").unwrap();
        let _ = std::fs::remove_file(path.with_extension("tmp"));
        #[cfg(unix)]
        std::os::unix::fs::symlink(&victim, path.with_extension("tmp")).unwrap();
        m.save(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(Mirror::load(&path).unwrap(), m);
        // A snapshot others may write is refused.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
            let e = Mirror::load(&path).unwrap_err().to_string();
            assert!(e.contains("refused"), "{e}");
        }
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(victim);
    }
}
