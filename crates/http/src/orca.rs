//! ORCA in-band load reports (xDS `xds.data.orca.v3.OrcaLoadReport`): what a backend says
//! about its own load on the responses it sends, parsed strictly so that a report is taken
//! whole or not at all.
//!
//! Two fields carry one, as Envoy's parser (`source/common/orca/orca_parser.cc`) reads them:
//!
//! - `endpoint-load-metrics`, whose first word names the format:
//!   - `TEXT cpu_utilization=0.3, mem_utilization=0.8, named_metrics.foo=1.5` (names:
//!     `cpu_utilization`, `mem_utilization`, `application_utilization`, `rps_fractional`,
//!     `eps`, `named_metrics.NAME`);
//!   - `JSON {"cpu_utilization":0.3,"named_metrics":{"foo":1.5}}` (the proto3 JSON mapping:
//!     the snake_case or lowerCamelCase names, the three maps as objects, `rps` a number);
//!   - `BIN <base64 of the serialized protobuf>`;
//! - `endpoint-load-metrics-bin` (a header or a gRPC trailer, binary metadata): the base64
//!   of the serialized protobuf, padded or not.
//!
//! Refused, with an error saying what: NaN, infinities, negative values, a name given twice,
//! a name TEXT or JSON does not know, an empty metric name, bad base64, a protobuf that does
//! not parse (truncated, a known field with the wrong wire type, a group). Unknown protobuf
//! fields are skipped, as protobuf readers must.
//!
//! "Not reported" stays distinct from zero ([`Option`]) wherever the wire says so. In the
//! binary form proto3 does not encode a zero, so an absent field reads as `None` there too:
//! ORCA's consumers (gRPC's weighted round robin, Envoy's) treat a zero utilization as
//! unset as well, so nothing is lost.
//!
//! The protobuf is decoded by hand (wire types 0, 1, 2 and 5): nine fields do not justify a
//! code generator in the build.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};

/// The header (any format) and the binary header or trailer carrying ORCA reports.
pub const HEADER: &str = "endpoint-load-metrics";
/// The binary form's header or trailer (gRPC binary metadata).
pub const HEADER_BIN: &str = "endpoint-load-metrics-bin";

/// One load report, as the backend sent it. Utilizations are fractions (usually 0..=1;
/// `cpu_utilization` and `application_utilization` may exceed 1 past a soft limit, which
/// ORCA allows); every value is finite and non-negative.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrcaReport {
    /// CPU used, as a fraction of what the backend may use.
    pub cpu_utilization: Option<f64>,
    /// Memory used, as a fraction of what the backend may use.
    pub mem_utilization: Option<f64>,
    /// The application's own notion of utilization.
    pub application_utilization: Option<f64>,
    /// Queries per second.
    pub rps_fractional: Option<f64>,
    /// Errors per second.
    pub eps: Option<f64>,
    /// Queries per second, integral (deprecated by ORCA for `rps_fractional`).
    pub rps: Option<u64>,
    /// Per-request costs, by name (JSON and binary only), in the order sent.
    pub request_cost: Vec<(String, f64)>,
    /// Other utilizations, by name (JSON and binary only), in the order sent.
    pub utilization: Vec<(String, f64)>,
    /// Application-defined metrics, by name, in the order sent.
    pub named_metrics: Vec<(String, f64)>,
}

/// Why a report was refused: the whole report is dropped, never partly applied; the text
/// says what was wrong, for the debug log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrcaError(String);

impl fmt::Display for OrcaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OrcaError {}

fn err<T>(msg: impl Into<String>) -> Result<T, OrcaError> {
    Err(OrcaError(msg.into()))
}

/// Whether a field name is one of the two report fields (case-insensitive); compares only
/// names of the right length, so that a response without a report costs next to nothing.
#[inline]
pub fn is_report_field(name: &[u8]) -> bool {
    (name.len() == HEADER.len() || name.len() == HEADER_BIN.len())
        && (name.eq_ignore_ascii_case(HEADER.as_bytes())
            || name.eq_ignore_ascii_case(HEADER_BIN.as_bytes()))
}

/// The report among a message's fields (name, value), as Envoy picks it:
/// `endpoint-load-metrics-bin` if present, otherwise `endpoint-load-metrics`; none when
/// neither is there. The chosen field given twice is ambiguous, so refused.
pub fn from_fields<'a>(
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Option<Result<OrcaReport, OrcaError>> {
    let (mut bin, mut text) = ((None, 0), (None, 0));
    for (name, value) in fields.filter(|(n, _)| is_report_field(n)) {
        let slot = if name.len() == HEADER_BIN.len() {
            &mut bin
        } else {
            &mut text
        };
        slot.0.get_or_insert(value);
        slot.1 += 1;
    }
    Some(match (bin, text) {
        ((Some(_), n), _) if n > 1 => err(format!("{HEADER_BIN} given {n} times")),
        ((Some(v), _), _) => parse_bin(v),
        ((None, _), (Some(_), n)) if n > 1 => err(format!("{HEADER} given {n} times")),
        ((None, _), (Some(v), _)) => parse(v),
        _ => return None,
    })
}

/// Parses the value of `endpoint-load-metrics` (`TEXT …`, `JSON …` or `BIN …`).
pub fn parse(value: &[u8]) -> Result<OrcaReport, OrcaError> {
    let value = trim(value);
    let (format, rest) = match value.iter().position(|&b| b == b' ') {
        Some(i) => (&value[..i], trim(&value[i + 1..])),
        None => (value, &[][..]),
    };
    match format {
        b"TEXT" => parse_text(rest),
        b"JSON" => parse_json(rest),
        b"BIN" => parse_bin(rest),
        other => err(format!(
            "unsupported format {:?} (expected TEXT, JSON or BIN)",
            String::from_utf8_lossy(other)
        )),
    }
}

/// Parses the value of `endpoint-load-metrics-bin`: base64 (standard alphabet, padded or
/// not) of a serialized `OrcaLoadReport`.
pub fn parse_bin(value: &[u8]) -> Result<OrcaReport, OrcaError> {
    let value = trim(value);
    if value.is_empty() {
        return err("empty binary report");
    }
    let bytes = base64_decode(value)?;
    decode_protobuf(&bytes)
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// A value as ORCA allows it: a number, finite, not negative.
fn check(name: &str, v: f64) -> Result<f64, OrcaError> {
    if v.is_nan() {
        err(format!("{name}: NaN"))
    } else if v.is_infinite() {
        err(format!("{name}: infinite"))
    } else if v < 0.0 {
        err(format!("{name}: negative ({v})"))
    } else {
        Ok(v)
    }
}

/// Sets a scalar once: a second value for it is a duplicate.
fn set_once(slot: &mut Option<f64>, name: &str, v: f64) -> Result<(), OrcaError> {
    if slot.is_some() {
        return err(format!("{name} given twice"));
    }
    *slot = Some(check(name, v)?);
    Ok(())
}

/// Adds a map entry once: an empty key or a key given twice is refused.
fn push_entry(
    map: &mut Vec<(String, f64)>,
    field: &str,
    key: String,
    v: f64,
) -> Result<(), OrcaError> {
    if key.is_empty() {
        return err(format!("{field}: empty metric name"));
    }
    if map.iter().any(|(k, _)| *k == key) {
        return err(format!("{field}.{key} given twice"));
    }
    let v = check(&format!("{field}.{key}"), v)?;
    map.push((key, v));
    Ok(())
}

/// The scalar doubles, by field name and number.
fn scalar<'r>(
    report: &'r mut OrcaReport,
    name: &str,
) -> Option<(&'static str, &'r mut Option<f64>)> {
    Some(match name {
        "cpu_utilization" | "cpuUtilization" => ("cpu_utilization", &mut report.cpu_utilization),
        "mem_utilization" | "memUtilization" => ("mem_utilization", &mut report.mem_utilization),
        "application_utilization" | "applicationUtilization" => (
            "application_utilization",
            &mut report.application_utilization,
        ),
        "rps_fractional" | "rpsFractional" => ("rps_fractional", &mut report.rps_fractional),
        "eps" => ("eps", &mut report.eps),
        _ => return None,
    })
}

// ---- TEXT ----

fn parse_text(rest: &[u8]) -> Result<OrcaReport, OrcaError> {
    let text = std::str::from_utf8(rest).map_err(|_| OrcaError("TEXT: not UTF-8".into()))?;
    let mut report = OrcaReport::default();
    let mut any = false;
    // An HTTP list: empty elements are allowed (RFC 9110 §5.6.1) and skipped.
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        any = true;
        let Some((name, value)) = item.split_once('=') else {
            return err(format!("TEXT: {item:?} is not name=value"));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() || value.is_empty() {
            return err(format!("TEXT: {item:?} has an empty name or value"));
        }
        let v: f64 = value
            .parse()
            .map_err(|_| OrcaError(format!("TEXT: {name}: {value:?} is not a number")))?;
        if let Some(metric) = name.strip_prefix("named_metrics.") {
            push_entry(&mut report.named_metrics, "named_metrics", metric.into(), v)?;
        } else {
            // Only the snake_case names in TEXT (Envoy's names).
            match scalar(&mut report, name) {
                Some((canon, slot)) if canon == name => set_once(slot, name, v)?,
                _ => return err(format!("TEXT: unknown metric {name:?}")),
            }
        }
    }
    if !any {
        return err("TEXT: no metric");
    }
    Ok(report)
}

// ---- JSON ----

fn parse_json(rest: &[u8]) -> Result<OrcaReport, OrcaError> {
    let mut report = OrcaReport::default();
    let mut de = serde_json::Deserializer::from_slice(rest);
    JsonReport(&mut report)
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| OrcaError(format!("JSON: {e}")))?;
    Ok(report)
}

/// The top-level object, read field by field so that duplicates and unknown names are
/// seen (a map deserialized whole would keep the last of two silently).
struct JsonReport<'r>(&'r mut OrcaReport);

impl<'de> DeserializeSeed<'de> for JsonReport<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for JsonReport<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of OrcaLoadReport fields")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let report = self.0;
        let mut seen: Vec<&'static str> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let canon: &'static str = match key.as_str() {
                "rps" => "rps",
                "request_cost" | "requestCost" => "request_cost",
                "utilization" => "utilization",
                "named_metrics" | "namedMetrics" => "named_metrics",
                other => match scalar(report, other) {
                    Some((canon, _)) => canon,
                    None => return Err(de::Error::custom(format!("unknown field {other:?}"))),
                },
            };
            if seen.contains(&canon) {
                return Err(de::Error::custom(format!("{canon} given twice")));
            }
            seen.push(canon);
            let custom = |e: OrcaError| de::Error::custom(e.0);
            match canon {
                "rps" => report.rps = Some(map.next_value::<u64>()?),
                "request_cost" => {
                    map.next_value_seed(JsonMetrics(&mut report.request_cost, canon))?
                }
                "utilization" => {
                    map.next_value_seed(JsonMetrics(&mut report.utilization, canon))?
                }
                "named_metrics" => {
                    map.next_value_seed(JsonMetrics(&mut report.named_metrics, canon))?
                }
                _ => {
                    let v: f64 = map.next_value()?;
                    if let Some((name, slot)) = scalar(report, canon) {
                        set_once(slot, name, v).map_err(custom)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// One of the three maps, as an object of numbers.
struct JsonMetrics<'r>(&'r mut Vec<(String, f64)>, &'static str);

impl<'de> DeserializeSeed<'de> for JsonMetrics<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for JsonMetrics<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an object of numbers for {}", self.1)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            let v: f64 = map.next_value()?;
            push_entry(self.0, self.1, key, v).map_err(|e| de::Error::custom(e.0))?;
        }
        Ok(())
    }
}

// ---- base64 ----

/// Standard-alphabet base64, padded or not (gRPC sends `-bin` metadata either way);
/// anything else (URL-safe letters, spaces, stray bits, padding in the middle) is refused.
fn base64_decode(input: &[u8]) -> Result<Vec<u8>, OrcaError> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const STANDARD_ANY_PAD: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    STANDARD_ANY_PAD
        .decode(input)
        .or_else(|e| err(format!("bad base64: {e}")))
}

// ---- protobuf ----

/// A cursor over protobuf bytes.
struct Wire<'a>(&'a [u8]);

const VARINT: u64 = 0;
const I64: u64 = 1;
const LEN: u64 = 2;
const I32: u64 = 5;

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64, OrcaError> {
        let mut v = 0u64;
        for i in 0..10 {
            let Some((&b, rest)) = self.0.split_first() else {
                return err("protobuf: truncated varint");
            };
            self.0 = rest;
            if i == 9 && b > 1 {
                return err("protobuf: varint overflows 64 bits");
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        err("protobuf: varint longer than 10 bytes")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], OrcaError> {
        if self.0.len() < n {
            return err("protobuf: truncated field");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn double(&mut self) -> Result<f64, OrcaError> {
        let b = self.take(8)?;
        Ok(f64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn bytes(&mut self) -> Result<&'a [u8], OrcaError> {
        let len = self.varint()?;
        let len =
            usize::try_from(len).map_err(|_| OrcaError("protobuf: length too large".into()))?;
        self.take(len)
    }

    /// The next (field number, wire type), or none at the end.
    fn tag(&mut self) -> Result<Option<(u64, u64)>, OrcaError> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 0 {
            return err("protobuf: field number 0");
        }
        Ok(Some((field, wire)))
    }

    /// Skips a field of an unknown number.
    fn skip(&mut self, wire: u64) -> Result<(), OrcaError> {
        match wire {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            I32 => self.take(4).map(drop),
            other => err(format!("protobuf: unsupported wire type {other}")),
        }
    }
}

fn expect_wire(name: &str, got: u64, want: u64) -> Result<(), OrcaError> {
    if got != want {
        return err(format!(
            "protobuf: {name} has wire type {got}, expected {want}"
        ));
    }
    Ok(())
}

fn decode_protobuf(bytes: &[u8]) -> Result<OrcaReport, OrcaError> {
    let mut report = OrcaReport::default();
    let mut w = Wire(bytes);
    while let Some((field, wire)) = w.tag()? {
        let name = match field {
            1 => "cpu_utilization",
            2 => "mem_utilization",
            3 => "rps",
            4 => "request_cost",
            5 => "utilization",
            6 => "rps_fractional",
            7 => "eps",
            8 => "named_metrics",
            9 => "application_utilization",
            _ => {
                w.skip(wire)?;
                continue;
            }
        };
        match field {
            3 => {
                expect_wire(name, wire, VARINT)?;
                let v = w.varint()?;
                if report.rps.replace(v).is_some() {
                    return err("rps given twice");
                }
            }
            4 | 5 | 8 => {
                expect_wire(name, wire, LEN)?;
                let (key, v) = map_entry(name, w.bytes()?)?;
                let map = match field {
                    4 => &mut report.request_cost,
                    5 => &mut report.utilization,
                    _ => &mut report.named_metrics,
                };
                push_entry(map, name, key, v)?;
            }
            _ => {
                expect_wire(name, wire, I64)?;
                let v = w.double()?;
                if let Some((canon, slot)) = scalar(&mut report, name) {
                    set_once(slot, canon, v)?;
                }
            }
        }
    }
    Ok(report)
}

/// A `map<string, double>` entry: key = 1, value = 2 (absent: protobuf's defaults).
fn map_entry(name: &str, bytes: &[u8]) -> Result<(String, f64), OrcaError> {
    let mut w = Wire(bytes);
    let (mut key, mut value) = (None, None);
    while let Some((field, wire)) = w.tag()? {
        match field {
            1 => {
                expect_wire("map key", wire, LEN)?;
                let k = std::str::from_utf8(w.bytes()?)
                    .map_err(|_| OrcaError(format!("protobuf: {name} key is not UTF-8")))?;
                if key.replace(k.to_string()).is_some() {
                    return err(format!("protobuf: {name} entry with two keys"));
                }
            }
            2 => {
                expect_wire("map value", wire, I64)?;
                if value.replace(w.double()?).is_some() {
                    return err(format!("protobuf: {name} entry with two values"));
                }
            }
            _ => w.skip(wire)?,
        }
    }
    Ok((key.unwrap_or_default(), value.unwrap_or(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made protobuf writer: the test's encoder is independent of the decoder.
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn double(out: &mut Vec<u8>, field: u64, v: f64) {
        varint(out, field << 3 | 1);
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn entry(out: &mut Vec<u8>, field: u64, key: &str, v: f64) {
        let mut e = Vec::new();
        varint(&mut e, 1 << 3 | 2);
        varint(&mut e, key.len() as u64);
        e.extend_from_slice(key.as_bytes());
        double(&mut e, 2, v);
        varint(out, field << 3 | 2);
        varint(out, e.len() as u64);
        out.extend_from_slice(&e);
    }
    fn base64(bytes: &[u8], pad: bool) -> String {
        use base64::Engine as _;
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
        if pad {
            STANDARD.encode(bytes)
        } else {
            STANDARD_NO_PAD.encode(bytes)
        }
    }

    fn full_report() -> OrcaReport {
        OrcaReport {
            cpu_utilization: Some(0.3),
            mem_utilization: Some(0.8),
            application_utilization: Some(0.5),
            rps_fractional: Some(10.0),
            eps: Some(1.0),
            rps: Some(12),
            request_cost: vec![("db".into(), 2.5)],
            utilization: vec![("gpu".into(), 0.25)],
            named_metrics: vec![("foo".into(), 1.5), ("bar".into(), 0.0)],
        }
    }

    fn full_protobuf() -> Vec<u8> {
        let mut p = Vec::new();
        double(&mut p, 1, 0.3);
        double(&mut p, 2, 0.8);
        varint(&mut p, 3 << 3);
        varint(&mut p, 12);
        entry(&mut p, 4, "db", 2.5);
        entry(&mut p, 5, "gpu", 0.25);
        double(&mut p, 6, 10.0);
        double(&mut p, 7, 1.0);
        entry(&mut p, 8, "foo", 1.5);
        entry(&mut p, 8, "bar", 0.0);
        double(&mut p, 9, 0.5);
        p
    }

    #[test]
    fn fields_pick_the_binary_report_and_refuse_repeats() {
        let bin = base64(&full_protobuf(), false);
        let fields = |pairs: &[(&'static str, String)]| -> Vec<(Vec<u8>, Vec<u8>)> {
            pairs
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        };
        let pick = |f: &[(Vec<u8>, Vec<u8>)]| {
            from_fields(f.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
        };
        let none = fields(&[("content-type", "text/plain".into())]);
        assert_eq!(pick(&none), None);
        let both = fields(&[
            ("Endpoint-Load-Metrics", "TEXT cpu_utilization=0.1".into()),
            ("endpoint-load-metrics-BIN", bin.clone()),
        ]);
        assert_eq!(pick(&both), Some(Ok(full_report())), "the binary one wins");
        let text = fields(&[("endpoint-load-metrics", "TEXT eps=2".into())]);
        assert_eq!(pick(&text).unwrap().unwrap().eps, Some(2.0));
        let twice = fields(&[
            ("endpoint-load-metrics", "TEXT eps=2".into()),
            ("endpoint-load-metrics", "TEXT eps=3".into()),
        ]);
        assert!(
            pick(&twice)
                .unwrap()
                .unwrap_err()
                .to_string()
                .contains("2 times")
        );
        assert!(is_report_field(b"ENDPOINT-LOAD-METRICS"));
        assert!(!is_report_field(b"endpoint-load-metricz"));
    }

    #[test]
    fn text_reads_every_scalar_and_named_metrics() {
        let r = parse(b"TEXT cpu_utilization=0.3, mem_utilization=0.8, application_utilization=0.5, rps_fractional=10, eps=1, named_metrics.foo=1.5").unwrap();
        assert_eq!(r.cpu_utilization, Some(0.3));
        assert_eq!(r.mem_utilization, Some(0.8));
        assert_eq!(r.application_utilization, Some(0.5));
        assert_eq!(r.rps_fractional, Some(10.0));
        assert_eq!(r.eps, Some(1.0));
        assert_eq!(r.named_metrics, vec![("foo".to_string(), 1.5)]);
        assert_eq!(r.rps, None);
    }

    #[test]
    fn absent_stays_distinct_from_zero() {
        let r = parse(b"TEXT cpu_utilization=0").unwrap();
        assert_eq!(r.cpu_utilization, Some(0.0));
        assert_eq!(r.mem_utilization, None);
        let r = parse(b"JSON {\"mem_utilization\":0}").unwrap();
        assert_eq!((r.cpu_utilization, r.mem_utilization), (None, Some(0.0)));
    }

    #[test]
    fn json_reads_both_spellings_and_maps() {
        let r = parse(br#"JSON {"cpu_utilization":0.3,"memUtilization":0.8,"applicationUtilization":0.5,"rps_fractional":10,"eps":1,"rps":12,"requestCost":{"db":2.5},"utilization":{"gpu":0.25},"named_metrics":{"foo":1.5,"bar":0}}"#).unwrap();
        assert_eq!(r, full_report());
    }

    #[test]
    fn binary_round_trip_padded_unpadded_and_in_the_header() {
        let p = full_protobuf();
        let padded = base64(&p, true);
        let unpadded = base64(&p, false);
        assert_ne!(padded, unpadded, "the example needs padding");
        assert_eq!(parse_bin(padded.as_bytes()).unwrap(), full_report());
        assert_eq!(parse_bin(unpadded.as_bytes()).unwrap(), full_report());
        assert_eq!(
            parse(format!("BIN {padded}").as_bytes()).unwrap(),
            full_report()
        );
    }

    #[test]
    fn binary_skips_unknown_fields_of_every_wire_type() {
        let mut p = Vec::new();
        varint(&mut p, 20 << 3); // varint
        varint(&mut p, 300);
        double(&mut p, 21, 1.0); // 64-bit
        varint(&mut p, 22 << 3 | 2); // length-delimited
        varint(&mut p, 3);
        p.extend_from_slice(b"abc");
        varint(&mut p, 23 << 3 | 5); // 32-bit
        p.extend_from_slice(&[0; 4]);
        double(&mut p, 1, 0.95);
        let r = parse_bin(base64(&p, true).as_bytes()).unwrap();
        assert_eq!(r.cpu_utilization, Some(0.95));
        assert_eq!(
            r.mem_utilization, None,
            "absent in the binary form: unknown"
        );
    }

    #[test]
    fn empty_binary_report_parses_as_no_figures() {
        // An all-zero report serializes to nothing; "BIN" with an empty payload is refused
        // (no payload at all), but a payload of unknown fields only is an empty report.
        let mut p = Vec::new();
        varint(&mut p, 30 << 3);
        varint(&mut p, 1);
        assert_eq!(
            parse_bin(base64(&p, true).as_bytes()).unwrap(),
            OrcaReport::default()
        );
        assert!(parse(b"BIN").is_err());
    }

    fn refused(value: &[u8], what: &str) {
        let e = parse(value).expect_err(&String::from_utf8_lossy(value));
        assert!(e.to_string().contains(what), "{value:?}: {e}");
    }

    #[test]
    fn text_refusals() {
        refused(b"TEXT cpu_utilization=NaN", "NaN");
        refused(b"TEXT cpu_utilization=inf", "infinite");
        refused(b"TEXT cpu_utilization=-infinity", "infinite");
        refused(b"TEXT mem_utilization=-0.1", "negative");
        refused(b"TEXT cpu_utilization=0.1, cpu_utilization=0.2", "twice");
        refused(b"TEXT named_metrics.a=1, named_metrics.a=2", "twice");
        refused(b"TEXT cpu=0.1", "unknown metric");
        refused(b"TEXT cpuUtilization=0.1", "unknown metric");
        refused(b"TEXT utilization.gpu=0.1", "unknown metric");
        refused(b"TEXT named_metrics.=1", "empty metric name");
        refused(b"TEXT cpu_utilization", "not name=value");
        refused(b"TEXT cpu_utilization=", "empty");
        refused(b"TEXT cpu_utilization=0.3x", "not a number");
        refused(b"TEXT ", "no metric");
        refused(b"TEXT cpu_utilization=0.1, eps=-1", "negative");
        refused(b"XML <a/>", "unsupported format");
        refused(b"text cpu_utilization=0.1", "unsupported format");
    }

    #[test]
    fn json_refusals() {
        refused(br#"JSON {"cpu_utilization":-1}"#, "negative");
        refused(br#"JSON {"cpu_utilization":"NaN"}"#, "JSON");
        refused(br#"JSON {"cpu_utilization":1e999}"#, "JSON");
        refused(
            br#"JSON {"cpu_utilization":0.1,"cpu_utilization":0.2}"#,
            "twice",
        );
        refused(
            br#"JSON {"cpu_utilization":0.1,"cpuUtilization":0.2}"#,
            "twice",
        );
        refused(br#"JSON {"named_metrics":{"a":1,"a":2}}"#, "twice");
        refused(br#"JSON {"named_metrics":{"a":-1}}"#, "negative");
        refused(br#"JSON {"named_metrics":{"":1}}"#, "empty metric name");
        refused(br#"JSON {"cpu":0.1}"#, "unknown field");
        refused(br#"JSON {"cpu_utilization":0.1} x"#, "JSON");
        refused(br#"JSON [0.1]"#, "JSON");
        refused(br#"JSON {"rps":-1}"#, "JSON");
    }

    #[test]
    fn binary_refusals() {
        let bin = |p: &[u8]| parse_bin(base64(p, true).as_bytes());
        let mut nan = Vec::new();
        double(&mut nan, 1, f64::NAN);
        assert!(bin(&nan).unwrap_err().to_string().contains("NaN"));
        let mut inf = Vec::new();
        double(&mut inf, 9, f64::INFINITY);
        assert!(bin(&inf).unwrap_err().to_string().contains("infinite"));
        let mut neg = Vec::new();
        entry(&mut neg, 8, "q", -2.0);
        assert!(bin(&neg).unwrap_err().to_string().contains("negative"));
        let mut dup = Vec::new();
        double(&mut dup, 2, 0.1);
        double(&mut dup, 2, 0.2);
        assert!(bin(&dup).unwrap_err().to_string().contains("twice"));
        let mut dup_key = Vec::new();
        entry(&mut dup_key, 5, "k", 0.1);
        entry(&mut dup_key, 5, "k", 0.2);
        assert!(bin(&dup_key).unwrap_err().to_string().contains("twice"));
        let mut wrong_wire = Vec::new();
        varint(&mut wrong_wire, 1 << 3); // cpu_utilization as a varint
        varint(&mut wrong_wire, 1);
        assert!(
            bin(&wrong_wire)
                .unwrap_err()
                .to_string()
                .contains("wire type")
        );
        let mut truncated = Vec::new();
        double(&mut truncated, 1, 0.5);
        truncated.pop();
        assert!(
            bin(&truncated)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        let mut group = Vec::new();
        varint(&mut group, 40 << 3 | 3);
        assert!(bin(&group).unwrap_err().to_string().contains("wire type 3"));
        assert!(
            bin(&[0x00])
                .unwrap_err()
                .to_string()
                .contains("field number 0")
        );
        assert!(bin(&[0xff; 11]).is_err());
        // Base64 itself.
        for bad in ["QQ=A", "Q", "QQ===", "QQ-_", "QR==", "QQ Q="] {
            assert!(parse_bin(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(parse_bin(b"").is_err());
    }
}
