//! Rebuilding a worker's instance for a new server list off the request path.
//!
//! A plugin whose `set-servers` is slow (a Maglev table of a million entries takes tens of
//! milliseconds) would make the request that notices a pool change — and every request
//! queued behind it on that worker thread — wait for it. So a worker's [`Selector`]
//! measures `set-servers` (CPU time of the calling thread, so that a descheduled thread does
//! not count as a slow plugin); after one over [`SLOW_SETUP`], the next change of the pool's
//! [`Shape`] starts a new instance on a builder thread ([`start`]: `configure`, then
//! `set-servers` with the new list, under [`BACKGROUND_SETUP`]) while the old instance keeps
//! answering with the list it was given. Its answers are translated into the current pool by
//! server id ([`translation`]); a backend that has left or is no longer eligible there is
//! left to the native fallback. The selector polls the build at each `choose` and swaps the
//! instance in when it arrives, unless the instance it has is already current (the pool
//! went back); a build for a list that has changed since is swapped in all the same (it is
//! newer than the instance it replaces) and the next one started, so every worker ends with
//! the instance an inline build would give.
//!
//! A change of load figures only (reports, polls: every 50 ms with in-band reports) keeps
//! the shape and is pushed inline to the instance, as before: a fresh instance would have to
//! build its table from scratch where the old one keeps it. Plugins under the threshold keep
//! the inline path for every change: `set-servers` on the same instance, whose state survives.
//!
//! [`Selector`]: super::Selector

use super::component::Plugin;
use super::instance::{Instance, fault_text, is_timeout};
use super::{PoolView, ServerInfo};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::Duration;

/// A `set-servers` taking more CPU time than this sends the next pool change off the
/// request path.
pub(super) const SLOW_SETUP: Duration = Duration::from_millis(2);

/// The deadline of `configure` and `set-servers` on a builder thread (or ten times the call
/// deadline if that is longer): nobody waits for them, but a plugin looping there must not
/// hold a builder thread for ever.
pub(super) const BACKGROUND_SETUP: Duration = Duration::from_secs(2);

/// In a translation: the server has left the pool.
pub(super) const GONE: u32 = u32::MAX;

/// What the off-path rebuild did on one selector (one worker).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebuildStats {
    /// Instances started on a builder thread.
    pub started: u64,
    /// Of those, swapped in.
    pub swapped: u64,
    /// Of those, dropped: the instance in use had become current meanwhile.
    pub discarded: u64,
    /// Of those, failed (no instance, a trap or the deadline).
    pub failed: u64,
    /// `choose` calls answered by an instance whose server list is older than the pool's.
    pub stale_calls: u64,
}

/// What of a server a plugin may build a table on: all but its load figures.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Shape {
    pub(super) id: u32,
    address: u64,
    weight: u32,
    healthy: bool,
    max_connections: u32,
    warmup: u32,
}

/// The shape of a server list, by index.
pub(super) fn shape(servers: &[ServerInfo]) -> Vec<Shape> {
    servers
        .iter()
        .map(|s| Shape {
            id: s.id,
            address: xxhash_rust::xxh3::xxh3_64(s.address.as_bytes()),
            weight: s.weight,
            healthy: s.healthy,
            max_connections: s.max_connections,
            warmup: s.warmup.to_bits(),
        })
        .collect()
}

/// An instance built for a server list.
pub(super) struct Built {
    pub(super) instance: Instance,
    /// The generation of the list it was given.
    pub(super) generation: u64,
    /// That list's shape.
    pub(super) shape: Vec<Shape>,
    /// CPU time of its `set-servers`.
    pub(super) took: Duration,
}

/// Why a build failed.
pub(super) struct Failed {
    pub(super) message: String,
    pub(super) timeout: bool,
}

/// A build under way.
pub(super) struct Pending {
    rx: Receiver<Result<Built, Failed>>,
}

impl Pending {
    /// The build's outcome once it is there; `None` while it runs.
    pub(super) fn poll(&self) -> Option<Result<Built, Failed>> {
        match self.rx.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(Failed {
                message: "the builder thread ended without an instance".into(),
                timeout: false,
            })),
        }
    }
}

/// Starts building an instance of `plugin` for `servers` (the list of `view`) on a thread of
/// its own. `deadline_ticks` is the per-call deadline the instance will serve with,
/// `setup_ticks` that of its `configure` and `set-servers` there.
pub(super) fn start(
    plugin: Arc<Plugin>,
    deadline_ticks: u64,
    setup_ticks: u64,
    view: Arc<dyn PoolView>,
    servers: Vec<ServerInfo>,
) -> std::io::Result<Pending> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("lbwasm-plugin-build".into())
        .spawn(move || {
            let generation = view.generation();
            let outcome = build(&plugin, deadline_ticks, setup_ticks, view, &servers).map(
                |(instance, took)| Built {
                    instance,
                    generation,
                    shape: shape(&servers),
                    took,
                },
            );
            // The selector may be gone (a reload, a worker ending): the instance is dropped.
            let _ = tx.send(outcome);
        })?;
    Ok(Pending { rx })
}

fn build(
    plugin: &Plugin,
    deadline_ticks: u64,
    setup_ticks: u64,
    view: Arc<dyn PoolView>,
    servers: &[ServerInfo],
) -> Result<(Instance, Duration), Failed> {
    let mut instance =
        Instance::with_setup_ticks(plugin, deadline_ticks, setup_ticks).map_err(|e| Failed {
            message: format!("{e:#}"),
            timeout: false,
        })?;
    let started = thread_cpu_time();
    match instance.set_servers(view, servers) {
        Ok(()) => Ok((instance, thread_cpu_time().saturating_sub(started))),
        Err(e) => Err(Failed {
            message: format!("set-servers: {}", fault_text(&e)),
            timeout: is_timeout(&e),
        }),
    }
}

/// For an instance given the servers of `given` (by index): each one's index in `current`
/// (by server id), or [`GONE`].
pub(super) fn translation(given: &[Shape], current: &[ServerInfo]) -> Vec<u32> {
    let mut now: Vec<(u32, u32)> = (0u32..).zip(current).map(|(i, s)| (s.id, i)).collect();
    now.sort_unstable();
    given
        .iter()
        .map(|g| match now.binary_search_by_key(&g.id, |&(id, _)| id) {
            Ok(k) => now[k].1,
            Err(_) => GONE,
        })
        .collect()
}

/// CPU time of the calling thread: what a plugin call cost, whatever the scheduler did.
pub(super) fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translation_follows_ids() {
        let current: Vec<ServerInfo> = [7, 3, 9]
            .iter()
            .map(|&id| ServerInfo::new(id, format!("h{id}:1")))
            .collect();
        let given: Vec<ServerInfo> = [3, 5, 9, 7]
            .iter()
            .map(|&id| ServerInfo::new(id, format!("h{id}:1")))
            .collect();
        assert_eq!(translation(&shape(&given), &current), [1, GONE, 2, 0]);
        assert!(translation(&[], &current).is_empty());
    }

    #[test]
    fn load_figures_do_not_change_the_shape() {
        let list = |f: fn(&mut ServerInfo)| {
            let mut servers = vec![ServerInfo::new(1, "a:1"), ServerInfo::new(2, "b:1")];
            f(&mut servers[1]);
            shape(&servers)
        };
        let same = list(|_| {});
        let reported = list(|s| {
            s.cpu_percent = Some(50.0);
            s.memory_percent = Some(20.0);
            s.backend_connections = Some(7);
            s.load_sample = 3;
            s.load_sampled_at_ms = 99;
        });
        assert_eq!(same, reported);
        for changed in [
            list(|s| s.healthy = false),
            list(|s| s.weight = 2),
            list(|s| s.warmup = 0.5),
            list(|s| s.max_connections = 10),
            list(|s| s.address = "c:1".into()),
            list(|s| s.id = 3),
        ] {
            assert_ne!(same, changed);
        }
    }

    #[test]
    fn thread_cpu_time_counts_work_not_sleep() {
        let t0 = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(30));
        let slept = thread_cpu_time() - t0;
        assert!(slept < Duration::from_millis(10), "{slept:?}");
        let t0 = thread_cpu_time();
        let mut x = 0u64;
        while thread_cpu_time() - t0 < Duration::from_millis(5) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(x > 0);
    }

    #[test]
    fn an_instance_can_be_built_on_another_thread() {
        fn send<T: Send>() {}
        send::<Instance>();
        send::<Arc<Plugin>>();
    }
}
