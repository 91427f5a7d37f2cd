//! Managed backends: processes the proxy starts (`command` with `{port}`), adds to the pool
//! once they answer a check, restarts with back-off when they exit (re-adding them when
//! they answer again), and stops — SIGTERM by PID, SIGKILL after a grace period — on
//! shutdown or removal.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::config::{HealthKind, Managed};
use crate::pool::Backend;
use crate::proxy::ListenerShared;

/// How long a new process may take to answer its first check.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// A process that ran this long before exiting restarts after the initial back-off again.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Longest back-off between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

/// One managed instance, for the control plane's registry.
pub(crate) struct Instance {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// `true` stops it (and its process).
    pub(crate) stop: watch::Sender<bool>,
    /// The supervisor; ends after the process is gone.
    pub(crate) task: tokio::task::JoinHandle<()>,
}

/// Starts supervising an instance on `port`, on `runtime`.
pub(crate) fn start(
    runtime: &tokio::runtime::Handle,
    listener: Arc<ListenerShared>,
    spec: Managed,
    port: u16,
) -> Instance {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let (stop, rx) = watch::channel(false);
    let task = runtime.spawn(supervise(listener, spec, addr, rx));
    Instance { addr, stop, task }
}

enum Ready {
    Yes,
    Exited(String),
    Late,
    Stopped,
}

async fn supervise(
    listener: Arc<ListenerShared>,
    spec: Managed,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let name = listener.name.clone();
    let mut backoff = spec.restart_backoff;
    loop {
        let argv = spec.command_for(addr.port());
        let started = Instant::now();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        match cmd.spawn() {
            Err(error) => {
                tracing::error!(listener = %name, backend = %addr, command = ?argv, %error, "cannot start managed backend")
            }
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                tracing::info!(listener = %name, backend = %addr, pid, "managed backend started");
                match wait_ready(&listener, &mut child, addr, &mut stop).await {
                    Ready::Yes => {
                        mark_up(&listener, addr);
                        tokio::select! {
                            status = child.wait() => {
                                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                                tracing::warn!(listener = %name, backend = %addr, pid, %status, "managed backend exited; restarting");
                                mark_down(&listener, addr);
                            }
                            _ = stop.changed() => {
                                terminate(&mut child, &name, addr).await;
                                return;
                            }
                        }
                    }
                    Ready::Exited(status) => {
                        tracing::warn!(listener = %name, backend = %addr, pid, %status, "managed backend exited before answering a check");
                    }
                    Ready::Late => {
                        tracing::warn!(listener = %name, backend = %addr, pid, "managed backend did not answer a check in time; restarting");
                        terminate(&mut child, &name, addr).await;
                    }
                    Ready::Stopped => {
                        terminate(&mut child, &name, addr).await;
                        return;
                    }
                }
            }
        }
        backoff = if started.elapsed() >= STABLE_AFTER {
            spec.restart_backoff
        } else {
            (backoff * 2).min(MAX_BACKOFF)
        };
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Probes the new process (the listener's check, else a TCP connect) until it answers.
async fn wait_ready(
    listener: &ListenerShared,
    child: &mut Child,
    addr: SocketAddr,
    stop: &mut watch::Receiver<bool>,
) -> Ready {
    let deadline = Instant::now() + READY_WITHIN;
    let (kind, timeout) = match &listener.settings.load().health {
        Some(hc) => (hc.kind.clone(), hc.timeout),
        None => (HealthKind::Tcp, Duration::from_secs(1)),
    };
    loop {
        if *stop.borrow() {
            return Ready::Stopped;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Ready::Exited(status.to_string());
        }
        if crate::health::probe(addr, listener.upstream.as_deref(), &kind, timeout).await {
            return Ready::Yes;
        }
        if Instant::now() >= deadline {
            return Ready::Late;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return Ready::Stopped,
        }
    }
}

fn mark_up(listener: &ListenerShared, addr: SocketAddr) {
    match listener.pool.find(addr) {
        Some(b) => listener.pool.update_one(&b, |st| {
            st.process_up = true;
            st.active_up = true;
            st.warming_since = Some(Instant::now());
        }),
        None => {
            listener.pool.add(Backend::new(addr, 1, 0));
        }
    }
    tracing::info!(listener = %listener.name, backend = %addr, "managed backend in the pool");
}

fn mark_down(listener: &ListenerShared, addr: SocketAddr) {
    if let Some(b) = listener.pool.find(addr) {
        listener.pool.update_one(&b, |st| st.process_up = false);
    }
}

/// SIGTERM by PID, then SIGKILL if it is still there after the grace period.
async fn terminate(child: &mut Child, listener: &str, addr: SocketAddr) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a PID we spawned and have not reaped (the Child still holds
        // it, so it cannot have been recycled) has no memory effects.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(GRACE, child.wait()).await.is_ok() {
            tracing::info!(%listener, backend = %addr, pid, "managed backend stopped");
            return;
        }
    }
    let _ = child.kill().await;
    tracing::info!(%listener, backend = %addr, "managed backend killed");
}
