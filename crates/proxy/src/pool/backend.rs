//! [`Backend`]: one upstream server with its live figures, and [`InFlight`], the guard that
//! keeps those figures honest whatever happens to the request.
//!
//! Workers touch only atomics here (in-flight, counters, peak-EWMA, the passive failure
//! streak), kept together on a cache line of their own so that the read-mostly fields
//! beside them are not invalidated by every request, plus one short lock of their own
//! thread's shard of the latency window the dashboard reads each second (no lock shared
//! between workers); the health state behind the mutex is the control plane's, read when
//! a snapshot is built — never per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use lbwasm_plugin_host::ServerLoad;

use super::in_flight::{Cell, Row, SHARDS, shard};

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

/// Microseconds on a process-wide monotonic clock (the peak-EWMA's time base).
pub(crate) fn clock_us() -> u64 {
    clock_us_at(Instant::now())
}

/// [`clock_us`] of an instant already read (one clock read less on the hot path).
fn clock_us_at(at: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    at.saturating_duration_since(*START.get_or_init(Instant::now))
        .as_micros() as u64
}

/// One upstream server. Shared (`Arc`) by the pool snapshots, the workers' in-flight guards
/// and the control plane; dropped when the last of them lets go, so a removed backend's
/// in-flight requests finish normally.
#[derive(Debug)]
pub struct Backend {
    /// Process-wide, never reused: plugins key their state on it.
    pub id: u32,
    /// Where to connect.
    pub addr: SocketAddr,
    addr_text: String,
    weight: AtomicU32,
    max_connections: AtomicU32,
    state: Mutex<BackendState>,
    /// What the workers write on every request, a copy per worker thread ([`shard`]).
    shards: [Shard; SHARDS],
    /// In-flight counts, per shard too, in the process's columns ([`super::in_flight`]).
    in_flight: Row,
    /// Passive ejection: written on failures only.
    streak: Streak,
    /// The latest in-band (ORCA) figures, until the publisher takes them.
    inband: Inband,
}

/// In-band load figures as the workers leave them for the publisher
/// ([`crate::health::inband_reports`]): CPU % and memory % packed in one atomic (so a
/// reader never sees one report's CPU with another's memory), and whether a report came
/// since the publisher last looked. A worker writes only what changed: a backend repeating
/// the same figures costs loads, no stores, no cache line moved between cores.
#[repr(align(64))]
#[derive(Debug)]
struct Inband {
    /// CPU % f32 bits in the high half, memory % in the low half; [`NO_FIGURE`] = none.
    figures: AtomicU64,
    /// A report arrived since [`Backend::take_inband`] last looked.
    fresh: AtomicBool,
}

/// The bits of a figure not reported: a NaN, which a report never holds (refused).
const NO_FIGURE: u32 = u32::MAX;

impl Default for Inband {
    fn default() -> Self {
        Inband {
            figures: AtomicU64::new(pack(None, None)),
            fresh: AtomicBool::new(false),
        }
    }
}

fn pack(cpu: Option<f32>, memory: Option<f32>) -> u64 {
    let bits = |v: Option<f32>| v.map_or(NO_FIGURE, f32::to_bits);
    u64::from(bits(cpu)) << 32 | u64::from(bits(memory))
}

fn unpack(packed: u64) -> (Option<f32>, Option<f32>) {
    let figure = |bits: u32| (bits != NO_FIGURE).then(|| f32::from_bits(bits));
    (figure((packed >> 32) as u32), figure(packed as u32))
}

/// One worker's copy, on its own cache line.
#[repr(align(64))]
#[derive(Debug, Default)]
struct Shard {
    requests: AtomicU64,
    failures: AtomicU64,
    latency: PeakEwma,
    /// Latency samples (µs) since the dashboard last took them; none until the first.
    window: Mutex<Option<Histogram<u64>>>,
}

/// The failure streak that passive ejection counts, and whether an ejection was asked for.
#[repr(align(64))]
#[derive(Debug, Default)]
struct Streak {
    failures: AtomicU32,
    eject_pending: AtomicBool,
}

fn new_window() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_WINDOW_MAX_US, 2).ok()
}

/// Control-plane state of a backend: everything that decides `healthy` and the load report.
/// Changing it means publishing a new snapshot.
#[derive(Clone, Debug)]
pub struct BackendState {
    /// Active health checks say up (true until a check says otherwise).
    pub active_up: bool,
    /// Consecutive successful checks while down.
    pub rise: u32,
    /// Consecutive failed checks while up.
    pub fall: u32,
    /// Passively ejected until then.
    pub ejected_until: Option<Instant>,
    /// Ejections so far (the exponent of the back-off); forgotten after a quiet period.
    pub ejections: u32,
    /// When the last ejection ended.
    pub readmitted_at: Option<Instant>,
    /// Being drained: no new requests, in-flight ones finish.
    pub draining: bool,
    /// A managed backend whose process is running and has answered a check.
    pub process_up: bool,
    /// Start of the slow-start ramp (re-admission); none = full weight.
    pub warming_since: Option<Instant>,
    /// Latest load report.
    pub report: Option<LoadFigures>,
    /// Reports received so far.
    pub report_samples: u64,
}

impl Default for BackendState {
    fn default() -> Self {
        BackendState {
            active_up: true,
            rise: 0,
            fall: 0,
            ejected_until: None,
            ejections: 0,
            readmitted_at: None,
            draining: false,
            process_up: true,
            warming_since: None,
            report: None,
            report_samples: 0,
        }
    }
}

impl BackendState {
    /// Whether new requests may go to this backend.
    pub fn healthy(&self) -> bool {
        self.active_up && self.process_up && !self.draining && self.ejected_until.is_none()
    }

    /// Slow-start factor now: ramps linearly from 10% to 100% of the weight over `ramp`
    /// (Envoy's default floor, so a re-admitted backend is never starved entirely).
    pub fn warmup(&self, ramp: Duration, now: Instant) -> f32 {
        match self.warming_since {
            Some(since) if !ramp.is_zero() => {
                let f = now.saturating_duration_since(since).as_secs_f32() / ramp.as_secs_f32();
                f.clamp(0.1, 1.0)
            }
            _ => 1.0,
        }
    }
}

/// What a backend said about itself on its load endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadFigures {
    /// CPU %, 0..=100.
    pub cpu_percent: Option<f32>,
    /// Memory %, 0..=100.
    pub memory_percent: Option<f32>,
    /// Connections from every client.
    pub connections: Option<u32>,
    /// [`lbwasm_plugin_host::clock_ms`] when it arrived.
    pub sampled_at_ms: u64,
}

impl Backend {
    /// A new backend with a fresh id, healthy, idle.
    pub fn new(addr: SocketAddr, weight: u32, max_connections: u32) -> Arc<Self> {
        Arc::new(Backend {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            addr,
            addr_text: addr.to_string(),
            weight: AtomicU32::new(weight.max(1)),
            max_connections: AtomicU32::new(max_connections),
            state: Mutex::new(BackendState::default()),
            shards: Default::default(),
            in_flight: Row::take(),
            streak: Streak::default(),
            inband: Inband::default(),
        })
    }

    /// `host:port`, as pushed to plugins and shown in metrics.
    pub fn address(&self) -> &str {
        &self.addr_text
    }

    /// Configured weight (>= 1).
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Connection limit (0 = none).
    pub fn max_connections(&self) -> u32 {
        self.max_connections.load(Ordering::Relaxed)
    }

    /// Changes weight and limit. True if anything changed. Only through
    /// [`Changes::set_limits`](super::Changes::set_limits), which republishes.
    pub(super) fn set_limits(&self, weight: u32, max_connections: u32) -> bool {
        let w = self.weight.swap(weight.max(1), Ordering::Relaxed);
        let m = self
            .max_connections
            .swap(max_connections, Ordering::Relaxed);
        w != weight.max(1) || m != max_connections
    }

    /// A copy of the control-plane state (health, drain, report), for readers: no lock is
    /// held once it returns.
    pub fn current_state(&self) -> BackendState {
        self.lock_state().clone()
    }

    /// Runs `f` on the state under its lock. Only [`Pool::update`](super::Pool::update)
    /// calls it, so that every change is published.
    pub(super) fn modify_state<R>(&self, f: impl FnOnce(&mut BackendState) -> R) -> R {
        f(&mut self.lock_state())
    }

    fn lock_state(&self) -> MutexGuard<'_, BackendState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests (or connections) in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.cell().sum()
    }

    /// Where [`Backend::in_flight`] reads, for snapshots that read a whole pool's counts.
    pub(super) fn in_flight_cell(&self) -> Cell {
        self.in_flight.cell()
    }

    /// Completed requests.
    pub fn requests(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.requests.load(Ordering::Relaxed))
            .sum()
    }

    /// Failed requests.
    pub fn failures(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.failures.load(Ordering::Relaxed))
            .sum()
    }

    /// Peak-EWMA latency, µs, decayed to now; 0 = no sample yet. The highest of the
    /// workers' copies: a slowdown any worker saw counts at once, as a peak does.
    pub fn latency_us(&self) -> u32 {
        let now = clock_us();
        self.shards
            .iter()
            .map(|s| s.latency.get(now))
            .max()
            .unwrap_or(0)
    }

    /// The latency samples (µs) recorded since the previous call, starting a new window:
    /// per-interval percentiles for the dashboard, whose producer is the only caller.
    pub fn take_latency_window(&self) -> Option<Histogram<u64>> {
        let mut total = new_window()?;
        for shard in &self.shards {
            let mut window = shard.window.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = window.as_mut() {
                // Same bounds on both sides: adding cannot fail.
                let _ = total.add(&*h);
                h.reset();
            }
        }
        Some(total)
    }

    /// Live figures as plugins see them.
    pub fn load(&self) -> ServerLoad {
        ServerLoad {
            in_flight: self.in_flight(),
            latency_us: self.latency_us(),
            requests: self.requests(),
            failures: self.failures(),
        }
    }

    /// Records an attempt's outcome. Returns true when this failure completes a streak of
    /// `eject_after` and nobody has asked for this backend's ejection yet: the caller then
    /// tells the control plane.
    fn record(
        &self,
        shard: usize,
        ok: bool,
        latency: Option<(Duration, u64)>,
        eject_after: u32,
    ) -> bool {
        self.record_head(shard, latency);
        if ok {
            self.clear_streak();
            return false;
        }
        self.fail(&self.shards[shard], eject_after)
    }

    /// A failure streak ends with a success. Read first: the common case writes nothing
    /// (no cache-line ping-pong).
    fn clear_streak(&self) {
        if self.streak.failures.load(Ordering::Relaxed) != 0 {
            self.streak.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a request and its latency, not yet its outcome.
    fn record_head(&self, shard: usize, latency: Option<(Duration, u64)>) {
        let shard = &self.shards[shard];
        shard.requests.fetch_add(1, Ordering::Relaxed);
        if let Some((l, stamp_us)) = latency {
            let us = l.as_micros() as u64;
            shard.latency.observe(us as f64, stamp_us);
            let mut window = shard.window.lock().unwrap_or_else(|e| e.into_inner());
            if window.is_none() {
                *window = new_window();
            }
            if let Some(h) = window.as_mut() {
                h.saturating_record(us);
            }
        }
    }

    /// Counts a failure in `shard` and the streak; true when it asks for an ejection.
    fn fail(&self, shard: &Shard, eject_after: u32) -> bool {
        shard.failures.fetch_add(1, Ordering::Relaxed);
        let streak = self.streak.failures.fetch_add(1, Ordering::Relaxed) + 1;
        eject_after > 0
            && streak >= eject_after
            && !self.streak.eject_pending.swap(true, Ordering::AcqRel)
    }

    /// Counts a failure seen outside any request: bytes the backend sent on an idle
    /// connection, which nobody asked for (a desynchronised or hostile backend). Returns
    /// true when it should be ejected, as [`InFlight::finish`] does.
    pub fn failed_unasked(&self, eject_after: u32) -> bool {
        self.fail(&self.shards[shard()], eject_after)
    }

    /// Records an in-band load report (ORCA, on a response) of CPU % and memory %, each
    /// 0..=100 or not reported. Called by the workers for every response that carries one,
    /// so it is lock-free and allocates nothing; the control plane publishes the latest
    /// figures at most every 50 ms ([`crate::health::inband_reports`]), as one snapshot for
    /// the whole pool. A report naming neither figure should not be recorded: it would erase
    /// the polled ones.
    pub fn report_inband(&self, cpu_percent: Option<f32>, memory_percent: Option<f32>) {
        let clamp = |v: Option<f32>| v.filter(|v| !v.is_nan()).map(|v| v.clamp(0.0, 100.0));
        let packed = pack(clamp(cpu_percent), clamp(memory_percent));
        let inband = &self.inband;
        if inband.figures.load(Ordering::Relaxed) != packed {
            inband.figures.store(packed, Ordering::Relaxed);
        }
        if !inband.fresh.load(Ordering::Relaxed) {
            inband.fresh.store(true, Ordering::Release);
        }
    }

    /// The latest in-band figures (CPU %, memory %) if a report came since the last call;
    /// for the publisher, the only caller.
    pub fn take_inband(&self) -> Option<(Option<f32>, Option<f32>)> {
        let inband = &self.inband;
        if !inband.fresh.load(Ordering::Relaxed) || !inband.fresh.swap(false, Ordering::Acquire) {
            return None;
        }
        Some(unpack(inband.figures.load(Ordering::Relaxed)))
    }

    /// The control plane decided about an ejection request (done or refused): the next
    /// streak may ask again.
    pub fn clear_eject_request(&self) {
        self.streak.failures.store(0, Ordering::Relaxed);
        self.streak.eject_pending.store(false, Ordering::Release);
    }
}

/// Peak-EWMA of latency (Finagle / tower `PeakEwma`): a sample above the current value
/// replaces it at once (react to a slowdown immediately), lower samples are averaged in
/// with a decay of τ = 10 s, and the value read decays by the time since the last sample
/// (an idle backend looks faster and gets probed again).
#[derive(Debug, Default)]
struct PeakEwma {
    /// f64 bits, µs.
    value: AtomicU64,
    /// [`clock_us`] of the last sample.
    stamp: AtomicU64,
}

const TAU_US: f64 = 10_000_000.0;

/// Latency window range: 1 µs to 60 s (slower answers count as 60 s), 2 significant digits.
const LATENCY_WINDOW_MAX_US: u64 = 60_000_000;

impl PeakEwma {
    fn observe(&self, rtt_us: f64, now_us: u64) {
        let prev = self.stamp.swap(now_us, Ordering::Relaxed);
        let decay = (-(now_us.saturating_sub(prev) as f64) / TAU_US).exp();
        let mut cur = self.value.load(Ordering::Relaxed);
        loop {
            let c = f64::from_bits(cur);
            let next = if rtt_us > c || c == 0.0 {
                rtt_us
            } else {
                c * decay + rtt_us * (1.0 - decay)
            };
            match self.value.compare_exchange_weak(
                cur,
                next.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    fn get(&self, now_us: u64) -> u32 {
        let v = f64::from_bits(self.value.load(Ordering::Relaxed));
        if v == 0.0 {
            return 0;
        }
        let age = now_us.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        (v * (-age / TAU_US).exp()).clamp(1.0, u32::MAX as f64) as u32
    }
}

/// One request (or TCP connection) in flight to a backend: counted from the pick until
/// drop, so the count never leaks on an error, a timeout or a cancelled future (tower's
/// `PendingRequests`). The outcome is recorded once, by [`InFlight::finish`]; a guard
/// dropped without it (the client went away) records nothing but the decrement.
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<Backend>,
    /// The shard counted in (the calling thread's), whatever thread drops the guard.
    shard: usize,
    start: Instant,
    finished: bool,
}

impl InFlight {
    /// Counts a new request on `backend`.
    pub fn start(backend: Arc<Backend>) -> Self {
        Self::start_at(backend, Instant::now())
    }

    /// [`InFlight::start`] with the clock already read (the request's arrival).
    pub fn start_at(backend: Arc<Backend>, at: Instant) -> Self {
        let shard = shard();
        backend.in_flight.cell().increment(shard);
        InFlight {
            backend,
            shard,
            start: at,
            finished: false,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// When the attempt started.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// Records the outcome: `ok` with the latency to the response head (or to the TCP
    /// connect), or a failure (connect error, reset, 5xx; `latency` none when nothing came
    /// back). Returns true when the failure should eject the backend (see
    /// [`Backend::clear_eject_request`]). Later calls do nothing.
    pub fn finish(&mut self, ok: bool, latency: Option<Duration>, eject_after: u32) -> bool {
        if std::mem::replace(&mut self.finished, true) {
            return false;
        }
        self.backend.record(
            self.shard,
            ok,
            latency.map(|l| (l, clock_us())),
            eject_after,
        )
    }

    /// [`InFlight::finish`] for an answer (response head, TCP connect) that arrived `at`:
    /// the latency is measured from the start, with no further clock read.
    pub fn answered(&mut self, ok: bool, at: Instant, eject_after: u32) -> bool {
        if std::mem::replace(&mut self.finished, true) {
            return false;
        }
        let latency = at.saturating_duration_since(self.start);
        self.backend.record(
            self.shard,
            ok,
            Some((latency, clock_us_at(at))),
            eject_after,
        )
    }
}

impl InFlight {
    /// The head of a successful response that a body follows arrived `at`: the request and
    /// its latency are recorded now, its outcome when the body ends ([`InFlight::completed`]
    /// or [`InFlight::failed_late`]) — a backend whose bodies always break must not have
    /// its failure streak reset by each head.
    pub fn answered_head(&mut self, at: Instant) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let latency = at.saturating_duration_since(self.start);
        self.backend
            .record_head(self.shard, Some((latency, clock_us_at(at))));
    }

    /// The body announced by [`InFlight::answered_head`] arrived whole.
    pub fn completed(&mut self) {
        self.backend.clear_streak();
    }

    /// The backend failed after its answer was recorded (a body cut short, stalled or
    /// malformed): counts one failure more, without counting the request twice. Returns
    /// true when it should be ejected.
    pub fn failed_late(&mut self, eject_after: u32) -> bool {
        self.finished = true;
        self.backend
            .fail(&self.backend.shards[self.shard], eject_after)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.cell().decrement(self.shard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_takes_peaks_at_once_and_decays_lower_samples() {
        let e = PeakEwma::default();
        e.observe(1000.0, 0);
        assert_eq!(e.get(0), 1000);
        e.observe(5000.0, 1);
        assert_eq!(e.get(1), 5000, "a peak replaces the value at once");
        // A low sample right after barely moves it; one τ later it moves by 1 - 1/e.
        e.observe(100.0, 2);
        assert!(e.get(2) > 4900);
        e.observe(100.0, 2 + TAU_US as u64);
        let v = e.get(2 + TAU_US as u64);
        assert!((1800..=2000).contains(&v), "{v}");
    }

    #[test]
    fn in_flight_guard_never_leaks() {
        let b = Backend::new("127.0.0.1:1".parse().unwrap(), 1, 0);
        {
            let _a = InFlight::start(b.clone());
            let mut c = InFlight::start(b.clone());
            assert_eq!(b.in_flight(), 2);
            assert!(!c.finish(true, Some(Duration::from_millis(1)), 5));
        }
        assert_eq!(b.in_flight(), 0);
        assert_eq!(b.requests(), 1, "an abandoned guard records nothing");
    }

    #[test]
    fn workers_figures_add_up_across_threads() {
        let b = Backend::new("127.0.0.1:1".parse().unwrap(), 1, 0);
        let mut here = InFlight::start(b.clone());
        // Another thread (another shard) counts one in, and its guard is dropped here.
        let there = std::thread::spawn({
            let b = b.clone();
            move || {
                let mut g = InFlight::start(b);
                g.answered(true, g.started() + Duration::from_millis(40), 0);
                g
            }
        })
        .join()
        .unwrap();
        assert_eq!(b.in_flight(), 2);
        here.answered(false, here.started() + Duration::from_millis(1), 0);
        assert_eq!((b.requests(), b.failures()), (2, 1));
        // The slower worker's peak is the backend's.
        assert!(b.latency_us() >= 39_000, "{}", b.latency_us());
        drop(there);
        assert_eq!(b.in_flight(), 1);
        drop(here);
        assert_eq!(b.in_flight(), 0);
        let window = b.take_latency_window().unwrap();
        assert_eq!(window.len(), 2);
    }

    #[test]
    fn inband_figures_are_taken_once_and_keep_none_apart_from_zero() {
        let b = Backend::new("127.0.0.1:1".parse().unwrap(), 1, 0);
        assert_eq!(b.take_inband(), None, "nothing reported yet");
        b.report_inband(Some(95.0), None);
        b.report_inband(Some(40.0), Some(0.0));
        assert_eq!(
            b.take_inband(),
            Some((Some(40.0), Some(0.0))),
            "the latest wins"
        );
        assert_eq!(b.take_inband(), None, "taken once");
        b.report_inband(Some(250.0), Some(-1.0));
        assert_eq!(
            b.take_inband(),
            Some((Some(100.0), Some(0.0))),
            "clamped to 0..=100"
        );
        // Another thread's report is seen here.
        std::thread::scope(|s| {
            s.spawn(|| b.report_inband(None, Some(12.5)));
        });
        assert_eq!(b.take_inband(), Some((None, Some(12.5))));
    }

    #[test]
    fn a_failure_streak_asks_for_one_ejection() {
        let b = Backend::new("127.0.0.1:1".parse().unwrap(), 1, 0);
        let fail = || InFlight::start(b.clone()).finish(false, None, 3);
        assert!(!fail());
        assert!(!fail());
        assert!(fail(), "the third failure in a row asks");
        assert!(!fail(), "asked once until the control plane clears it");
        b.clear_eject_request();
        assert!(!fail());
        assert_eq!(b.failures(), 5);
    }
}
