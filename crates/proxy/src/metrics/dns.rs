//! DNS discovery's figures: resolutions by outcome and members found, per source. The
//! discovery loops (control plane, a few writes per TTL) write them as atomics; `/metrics`
//! renders them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{esc, header};

/// How one resolution of a source ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Records: the members follow them.
    Ok,
    /// NXDOMAIN, or the name exists without records of the type asked: the members go.
    NxDomain,
    /// SERVFAIL, REFUSED, a timeout or a transport error: the last good answer stays.
    Error,
}

impl Resolution {
    /// The `result` label.
    fn label(self) -> &'static str {
        match self {
            Resolution::Ok => "ok",
            Resolution::NxDomain => "nxdomain",
            Resolution::Error => "error",
        }
    }
}

/// The figures of one DNS source (`dns://…` or `dns+srv://…` of one listener).
pub struct DnsStats {
    listener: String,
    source: String,
    /// By [`Resolution`]: ok, nxdomain, error.
    resolutions: [AtomicU64; 3],
    backends: AtomicU64,
}

impl DnsStats {
    /// Zeroed figures of `source` (its URL) on `listener`.
    pub fn new(listener: &str, source: &str) -> Arc<Self> {
        Arc::new(DnsStats {
            listener: listener.to_owned(),
            source: source.to_owned(),
            resolutions: Default::default(),
            backends: AtomicU64::new(0),
        })
    }

    /// Counts one resolution.
    pub fn resolved(&self, outcome: Resolution) {
        self.resolutions[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Resolutions that ended so far.
    pub fn count(&self, outcome: Resolution) -> u64 {
        self.resolutions[outcome as usize].load(Ordering::Relaxed)
    }

    /// The members the source has in the pool now (not counting those leaving).
    pub fn set_backends(&self, n: usize) {
        self.backends.store(n as u64, Ordering::Relaxed);
    }
}

/// `lbwasm_dns_resolutions_total` and `lbwasm_dns_backends` of every source, appended to
/// `out` (nothing when there is no DNS source).
pub fn render(out: &mut String, sources: &[Arc<DnsStats>]) {
    if sources.is_empty() {
        return;
    }
    header(
        out,
        "lbwasm_dns_resolutions_total",
        "counter",
        "Resolutions of each DNS backend source, by result (ok, nxdomain: the members go, error: the last good answer stays).",
    );
    for s in sources {
        for outcome in [Resolution::Ok, Resolution::NxDomain, Resolution::Error] {
            let _ = writeln!(
                out,
                "lbwasm_dns_resolutions_total{{listener=\"{}\",source=\"{}\",result=\"{}\"}} {}",
                esc(&s.listener),
                esc(&s.source),
                outcome.label(),
                s.count(outcome)
            );
        }
    }
    header(
        out,
        "lbwasm_dns_backends",
        "gauge",
        "Backends each DNS source has in its listener's pool (members leaving excluded).",
    );
    for s in sources {
        let _ = writeln!(
            out,
            "lbwasm_dns_backends{{listener=\"{}\",source=\"{}\"}} {}",
            esc(&s.listener),
            esc(&s.source),
            s.backends.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_by_result() {
        let s = DnsStats::new("web", "dns://a.example:80");
        s.resolved(Resolution::Ok);
        s.resolved(Resolution::Error);
        s.resolved(Resolution::Error);
        s.set_backends(3);
        let mut out = String::new();
        render(&mut out, &[s]);
        assert!(out.contains(
            "lbwasm_dns_resolutions_total{listener=\"web\",source=\"dns://a.example:80\",result=\"error\"} 2"
        ));
        assert!(out.contains("result=\"nxdomain\"} 0"));
        assert!(
            out.contains("lbwasm_dns_backends{listener=\"web\",source=\"dns://a.example:80\"} 3")
        );
    }
}
