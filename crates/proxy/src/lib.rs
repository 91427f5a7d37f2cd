//! lbwasm's proxy: configuration, the pool and its health, the data path, metrics, and the
//! control plane that runs it all ([`serve`]).
//!
//! The data path reads top-down: listener ([`proxy`]) → pick (the plugin host,
//! `lbwasm-plugin-host`) → forward → record ([`metrics`]). The pool and its health live in
//! [`pool`] and [`health`]. Nothing here speaks the admin API's HTTP: [`serve::Control`] is
//! typed, and `lbwasm-admin` maps it to HTTP.

pub mod cluster;
pub mod config;
pub mod discovery;
pub mod health;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod serve;
pub mod tls;
