//! In-band load reports (ORCA) on backend responses: taken off the response — the client
//! never sees them, they are the proxy's business — parsed strictly
//! ([`lbwasm_http::orca`]), counted on `/metrics` (`lbwasm_load_reports_total`), and left in
//! the backend's atomics for the control plane to publish to plugins
//! ([`crate::health::inband_reports`]).
//!
//! Which field counts, as Envoy reads them: `endpoint-load-metrics-bin` if present,
//! otherwise `endpoint-load-metrics`. The same field given twice is ambiguous, so refused.
//! A malformed report is logged at debug, counted as `invalid`, and ignored: the backend's
//! previous figures stand. Plugins read CPU % and memory % (`cpu_utilization` and
//! `mem_utilization` × 100); a report with neither is counted but changes nothing.
//!
//! Cost: a response without a report pays one pass over its field names, comparing only
//! those of the right length ([`is_report_field`]). One with a report has its fields turned
//! into a map (what HTTP/2 responses carry anyway) to drop the report's.

use http::HeaderMap;
use lbwasm_http::orca::{self, HEADER, HEADER_BIN, OrcaError, OrcaReport, is_report_field};
use lbwasm_http::{Fields, RawFields};

use super::local::LocalListener;
use crate::pool::Backend;

/// Takes the report fields off an HTTP/1.1 backend response's head, records the report,
/// and returns the fields to send on. Without a report the fields go on as they came
/// (raw); with one they go on as a map without it.
pub(super) fn take_raw(fields: RawFields, backend: &Backend, local: &LocalListener) -> Fields {
    let Some(report) = orca::from_fields(fields.iter()) else {
        return Fields::Raw(fields);
    };
    record(report, backend, local);
    Fields::Map(without_reports(&fields))
}

/// [`take_raw`] for a map: an HTTP/2 backend's response headers or trailers.
pub(super) fn take_map(map: &mut HeaderMap, backend: &Backend, local: &LocalListener) {
    if !map.contains_key(HEADER) && !map.contains_key(HEADER_BIN) {
        return;
    }
    let fields = map
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    if let Some(report) = orca::from_fields(fields) {
        record(report, backend, local);
    }
    map.remove(HEADER);
    map.remove(HEADER_BIN);
}

/// Counts the report and leaves its figures to the publisher.
fn record(report: Result<OrcaReport, OrcaError>, backend: &Backend, local: &LocalListener) {
    let index = local.shared.index;
    match report {
        Ok(r) => {
            local.metrics.load_report(index, true);
            let percent = |v: Option<f64>| v.map(|v| (v * 100.0) as f32);
            let (cpu, memory) = (percent(r.cpu_utilization), percent(r.mem_utilization));
            if cpu.is_some() || memory.is_some() {
                backend.report_inband(cpu, memory);
            }
        }
        Err(e) => {
            local.metrics.load_report(index, false);
            tracing::debug!(listener = %local.shared.name, backend = %backend.addr, error = %e, "malformed in-band load report (ORCA), ignored");
        }
    }
}

/// The fields as a map, less the report fields (values share the head's buffer).
fn without_reports(fields: &RawFields) -> HeaderMap {
    let mut map = match fields.to_map() {
        Ok(map) => map,
        // Not expected (the head parser validated the fields): copy the valid ones.
        Err(_) => {
            let mut map = HeaderMap::new();
            for (n, v) in fields.iter().filter(|(n, _)| !is_report_field(n)) {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(n),
                    http::HeaderValue::from_bytes(v),
                ) {
                    map.append(n, v);
                }
            }
            map
        }
    };
    map.remove(HEADER);
    map.remove(HEADER_BIN);
    map
}
