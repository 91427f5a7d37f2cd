//! Real load measurement for demo backends: per-server thread CPU time over a sliding
//! window, the process's memory and CPU from sysinfo, and the CPU burner behind
//! `--cpu-work-us`.
//!
//! What `cpu_percent` measures: the thread CPU time (user + system, from
//! `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`) spent polling this server's own tasks (accept
//! loop, connections, HTTP/2 streams, handlers, body streaming) plus the CPU burnt by its
//! `--cpu-work-us` jobs on blocking threads, summed over the last ~1 s (ten 100 ms samples)
//! and divided by that wall-clock window: 100 means one core busy, several blocking
//! threads can push it past 100. Time a task spends waiting (sleeping, queued, parked)
//! costs nothing, so two servers in one process report their own load, not each other's.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pin_project_lite::pin_project;

/// How often the sliding window takes a sample.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Samples kept: ten intervals, i.e. a window of ~1 s.
const SAMPLES: usize = 11;
/// sysinfo is refreshed at most this often, whoever asks.
const PROCESS_REFRESH: Duration = Duration::from_millis(500);

/// CPU time of the calling thread in nanoseconds.
#[cfg(unix)]
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call and
    // CLOCK_THREAD_CPUTIME_ID is a clock every supported unix provides.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Fallback where no thread CPU clock exists: wall-clock time, an upper bound of CPU time.
#[cfg(not(unix))]
pub(crate) fn thread_cpu_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// One server's CPU account: a running total plus the samples the window is cut from.
#[derive(Debug)]
pub(crate) struct CpuMeter {
    total_ns: AtomicU64,
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl CpuMeter {
    pub(crate) fn new() -> Self {
        let mut samples = VecDeque::with_capacity(SAMPLES);
        samples.push_back((Instant::now(), 0));
        Self {
            total_ns: AtomicU64::new(0),
            samples: Mutex::new(samples),
        }
    }

    pub(crate) fn add(&self, ns: u64) {
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Records one point of the window; called every [`SAMPLE_EVERY`] by the server.
    pub(crate) fn sample(&self) {
        let now = (Instant::now(), self.total_ns.load(Ordering::Relaxed));
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() >= SAMPLES {
            samples.pop_front();
        }
        samples.push_back(now);
    }

    /// CPU used over the last ~1 s, in percent of one core.
    pub(crate) fn percent(&self) -> f32 {
        let (t0, c0) = {
            let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            match samples.front() {
                Some(&first) => first,
                None => return 0.0,
            }
        };
        let total = self.total_ns.load(Ordering::Relaxed);
        let wall = t0.elapsed().as_nanos().max(1) as f64;
        (total.saturating_sub(c0) as f64 / wall * 100.0) as f32
    }

    /// Burns `work` of this thread's CPU time (not wall-clock time: a contended core
    /// takes longer but does the same work) and charges it to this meter.
    pub(crate) fn burn(&self, work: Duration) {
        let start = thread_cpu_ns();
        let target = u64::try_from(work.as_nanos()).unwrap_or(u64::MAX);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        loop {
            for _ in 0..2_000 {
                // xorshift: cheap, unpredictable, cannot be folded away.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            std::hint::black_box(x);
            if thread_cpu_ns().saturating_sub(start) >= target {
                break;
            }
        }
        self.add(thread_cpu_ns().saturating_sub(start));
    }
}

pin_project! {
    /// Charges the thread CPU time of every poll of `inner` to a server's meter.
    pub(crate) struct Metered<F> {
        #[pin]
        inner: F,
        meter: Arc<CpuMeter>,
    }
}

impl<F> Metered<F> {
    pub(crate) fn new(inner: F, meter: Arc<CpuMeter>) -> Self {
        Self { inner, meter }
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let start = thread_cpu_ns();
        let out = this.inner.poll(cx);
        this.meter.add(thread_cpu_ns().saturating_sub(start));
        out
    }
}

/// hyper executor that meters the HTTP/2 stream tasks it spawns, so their CPU is
/// charged to the server that owns the connection.
#[derive(Clone, Debug)]
pub(crate) struct MeteredExec {
    pub(crate) meter: Arc<CpuMeter>,
}

impl<F> hyper::rt::Executor<F> for MeteredExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Metered::new(fut, self.meter.clone()));
    }
}

/// Process-wide figures from sysinfo, shared by every server of the process.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ProcessFigures {
    /// Resident memory of the process, bytes.
    pub(crate) rss: u64,
    /// Memory available to the process (machine total, or the cgroup limit if lower), bytes.
    pub(crate) total: u64,
    /// Process CPU since the previous refresh, percent of one core.
    pub(crate) cpu_percent: f32,
}

struct ProcessProbe {
    sys: sysinfo::System,
    pid: Option<sysinfo::Pid>,
    refreshed: Option<Instant>,
    last: ProcessFigures,
}

/// Bytes of `--memory-mb` ballast held by all servers of this process.
pub(crate) static BALLAST_BYTES: AtomicU64 = AtomicU64::new(0);

/// Current process figures, refreshed from the OS at most every 500 ms.
pub(crate) fn process_figures() -> ProcessFigures {
    static PROBE: OnceLock<Mutex<ProcessProbe>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        Mutex::new(ProcessProbe {
            sys: sysinfo::System::new(),
            pid: sysinfo::get_current_pid().ok(),
            refreshed: None,
            last: ProcessFigures::default(),
        })
    });
    let mut p = probe.lock().unwrap_or_else(|e| e.into_inner());
    if p.refreshed.is_some_and(|t| t.elapsed() < PROCESS_REFRESH) {
        return p.last;
    }
    p.refreshed = Some(Instant::now());
    let ProcessProbe { sys, pid, last, .. } = &mut *p;
    sys.refresh_memory();
    let mut total = sys.total_memory();
    if let Some(limits) = sys.cgroup_limits()
        && limits.total_memory > 0
    {
        total = total.min(limits.total_memory);
    }
    last.total = total;
    if let Some(pid) = *pid {
        sys.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&[pid]),
            true,
            sysinfo::ProcessRefreshKind::nothing()
                .with_cpu()
                .with_memory(),
        );
        if let Some(proc_) = sys.process(pid) {
            last.rss = proc_.memory();
            last.cpu_percent = proc_.cpu_usage();
        }
    }
    *last
}

/// Memory attributed to one server, percent of the memory available: the process's
/// resident memory minus every server's ballast plus this server's own, i.e. what the
/// process would hold were it running this server alone.
pub(crate) fn memory_percent(fig: &ProcessFigures, own_ballast: u64) -> f32 {
    if fig.total == 0 {
        return 0.0;
    }
    let all_ballast = BALLAST_BYTES.load(Ordering::Relaxed);
    let rss = fig
        .rss
        .saturating_sub(all_ballast)
        .saturating_add(own_ballast);
    (rss as f64 / fig.total as f64 * 100.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burn_is_charged_and_shows_in_the_window() {
        let meter = CpuMeter::new();
        meter.burn(Duration::from_millis(20));
        assert!(meter.total_ns.load(Ordering::Relaxed) >= 20_000_000);
        assert!(meter.percent() > 0.0);
    }

    #[test]
    fn process_figures_are_plausible() {
        let fig = process_figures();
        assert!(fig.total > 0);
        assert!(fig.rss > 0);
        let pct = memory_percent(&fig, 0);
        assert!(pct > 0.0 && pct <= 100.0, "{pct}");
    }
}
