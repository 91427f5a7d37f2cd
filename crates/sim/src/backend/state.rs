//! A backend server's state, shared by its tasks and its handle: counters and gauges, the
//! request-processing knobs the HTTP and TCP protocols share ([`Shared::process`]), the
//! memory ballast, and the figures `GET /load` and `GET /stats` report.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hyper::header::HeaderValue;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

use super::config::{BackendConfig, Fault};
use super::load::{self, CpuMeter};

/// A point-in-time copy of a server's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BackendStats {
    /// Workload requests answered (including injected 500s); `/load` and `/heartbeat`
    /// are not counted.
    pub requests: u64,
    /// Workload requests answered 500 (error rate or `error` fault).
    pub errors: u64,
    /// Workload requests in flight: queued, processing or streaming their response. This
    /// is what `/load` reports as `connections`.
    pub active_connections: u32,
    /// Highest `active_connections` seen.
    pub peak_active_connections: u32,
    /// Open TCP connections.
    pub open_connections: u32,
    /// Requests holding a capacity slot (in latency or CPU work) right now.
    pub processing: u32,
    /// Highest `processing` seen: never above `capacity` when one is set.
    pub peak_processing: u32,
    /// Requests waiting for a capacity slot right now.
    pub queued: u32,
    /// Highest `queued` seen.
    pub peak_queued: u32,
    /// This server's own CPU over the last ~1 s, percent of one core (see `load`).
    pub cpu_percent: f32,
}

/// The body of `GET /load`: what a load-aware balancer reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub server: String,
    /// This server's own CPU over the last ~1 s, percent of one core.
    pub cpu_percent: f32,
    /// Process resident memory (less other servers' ballast) / available memory × 100.
    pub memory_percent: f32,
    /// Workload requests in flight on this server.
    pub connections: u32,
    /// Workload requests answered so far.
    pub requests: u64,
    /// Whole-process CPU from sysinfo, percent of one core.
    pub process_cpu_percent: f32,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Gauge {
    Active,
    Processing,
    Queued,
    Connections,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    active: AtomicU32,
    peak_active: AtomicU32,
    processing: AtomicU32,
    peak_processing: AtomicU32,
    queued: AtomicU32,
    peak_queued: AtomicU32,
    connections: AtomicU32,
}

impl Counters {
    fn gauge(&self, g: Gauge) -> (&AtomicU32, Option<&AtomicU32>) {
        match g {
            Gauge::Active => (&self.active, Some(&self.peak_active)),
            Gauge::Processing => (&self.processing, Some(&self.peak_processing)),
            Gauge::Queued => (&self.queued, Some(&self.peak_queued)),
            Gauge::Connections => (&self.connections, None),
        }
    }
}

/// Holds one unit of a gauge; gives it back when dropped (also on cancellation).
#[derive(Debug)]
pub(crate) struct GaugeGuard {
    shared: Arc<Shared>,
    gauge: Gauge,
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.shared
            .counters
            .gauge(self.gauge)
            .0
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resident memory held for `--memory-mb`.
#[derive(Debug)]
struct Ballast(Vec<u8>);

impl Ballast {
    async fn allocate(mb: u64) -> anyhow::Result<Self> {
        let bytes = usize::try_from(mb.saturating_mul(1 << 20)).context("--memory-mb too large")?;
        if bytes == 0 {
            return Ok(Self(Vec::new()));
        }
        let v = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
            let mut v = Vec::new();
            v.try_reserve_exact(bytes)
                .with_context(|| format!("--memory-mb {mb}: out of memory"))?;
            // Touch every page so the ballast is resident, not just reserved.
            v.resize(bytes, 0xA5);
            Ok(v)
        })
        .await
        .context("allocating --memory-mb")??;
        load::BALLAST_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(Self(v))
    }

    fn bytes(&self) -> u64 {
        self.0.len() as u64
    }
}

impl Drop for Ballast {
    fn drop(&mut self) {
        load::BALLAST_BYTES.fetch_sub(self.bytes(), Ordering::Relaxed);
    }
}

/// What the knobs decided for one workload request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    /// Answer 500.
    Error,
    /// The server is down: drop the request.
    Down,
}

/// State shared by a server's tasks and its handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) id: String,
    pub(crate) served_by: HeaderValue,
    pub(crate) cfg: BackendConfig,
    pub(crate) started: Instant,
    counters: Counters,
    pub(crate) meter: Arc<CpuMeter>,
    pub(crate) fault_override: Mutex<Option<Fault>>,
    pub(crate) fault_tx: watch::Sender<Option<Fault>>,
    rng: Mutex<SmallRng>,
    capacity: Option<Semaphore>,
    ballast: Ballast,
}

impl Shared {
    /// The state of server `id` (`served_by` as a header value) run with `cfg`; allocates
    /// its memory ballast.
    pub(crate) async fn new(
        cfg: BackendConfig,
        id: String,
        served_by: HeaderValue,
    ) -> anyhow::Result<Arc<Self>> {
        let ballast = Ballast::allocate(cfg.memory_mb).await?;
        let seed = cfg.seed.unwrap_or_else(rand::random);
        let capacity = (cfg.capacity > 0).then(|| Semaphore::new(cfg.capacity));
        let (fault_tx, _) = watch::channel(None);
        Ok(Arc::new(Shared {
            id,
            served_by,
            cfg,
            started: Instant::now(),
            counters: Counters::default(),
            meter: Arc::new(CpuMeter::new()),
            fault_override: Mutex::new(None),
            fault_tx,
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            capacity,
            ballast,
        }))
    }

    pub(crate) fn enter(self: &Arc<Self>, gauge: Gauge) -> GaugeGuard {
        let (now, peak) = self.counters.gauge(gauge);
        let n = now.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(peak) = peak {
            peak.fetch_max(n, Ordering::AcqRel);
        }
        GaugeGuard {
            shared: self.clone(),
            gauge,
        }
    }

    /// The fault in force now.
    pub(crate) fn fault(&self) -> Option<Fault> {
        *self.fault_tx.borrow()
    }

    /// Recomputes the fault in force (override, else the scheduled window) and publishes it.
    pub(crate) fn refresh_fault(&self) -> Option<Fault> {
        let over = self
            .fault_override
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let t = self.started.elapsed();
        let fault = over.or_else(|| {
            self.cfg
                .faults
                .iter()
                .find(|w| w.contains(t))
                .map(|w| w.fault)
        });
        let changed = self.fault_tx.send_if_modified(|cur| {
            let changed = *cur != fault;
            *cur = fault;
            changed
        });
        if changed {
            tracing::info!(server = %self.id, fault = ?fault, "fault changed");
        }
        fault
    }

    /// Applies the knobs to one workload request: fault, capacity queue, latency, CPU
    /// work, error rate (drawn after the work, so an injected 500 costs as much as a
    /// success; an `error` fault answers at once).
    pub(crate) async fn process(self: &Arc<Self>) -> Outcome {
        let mut extra = Duration::ZERO;
        match self.fault() {
            Some(Fault::Down) => return Outcome::Down,
            Some(Fault::Error) => {
                self.count(true);
                return Outcome::Error;
            }
            Some(Fault::Slow(d)) => extra = d,
            None => {}
        }
        let _permit = match &self.capacity {
            Some(sem) => {
                let _queued = self.enter(Gauge::Queued);
                match sem.acquire().await {
                    Ok(permit) => Some(permit),
                    Err(_) => return Outcome::Down,
                }
            }
            None => None,
        };
        let _busy = self.enter(Gauge::Processing);
        let (jitter, fail) = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            let jitter_ns = u64::try_from(self.cfg.latency_jitter.as_nanos()).unwrap_or(u64::MAX);
            let jitter = if jitter_ns > 0 {
                rng.random_range(0..=jitter_ns)
            } else {
                0
            };
            let fail = self.cfg.error_rate > 0.0 && rng.random::<f64>() < self.cfg.error_rate;
            (Duration::from_nanos(jitter), fail)
        };
        let delay = self.cfg.latency + jitter + extra;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if !self.cfg.cpu_work.is_zero() {
            let meter = self.meter.clone();
            let work = self.cfg.cpu_work;
            if let Err(error) = tokio::task::spawn_blocking(move || meter.burn(work)).await {
                tracing::warn!(server = %self.id, %error, "cpu work failed");
            }
        }
        self.count(fail);
        if fail { Outcome::Error } else { Outcome::Ok }
    }

    fn count(&self, error: bool) {
        self.counters.requests.fetch_add(1, Ordering::AcqRel);
        if error {
            self.counters.errors.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub(crate) fn stats(&self) -> BackendStats {
        let c = &self.counters;
        BackendStats {
            requests: c.requests.load(Ordering::Acquire),
            errors: c.errors.load(Ordering::Acquire),
            active_connections: c.active.load(Ordering::Acquire),
            peak_active_connections: c.peak_active.load(Ordering::Acquire),
            open_connections: c.connections.load(Ordering::Acquire),
            processing: c.processing.load(Ordering::Acquire),
            peak_processing: c.peak_processing.load(Ordering::Acquire),
            queued: c.queued.load(Ordering::Acquire),
            peak_queued: c.peak_queued.load(Ordering::Acquire),
            cpu_percent: self.meter.percent(),
        }
    }

    pub(crate) fn load_report(&self) -> LoadReport {
        let fig = load::process_figures();
        LoadReport {
            server: self.id.clone(),
            cpu_percent: self.meter.percent(),
            memory_percent: load::memory_percent(&fig, self.ballast.bytes()),
            connections: self.counters.active.load(Ordering::Acquire),
            requests: self.counters.requests.load(Ordering::Acquire),
            process_cpu_percent: fig.cpu_percent,
        }
    }
}
