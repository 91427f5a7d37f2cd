//! Cluster mode: what replicas share through etcd v3, and how it is read and written.
//!
//! No consensus is written here: etcd is the one source of truth, and every replica —
//! including the one an admin call reached — applies changes only from its watch, so all
//! converge through the same sequence of revisions. Applying is the control plane's
//! ([`crate::serve`]); this module knows the key layout ([`keys`]), the shared state and
//! its JSON ([`state`]), and etcd ([`store`]).
//!
//! # Key layout, under `/lbwasm/NAME/`
//!
//! | key | value (JSON unless said) | written by |
//! |---|---|---|
//! | `meta` | `{"format":1,"seeded_by":R,"at":UNIX}` — the cluster exists | the first seed |
//! | `listeners/L/plugin` | `{"plugin":"round_robin" or "sha256:HEX","name":…,"options":{…}}` | seed, `POST /plugin` |
//! | `listeners/L/settings` | `{"hash_key":"header:x-user","retry_attempts":3,"retry_budget_percent":20}` | seed |
//! | `listeners/L/backends/ADDR` | `{"weight":1,"max_connections":0,"draining":false,"zone":…,"labels":{…}}` | seed, `/backends/add`, `/drain`, `/remove` (deletes) |
//! | `plugins/sha256:HEX/NNN` | raw bytes: chunk NNN (1 MiB each) of an uploaded component | `POST /plugin/upload`, seed of a `.wasm` |
//! | `replicas/R` | `{"replica":R,"admin":…,"applied_revision":N,"plugins":{L:…},…}` under the replica's lease | each replica |
//!
//! Every write of shared state is a transaction compared on the `mod_revision` the writer
//! last applied (or on absence), so two concurrent edits of one key cannot both land: the
//! second is refused ([`store::Commit::Conflict`]) and the admin API answers 409.

pub mod command;
pub mod keys;
pub mod state;
pub mod store;

pub use state::{
    BackendSpec, Desired, Entry, ListenerSpec, Mirror, PluginSpec, ReplicaInfo, SettingsSpec,
};
pub use store::{Commit, Expect, Store, StoreError};
