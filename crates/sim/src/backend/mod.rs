//! `lbwasm backend`: demo backend servers that report their real load, with knobs
//! (latency, CPU work, capacity, error rate, fault windows) to make balancing visible.
//!
//! Endpoints (HTTP/1.1 and HTTP/2 prior knowledge on one port, keep-alive), every
//! response carrying `x-served-by: <id>`:
//! - `GET /load` → [`LoadReport`] as JSON; never subject to knobs or faults (short of
//!   `down`), so a balancer can read an overloaded server's load;
//! - `GET /heartbeat` → `200 ok`; sees faults only (`error` → 500, `slow` → late,
//!   `down` → connection refused);
//! - `GET /home` → `{"message": "Hello from Server: <id>", "status": "successful"}`;
//! - `GET` anything else → `"<method> <path> served by <id>\n"`;
//! - `POST` anything → the request body streamed back;
//! - gRPC (`POST`, `content-type: application/grpc*`) → the request's messages echoed,
//!   trailer `grpc-status: 0`; `grpc.health.v1.Health/Check` → `SERVING` (details in `http.rs`).
//!
//! `--orca text|json|bin` adds an ORCA load report to every response (see [`orca`]).
//!
//! The knobs apply to the workload requests (`GET` other than `/load` and `/heartbeat`,
//! and `POST`), in this order: fault, capacity queue, latency + jitter (+ `slow` fault
//! latency), CPU work, error-rate draw. CPU work is real: `--cpu-work-us` of thread CPU
//! time burnt on a tokio blocking thread (not inline, so that it never stalls the other
//! servers or the balancer sharing the runtime), while holding the capacity slot.
//! What `cpu_percent` measures is documented in [`load`]; `--tcp` is described in [`tcp`].

pub mod config;
mod http;
pub mod load;
pub mod orca;
mod server;
mod state;
pub mod tcp;

use anyhow::Context as _;

pub use config::{BackendArgs, BackendConfig, Fault, FaultKind, FaultSpec, FaultWindow, Protocol};
pub use http::SERVED_BY;
pub use orca::{OrcaFigures, OrcaFormat};
pub use server::{BackendHandle, spawn};
pub use state::{BackendStats, LoadReport};

/// The CLI entry: starts every server the flags ask for, prints
/// `backend <id> listening on <addr>` for each, and serves until Ctrl-C or SIGTERM.
pub async fn run(args: BackendArgs) -> anyhow::Result<()> {
    let mut handles = Vec::new();
    for cfg in args.to_configs()? {
        let port = cfg.port;
        let handle = spawn(cfg)
            .await
            .with_context(|| format!("starting backend on port {port}"))?;
        println!("backend {} listening on {}", handle.id(), handle.addr());
        handles.push(handle);
    }
    shutdown_signal().await?;
    tracing::info!(servers = handles.len(), "stopping backends");
    for handle in &handles {
        handle.shutdown().await;
    }
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::select! {
            res = tokio::signal::ctrl_c() => res.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
