//! What [`Control`](super::Control)'s operations answer: plain data that derives
//! `Serialize`, so that an embedder reads fields and the admin API sends the same values as
//! JSON. Field names are the admin API's; renaming one changes the API.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::pool::{Backend, BackendState};
use lbwasm_plugin_host::{Plugin, ServerInfo};

/// `GET /backends`: every listener, in configuration order.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// One per listener.
    pub listeners: Vec<ListenerReport>,
    /// Cluster mode: the cluster, this replica's connection and every live replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<super::ClusterReport>,
}

/// A listener, its plugin and its backends as the workers see them now.
#[derive(Clone, Debug, Serialize)]
pub struct ListenerReport {
    /// Its configured name.
    pub name: String,
    /// The bound address (port 0 resolved).
    pub listen: SocketAddr,
    /// `http` or `tcp`.
    pub protocol: String,
    /// The plugin's name.
    pub plugin: String,
    /// The published snapshot's generation: changes whenever the pool does.
    pub generation: u64,
    /// Backends that may take new requests.
    pub healthy: usize,
    /// Every member, in the order plugins see them.
    pub backends: Vec<BackendReport>,
    /// A TLS listener's certificates (names, serial, expiry); absent in cleartext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Vec<crate::tls::CertInfo>>,
}

/// One backend: what plugins were told about it, its control-plane state and its live
/// figures. Built in one place ([`BackendReport::new`]) for the API and the dashboard.
#[derive(Clone, Debug, Serialize)]
pub struct BackendReport {
    /// Process-wide id.
    pub id: u32,
    /// `host:port`.
    pub address: String,
    /// Configured weight.
    pub weight: u32,
    /// Connection limit (0 = none).
    pub max_connections: u32,
    /// May take new requests.
    pub healthy: bool,
    /// Being drained.
    pub draining: bool,
    /// Passively ejected.
    pub ejected: bool,
    /// Active checks say up.
    pub checks_up: bool,
    /// One of a managed pool's processes.
    pub managed: bool,
    /// Slow-start factor, 0.1..=1.
    pub warmup: f32,
    /// Requests (or connections) in flight.
    pub in_flight: u32,
    /// Completed requests.
    pub requests: u64,
    /// Failed requests.
    pub failures: u64,
    /// Peak-EWMA latency, µs (0 = no sample yet).
    pub latency_us: u32,
    /// Latest load report: CPU %.
    pub cpu_percent: Option<f32>,
    /// Latest load report: memory %.
    pub memory_percent: Option<f32>,
    /// Latest load report: the backend's connections from every client.
    pub connections: Option<u32>,
    /// Load reports received.
    pub load_samples: u64,
    /// A managed backend's process is running and has answered (not in the API's JSON,
    /// which predates it; [`BackendReport::status`] uses it).
    #[serde(skip)]
    pub process_up: bool,
    /// The DNS source (`dns://…`, `dns+srv://…`) that added it; absent for any other.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
}

impl BackendReport {
    /// `backend` as published in `info`, with its state now.
    pub(crate) fn new(backend: &Backend, info: &ServerInfo, managed: bool) -> Self {
        let st: BackendState = backend.current_state();
        BackendReport {
            id: backend.id,
            address: backend.address().to_string(),
            weight: info.weight,
            max_connections: info.max_connections,
            healthy: info.healthy,
            draining: st.draining,
            ejected: st.ejected_until.is_some(),
            checks_up: st.active_up,
            managed,
            warmup: info.warmup,
            in_flight: backend.in_flight(),
            requests: backend.requests(),
            failures: backend.failures(),
            latency_us: backend.latency_us(),
            cpu_percent: info.cpu_percent,
            memory_percent: info.memory_percent,
            connections: info.backend_connections,
            load_samples: info.load_sample,
            process_up: st.process_up,
            dns: None,
        }
    }

    /// One word for an operator, most telling first: `draining`, `ejected`, `down`,
    /// `warming` or `up`.
    pub fn status(&self) -> &'static str {
        if self.draining {
            "draining"
        } else if self.ejected {
            "ejected"
        } else if !self.checks_up || !self.process_up {
            "down"
        } else if self.warmup < 1.0 {
            "warming"
        } else {
            "up"
        }
    }
}

/// A listener read at one instant: its report and, index for index, the live objects it
/// was read from, for a reader that also takes figures from them (the dashboard takes each
/// backend's latency window and the plugin's statistics).
pub struct ListenerState {
    /// What `GET /backends` shows of it.
    pub report: ListenerReport,
    /// `report.backends`' backends, in the same order.
    pub backends: Vec<Arc<Backend>>,
    /// The plugin in place when it was read.
    pub plugin: Arc<Plugin>,
}

/// A listener's plugin as it describes itself.
#[derive(Clone, Debug, Serialize)]
pub struct PluginReport {
    /// The listener's name.
    pub name: String,
    /// The plugin's name.
    pub plugin: String,
    /// What the plugin says of itself.
    pub description: String,
}

/// `POST /backends/add`.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum AddReport {
    /// Static backends by address.
    Static(Added),
    /// More processes of a managed pool.
    Managed(Starting),
}

/// Static backends added (or taken back from draining).
#[derive(Clone, Debug, Serialize)]
pub struct Added {
    /// The listener.
    pub listener: String,
    /// New members, and draining ones taken back.
    pub added: Vec<AddedBackend>,
    /// Addresses that were members already (and not draining).
    pub already_members: Vec<String>,
}

/// A backend [`Added`] to the pool or taken back.
#[derive(Clone, Debug, Serialize)]
pub struct AddedBackend {
    /// Its id.
    pub id: u32,
    /// `host:port`.
    pub address: String,
    /// It was draining and takes new requests again (absent from the JSON when false).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub undrained: bool,
}

/// Managed processes started: each joins the pool once it answers a check.
#[derive(Clone, Debug, Serialize)]
pub struct Starting {
    /// The listener.
    pub listener: String,
    /// `127.0.0.1:PORT` of each process started.
    pub starting: Vec<String>,
    /// What happens next, for a reader of the JSON.
    pub note: &'static str,
}

/// A backend taken out of rotation (removed or draining), with what it still has in flight.
#[derive(Clone, Debug, Serialize)]
pub struct Leaving {
    /// Its id.
    pub id: u32,
    /// `host:port`.
    pub address: String,
    /// Requests still in flight; they finish.
    pub in_flight: u32,
}

impl Leaving {
    pub(crate) fn new(b: &Backend) -> Self {
        Leaving {
            id: b.id,
            address: b.address().to_string(),
            in_flight: b.in_flight(),
        }
    }
}

/// `POST /backends/remove`.
#[derive(Clone, Debug, Serialize)]
pub struct Removed {
    /// The listener.
    pub listener: String,
    /// The backends removed.
    pub removed: Vec<Leaving>,
    /// Managed processes stopped with them (`host:port`).
    pub stopped_processes: Vec<String>,
}

/// `POST /backends/drain`.
#[derive(Clone, Debug, Serialize)]
pub struct Draining {
    /// The listener.
    pub listener: String,
    /// The backends now draining.
    pub draining: Vec<Leaving>,
}

/// `POST /plugin`: the plugin swapped in and the one it replaced.
#[derive(Clone, Debug, Serialize)]
pub struct PluginSwapped {
    /// The listener.
    pub listener: String,
    /// The new plugin's name.
    pub plugin: String,
    /// What the new plugin says of itself.
    pub description: String,
    /// The replaced plugin's name.
    pub previous: String,
}

/// `GET /pick`: the backend the plugin would choose.
#[derive(Clone, Debug, Serialize)]
pub struct Picked {
    /// The listener.
    pub listener: String,
    /// `host:port` of the chosen backend.
    pub backend: String,
    /// Its id.
    pub id: u32,
    /// The plugin asked.
    pub plugin: String,
    /// `plugin`, or `fallback (why)` when the host's fallback chose.
    pub picked_by: String,
}

/// `POST /reload`: what was applied, and what needs a restart.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadReport {
    /// One line per change applied.
    pub changes: Vec<String>,
    /// One line per change that needs a restart (not applied).
    pub warnings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_most_telling_state() {
        let b = Backend::new("127.0.0.1:1".parse().unwrap(), 1, 0);
        let mut r = BackendReport::new(&b, &ServerInfo::new(b.id, b.address()), false);
        assert_eq!(r.status(), "up");
        r.warmup = 0.5;
        assert_eq!(r.status(), "warming");
        r.warmup = 1.0;
        r.process_up = false;
        assert_eq!(r.status(), "down");
        r.process_up = true;
        r.checks_up = false;
        assert_eq!(r.status(), "down");
        r.ejected = true;
        assert_eq!(r.status(), "ejected");
        r.draining = true;
        assert_eq!(r.status(), "draining");
    }
}
