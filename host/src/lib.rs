//! lbwasm: a load balancer whose balancing algorithms are sandboxed WebAssembly components.
//!
//! The data path reads top-down: listener ([`proxy`]) → pick ([`plugin`]) → forward →
//! record ([`metrics`]). The pool and its health live in [`pool`] and [`health`].

pub mod admin;
pub mod backend;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod fields;
pub mod health;
pub mod metrics;
pub mod plugin;
pub mod pool;
pub mod proxy;
pub mod serve;
pub mod simulate;
