//! Cluster mode in the configuration: the `[cluster]` table (and `--etcd`, `--cluster`,
//! `--replica`, `--cluster-state`), which says where the shared configuration lives. The
//! file keeps what is local to a replica; pools and plugins are the cluster's
//! ([`crate::cluster`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

// Cluster and replica names become parts of etcd keys: a listener name's characters (no
// `/`) fit.
use super::leaf::{ListenerName, NonEmpty, Positive, Text};
use super::value::{At, Item, List};

/// `[cluster]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCluster {
    pub name: Option<At<ListenerName>>,
    pub etcd: Option<List<At<EtcdUrl>>>,
    pub replica: Option<At<ListenerName>>,
    pub state_file: Option<At<NonEmpty>>,
    pub lease_ttl: Option<At<Positive>>,
    pub username: Option<At<NonEmpty>>,
    pub password: Option<At<NonEmpty>>,
    pub ca: Option<At<NonEmpty>>,
    pub cert: Option<At<NonEmpty>>,
    pub key: Option<At<NonEmpty>>,
}

impl Item for At<EtcdUrl> {
    const ARRAY: &'static str = "an array of etcd endpoints (\"http://127.0.0.1:2379\")";
}

/// An etcd endpoint: `http://HOST:PORT` or `https://HOST:PORT`.
pub(super) struct EtcdUrl;

impl Text for EtcdUrl {
    type Value = String;
    const WHAT: &'static str = "an etcd endpoint such as \"http://127.0.0.1:2379\"";
    fn parse(text: &str) -> Option<String> {
        let rest = text
            .strip_prefix("http://")
            .or_else(|| text.strip_prefix("https://"))?;
        let (host, port) = rest.trim_end_matches('/').rsplit_once(':')?;
        let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
        (!host.is_empty() && !host.contains('/') && port_ok)
            .then(|| text.trim_end_matches('/').to_owned())
    }
}

/// Where a replica finds the cluster's shared configuration, and who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The cluster's name: its keys live under `/lbwasm/NAME/`.
    pub name: String,
    /// etcd endpoints (`http://` or `https://`), at least one.
    pub endpoints: Vec<String>,
    /// This replica's name in `/lbwasm/NAME/replicas/`; default the host name, so a
    /// restarted replica (a pod keeps its name) finds its own saved snapshot.
    pub replica: String,
    /// Where the last applied configuration is saved, to start from when etcd is down;
    /// default `lbwasm-cluster-NAME-REPLICA.json` in the temporary directory.
    pub state_file: PathBuf,
    /// Liveness lease of the replica's key (default 5 s): a replica that stops renewing
    /// disappears from the cluster that long after.
    pub lease_ttl: Duration,
    /// etcd authentication: user name and password (`password`, or `LBWASM_ETCD_PASSWORD`).
    pub user: Option<(String, String)>,
    /// CA certificate (PEM) that etcd's certificate must chain to (https endpoints).
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClusterConfig {
    /// The default replica name: the host name (as Kubernetes sets it to the pod's name).
    pub fn default_replica() -> String {
        let from_file = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok());
        let name: String = from_file
            .unwrap_or_default()
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
            .collect();
        if name.is_empty() {
            "replica".to_owned()
        } else {
            name
        }
    }

    /// The default `state_file` for a cluster and replica.
    pub fn default_state_file(name: &str, replica: &str) -> PathBuf {
        std::env::temp_dir().join(format!("lbwasm-cluster-{name}-{replica}.json"))
    }
}

/// Environment variable read for the etcd password when the file gives none (so that it
/// need not be written in a ConfigMap).
pub const PASSWORD_ENV: &str = "LBWASM_ETCD_PASSWORD";

impl super::HashKey {
    /// Reads the text form (`header:NAME`, `cookie:NAME`, `path`, `client-ip`, `sni`), as
    /// the cluster stores it.
    pub fn from_text(text: &str) -> Option<super::HashKey> {
        <super::HashKey as Text>::parse(text)
    }

    /// The text form, as the file writes it.
    pub fn to_text(&self) -> String {
        match self {
            super::HashKey::Header(n) => format!("header:{n}"),
            super::HashKey::Cookie(n) => format!("cookie:{n}"),
            super::HashKey::Path => "path".into(),
            super::HashKey::ClientIp => "client-ip".into(),
            super::HashKey::Sni => "sni".into(),
        }
    }
}
