//! In-band load reports (ORCA `endpoint-load-metrics` on responses) published to plugins.
//!
//! The workers record each report's CPU % and memory % in the backend's atomics
//! ([`Backend::report_inband`]); this task takes them every [`PUBLISH_EVERY`] and publishes
//! what changed with one [`Pool::update`](crate::pool::Pool::update) per round — a snapshot
//! per response would rebuild the server list and re-push it to every plugin instance
//! thousands of times a second. 50 ms keeps a jump in a backend's load visible to plugins
//! within about 100 ms, well inside the 200 ms the feature promises, at 20 rounds a second
//! that cost one atomic load per backend when nothing came.
//!
//! In-band figures land where `/load` polling puts its own (`BackendState::report`,
//! `report_samples`), so a plugin that reads load (`least_loaded`) sees them through the
//! same `server` fields, with no change to the WIT interface. It runs whether polling is on
//! or off. When both are on, the newest wins: a poll replaces the in-band figures, the next
//! in-band report replaces the poll's (both describe the same backend; the in-band ones are
//! just fresher). A poll's `connections` figure, which ORCA does not carry, is kept.
//!
//! A figure that has not changed is republished once per [`REFRESH`] only (as a poll
//! would): plugins that count samples (`least_loaded`'s trend) then see a steady backend as
//! steady, without a new snapshot every round.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::pool::{Backend, LoadFigures};
use crate::proxy::ListenerShared;
use lbwasm_plugin_host::clock_ms;

/// How often the in-band figures are published.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(50);

/// How often unchanged in-band figures are published again (a poll's cadence).
pub const REFRESH: Duration = Duration::from_secs(1);

/// Publishes a listener's in-band load reports until aborted (see the module's doc).
pub async fn inband_reports(listener: Arc<ListenerShared>) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut taken: Vec<(Arc<Backend>, Option<f32>, Option<f32>)> = Vec::new();
    loop {
        tick.tick().await;
        publish_round(&listener, &mut taken);
    }
}

/// One round: takes every member's fresh figures and publishes those that changed (or are
/// due for a refresh) in one update. `taken` is scratch space kept between rounds.
fn publish_round(
    listener: &ListenerShared,
    taken: &mut Vec<(Arc<Backend>, Option<f32>, Option<f32>)>,
) {
    taken.clear();
    for b in listener.pool.members() {
        if let Some((cpu, memory)) = b.take_inband() {
            taken.push((b, cpu, memory));
        }
    }
    if taken.is_empty() {
        return;
    }
    let now_ms = clock_ms();
    let refresh_ms = REFRESH.as_millis() as u64;
    listener.pool.update(|changes| {
        for (b, cpu, memory) in taken.iter() {
            changes.state(b, |st| {
                let (cpu, memory) = (*cpu, *memory);
                let previous = st.report;
                let unchanged = previous.is_some_and(|r| {
                    r.cpu_percent == cpu
                        && r.memory_percent == memory
                        && now_ms.saturating_sub(r.sampled_at_ms) < refresh_ms
                });
                if unchanged {
                    return;
                }
                st.report = Some(LoadFigures {
                    cpu_percent: cpu,
                    memory_percent: memory,
                    connections: previous.and_then(|r| r.connections),
                    sampled_at_ms: now_ms,
                });
                st.report_samples += 1;
            });
        }
    });
}
