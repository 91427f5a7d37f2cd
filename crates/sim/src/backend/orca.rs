//! ORCA in-band load reports (`--orca text|json|bin`): the backend's own load attached to
//! every response, so that a balancer can weigh backends without polling `/load`.
//!
//! The shapes are the ones Envoy and gRPC read:
//! - header `endpoint-load-metrics: TEXT cpu_utilization=0.42, mem_utilization=0.3`;
//! - header `endpoint-load-metrics: JSON {"cpu_utilization":0.42,"mem_utilization":0.3}`;
//! - header `endpoint-load-metrics: BIN <base64 of a protobuf xds.data.orca.v3.OrcaLoadReport>`;
//! - on gRPC responses, whatever the format, the trailer `endpoint-load-metrics-bin:
//!   <base64 protobuf>` (gRPC's binary-metadata convention) instead of the header.
//!
//! The figures are the `/load` ones as fractions: `cpu_utilization` = `cpu_percent` / 100
//! (this server's own CPU over the last ~1 s; above 1.0 when its CPU work keeps more than
//! one core busy, which ORCA allows), `mem_utilization` = `memory_percent` / 100.

use hyper::header::{HeaderName, HeaderValue};

pub use super::config::OrcaFormat;
use super::state::LoadReport;

/// The header carrying a report on HTTP responses.
pub const ORCA_HEADER: HeaderName = HeaderName::from_static("endpoint-load-metrics");
/// The trailer carrying a report on gRPC responses (binary metadata, base64).
pub const ORCA_TRAILER: HeaderName = HeaderName::from_static("endpoint-load-metrics-bin");

/// The two ORCA figures of a report, as fractions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OrcaFigures {
    /// Fraction of one core (may exceed 1.0).
    pub cpu_utilization: f64,
    /// Fraction of the memory available.
    pub mem_utilization: f64,
}

impl OrcaFigures {
    /// The `/load` figures as ORCA fractions, rounded to 6 decimals so that the text forms
    /// stay short and equal what the binary form decodes to.
    pub fn from_load(report: &LoadReport) -> Self {
        let frac = |percent: f32| (f64::from(percent) / 100.0 * 1e6).round() / 1e6;
        Self {
            cpu_utilization: frac(report.cpu_percent),
            mem_utilization: frac(report.memory_percent),
        }
    }

    /// The protobuf `OrcaLoadReport { double cpu_utilization = 1; double mem_utilization = 2; }`,
    /// zero fields omitted as proto3 does.
    pub fn to_protobuf(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(18);
        for (tag, v) in [(0x09u8, self.cpu_utilization), (0x11, self.mem_utilization)] {
            if v != 0.0 {
                out.push(tag); // field number << 3 | wire type 1 (64-bit)
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Reads back what [`Self::to_protobuf`] writes (unknown fields skipped); `None` on
    /// malformed input. Tests and consumers use it to check the binary form.
    pub fn from_protobuf(mut buf: &[u8]) -> Option<Self> {
        let mut out = Self {
            cpu_utilization: 0.0,
            mem_utilization: 0.0,
        };
        while let Some((&key, rest)) = buf.split_first() {
            buf = rest;
            if key & 0x80 != 0 {
                return None; // field numbers past 15: not in this message
            }
            match key & 7 {
                1 => {
                    let (v, rest) = buf.split_first_chunk::<8>()?;
                    buf = rest;
                    let v = f64::from_le_bytes(*v);
                    match key >> 3 {
                        1 => out.cpu_utilization = v,
                        2 => out.mem_utilization = v,
                        _ => {}
                    }
                }
                0 => {
                    let n = buf.iter().position(|b| b & 0x80 == 0)?;
                    buf = &buf[n + 1..];
                }
                2 => {
                    let (len, rest) = read_varint(buf)?;
                    let len = usize::try_from(len).ok()?;
                    buf = rest.get(len..)?;
                }
                5 => buf = buf.get(4..)?,
                _ => return None,
            }
        }
        Some(out)
    }

    /// The `endpoint-load-metrics` header value in `format`.
    pub fn header(self, format: OrcaFormat) -> HeaderValue {
        let text = match format {
            OrcaFormat::Text => format!(
                "TEXT cpu_utilization={}, mem_utilization={}",
                self.cpu_utilization, self.mem_utilization
            ),
            OrcaFormat::Json => format!(
                "JSON {}",
                serde_json::json!({
                    "cpu_utilization": self.cpu_utilization,
                    "mem_utilization": self.mem_utilization,
                })
            ),
            OrcaFormat::Bin => format!("BIN {}", base64(&self.to_protobuf())),
        };
        HeaderValue::try_from(text).unwrap_or(HeaderValue::from_static("TEXT"))
    }

    /// The `endpoint-load-metrics-bin` trailer value (base64 protobuf).
    pub fn trailer(self) -> HeaderValue {
        HeaderValue::try_from(base64(&self.to_protobuf())).unwrap_or(HeaderValue::from_static(""))
    }
}

fn read_varint(buf: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, &buf[i + 1..]));
        }
    }
    None
}

/// Standard base64 with padding (what gRPC `-bin` metadata and Envoy's `BIN` expect).
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base64_decode(text: &str) -> Option<Vec<u8>> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(text).ok()
    }

    #[test]
    fn report_shapes() {
        let f = OrcaFigures {
            cpu_utilization: 0.42,
            mem_utilization: 0.3,
        };
        assert_eq!(
            f.header(OrcaFormat::Text),
            "TEXT cpu_utilization=0.42, mem_utilization=0.3"
        );
        assert_eq!(
            f.header(OrcaFormat::Json),
            r#"JSON {"cpu_utilization":0.42,"mem_utilization":0.3}"#
        );
        let bin = f.header(OrcaFormat::Bin);
        let b64 = bin.to_str().unwrap().strip_prefix("BIN ").unwrap();
        let proto = base64_decode(b64).unwrap();
        assert_eq!(proto.len(), 18);
        assert_eq!((proto[0], proto[9]), (0x09, 0x11));
        assert_eq!(OrcaFigures::from_protobuf(&proto), Some(f));
        assert_eq!(f.trailer(), b64);
        let zero = OrcaFigures {
            cpu_utilization: 0.0,
            mem_utilization: 0.5,
        };
        assert_eq!(zero.to_protobuf().len(), 9);
        assert_eq!(OrcaFigures::from_protobuf(&zero.to_protobuf()), Some(zero));
    }

    #[test]
    fn from_load_takes_fractions() {
        let r = LoadReport {
            server: "b".into(),
            cpu_percent: 42.0,
            memory_percent: 30.0,
            connections: 0,
            requests: 0,
            process_cpu_percent: 0.0,
        };
        let f = OrcaFigures::from_load(&r);
        assert_eq!((f.cpu_utilization, f.mem_utilization), (0.42, 0.3));
    }
}
