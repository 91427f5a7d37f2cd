//! TLS, on rustls with the `ring` provider: termination on listeners with certificates
//! chosen by SNI and reloaded without dropping a connection ([`server`]), TLS and mTLS to
//! backends ([`client`]), a session shared by reference between a request's tasks
//! ([`conn`]), and the ClientHello read without terminating, for SNI routing ([`hello`]).
//! Knows nothing of the rest of the proxy: configuration holds its settings types.

pub mod certs;
pub mod client;
pub mod conn;
pub mod hello;
pub mod server;

use std::sync::Arc;

pub use certs::{CertError, CertSpec, Part};
pub use client::{BackendTls, Upstream};
pub use conn::TlsConn;
pub use server::{CertInfo, Failure, ListenerTls, Terminator, TlsVersion};

/// The one crypto provider: ring (builds in a fraction of aws-lc-rs's time).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
