//! Helpers shared by the integration tests: one implementation of each, so that a fix to
//! how a test starts the binary, waits for a port or reads a reply reaches every test.
//! What is here is only plumbing (processes, sockets, configurations, time bounds); what a
//! test asserts stays in the test. Nothing here listens beyond 127.0.0.1 port 0, and every
//! process started here is killed by its PID.
//!
//! - [`process`]: the real `lbwasm` binary, started, read, signalled and reaped;
//! - [`http`]: requests through a hyper client, or written byte for byte;
//! - [`h2`]: h2c backends, one multiplexed client connection, gRPC framing;
//! - [`backends`]: demo backends and hand-written test servers;
//! - [`config`]: configuration text for an in-process [`lbwasm::serve::Server`];
//! - [`etcd`]: a real etcd on 127.0.0.1 for the cluster tests;
//! - [`dns`]: an in-process DNS server whose answers a test changes;
//! - [`proxy`]: an in-process proxy and its admin API;
//! - [`plugins`]: plugin options.

// Each test binary compiles this whole module but uses only part of it; what one binary
// leaves unused another uses, so the lint would only report that sharing.
#![allow(dead_code)]

pub mod backends;
pub mod config;
pub mod dns;
pub mod etcd;
pub mod h2;
pub mod http;
pub mod plugins;
pub mod process;
pub mod proxy;
pub mod tls;

use std::future::Future;
use std::time::{Duration, Instant};

/// The bound of a test that sets none: generous, only there to turn a hang into a failure.
pub const LIMIT: Duration = Duration::from_secs(120);

/// How long [`eventually`] waits: well inside [`LIMIT`], so that its message (what never
/// happened) is the one a test fails with.
pub const EVENTUALLY: Duration = Duration::from_secs(60);

/// How often [`until`] looks again.
const POLL: Duration = Duration::from_millis(50);

/// Runs `test`, failing it if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, test: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, test)
        .await
        .expect("test timed out")
}

/// Runs `test` within [`LIMIT`].
pub async fn bounded(test: impl Future<Output = ()>) {
    within(LIMIT, test).await;
}

/// Polls `check` until it gives a value, failing after `limit` with `what` never happened.
pub async fn until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "never happened within {limit:?}: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it holds, for up to [`EVENTUALLY`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    until(what, EVENTUALLY, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await;
}
