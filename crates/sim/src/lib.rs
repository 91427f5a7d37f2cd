//! `lbwasm backend` and `lbwasm simulate`: demo backends that report their real load, and
//! the simulator that runs backends, the proxy and clients on loopback and reports.
//!
//! Its own crate so that the proxy never links plotters, indicatif or sysinfo, and editing
//! the simulator never rebuilds the proxy.

pub mod backend;
pub mod simulate;
