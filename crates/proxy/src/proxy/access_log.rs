//! Access logs: a line per request (HTTP) or per connection (TCP), in NGINX's `combined`
//! format followed by the backend, the time taken and the attempts:
//!
//! ```text
//! 127.0.0.1 - - [30/Nov/2026:12:40:00 +0000] "GET /a?b=1 HTTP/1.1" 200 7 "-" "curl/8.5.0" "127.0.0.1:9101" 0.001 1
//! 127.0.0.1 - - [30/Nov/2026:12:40:02 +0000] "TCP" 200 5120 "-" "-" "127.0.0.1:9201" 2.504 1 380
//! ```
//!
//! On a TLS listener an HTTP line ends with the protocol version and the ALPN protocol
//! (`TLSv1.3 h2`; `-` when none was negotiated), as NGINX's `$ssl_protocol`.
//!
//! The bytes are the body sent to the client (HTTP), or the bytes relayed to the client
//! then those from it (TCP). The time is from the request's head (or the connection's
//! accept) to the end of the response body (or of the connection). A TCP `status` is 200
//! (relayed), 502 (no backend could be reached) or 503 (none to try). Bytes outside
//! printable ASCII, `"` and `\` are written as `\xHH`, so a client cannot forge a line.
//!
//! A worker formats lines into its own buffer and writes it whole — at 16 KiB, every
//! second, and when the worker stops — to the file, opened `O_APPEND`: the data path
//! makes no system call per line, and lines from different workers never interleave. A
//! reload (SIGHUP, `POST /reload`) reopens the file, so logrotate only has to rename it.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use arc_swap::cache::Cache;
use lbwasm_http::ReqHead;

use super::date;
use crate::config::AccessLogTarget;

/// A worker's buffer is written out when it reaches this size.
const FLUSH_AT: usize = 16 * 1024;

/// A listener's access log as all workers share it: where lines go, swapped by a reload.
#[derive(Default)]
pub struct AccessLog {
    sink: Arc<ArcSwapOption<Sink>>,
}

/// An open log: the file, or standard output.
pub struct Sink {
    target: AccessLogTarget,
    file: Option<File>,
    /// A failing log (disk full, closed pipe) is reported once, not on every flush.
    failed: AtomicBool,
}

impl AccessLog {
    /// Opens `target` (none: no access log).
    pub fn open(target: Option<&AccessLogTarget>) -> io::Result<Self> {
        let log = AccessLog::default();
        log.install(Self::prepare(target)?);
        Ok(log)
    }

    /// Opens `target` anew (a rotated file is created again), for [`AccessLog::install`]:
    /// a reload opens every listener's log before it changes anything.
    pub fn prepare(target: Option<&AccessLogTarget>) -> io::Result<Prepared> {
        let sink = match target {
            None => None,
            Some(AccessLogTarget::Stdout) => Some(Sink {
                target: AccessLogTarget::Stdout,
                file: None,
                failed: AtomicBool::new(false),
            }),
            Some(AccessLogTarget::File(path)) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot open the access log {}: {e}", path.display()),
                        )
                    })?;
                Some(Sink {
                    target: AccessLogTarget::File(path.clone()),
                    file: Some(file),
                    failed: AtomicBool::new(false),
                })
            }
        };
        Ok(Prepared(sink.map(Arc::new)))
    }

    /// Sends later lines to `prepared` (lines already buffered by workers go there too).
    pub fn install(&self, prepared: Prepared) {
        self.sink.store(prepared.0);
    }

    /// Where lines go now.
    pub fn target(&self) -> Option<AccessLogTarget> {
        self.sink.load().as_ref().map(|s| s.target.clone())
    }
}

/// An access log opened by [`AccessLog::prepare`], not yet in use.
pub struct Prepared(Option<Arc<Sink>>);

impl Sink {
    fn write(&self, buf: &[u8]) -> io::Result<()> {
        match &self.file {
            // O_APPEND: each write lands whole at the end, whoever else writes.
            Some(file) => (&*file).write_all(buf),
            None => io::stdout().lock().write_all(buf),
        }
    }
}

/// A worker's view of the shared sink: re-read only when a reload replaced it.
type SinkCache = Cache<Arc<ArcSwapOption<Sink>>, Option<Arc<Sink>>>;

/// One worker's side of a listener's access log: the buffer its lines wait in.
pub(super) struct LocalLog {
    sink: RefCell<SinkCache>,
    buf: RefCell<Vec<u8>>,
}

impl LocalLog {
    pub(super) fn new(shared: &AccessLog) -> Self {
        LocalLog {
            sink: RefCell::new(Cache::new(shared.sink.clone())),
            buf: RefCell::new(Vec::new()),
        }
    }

    /// Whether lines are wanted (checked per request: a pointer read).
    pub(super) fn enabled(&self) -> bool {
        self.sink.borrow_mut().load().is_some()
    }

    /// Writes out what is buffered.
    pub(super) fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        let mut cache = self.sink.borrow_mut();
        if let Some(sink) = cache.load()
            && let Err(error) = sink.write(&buf)
            && !sink.failed.swap(true, Ordering::Relaxed)
        {
            let target = match &sink.target {
                AccessLogTarget::File(p) => p.display().to_string(),
                AccessLogTarget::Stdout => "standard output".to_owned(),
            };
            tracing::warn!(%target, %error, "cannot write the access log; lines are lost while this lasts (reported once per opening of the log)");
        }
        buf.clear();
    }

    fn push(&self, line: impl FnOnce(&mut Vec<u8>)) {
        let full = {
            let mut buf = self.buf.borrow_mut();
            line(&mut buf);
            buf.len() >= FLUSH_AT
        };
        if full {
            self.flush();
        }
    }
}

impl Drop for LocalLog {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A request's line, written when its response ends (dropped with the response body).
pub(super) struct Pending {
    log: Rc<LocalLog>,
    client: IpAddr,
    start: Instant,
    /// The request line, then the referer, then the user agent; each escaped.
    text: Vec<u8>,
    request_end: usize,
    referer_end: usize,
    status: u16,
    backend: Option<SocketAddr>,
    tries: usize,
    /// Body bytes handed to the client connection.
    pub(super) sent: u64,
    /// TLS version and ALPN protocol, written after the attempts on a TLS listener.
    pub(super) tls: Option<(&'static str, &'static str)>,
}

impl Pending {
    /// Notes what the line needs of `head` before it goes to a backend.
    pub(super) fn begin(
        log: &Rc<LocalLog>,
        client: IpAddr,
        head: &ReqHead,
        start: Instant,
        tls: Option<(&'static str, &'static str)>,
    ) -> Self {
        let mut text = Vec::with_capacity(128);
        text.extend_from_slice(head.method.as_str().as_bytes());
        text.push(b' ');
        // The origin form, as the client of an HTTP/1.1 request sent it (HTTP/2 has the
        // parts separately: NGINX logs the same).
        match head.uri.path_and_query() {
            Some(p) => escape(&mut text, p.as_str().as_bytes()),
            None => escape(&mut text, head.uri.to_string().as_bytes()),
        }
        text.push(b' ');
        text.extend_from_slice(version(head.version).as_bytes());
        let request_end = text.len();
        escape(&mut text, head.fields.get("referer").unwrap_or(b"-"));
        let referer_end = text.len();
        escape(&mut text, head.fields.get("user-agent").unwrap_or(b"-"));
        Pending {
            log: log.clone(),
            client,
            start,
            text,
            request_end,
            referer_end,
            status: 0,
            backend: None,
            tries: 0,
            sent: 0,
            tls,
        }
    }

    /// A line for a request whose head could not be read: `"-"` for the request.
    pub(super) fn without_request(log: &Rc<LocalLog>, client: IpAddr, start: Instant) -> Self {
        Pending {
            log: log.clone(),
            client,
            start,
            text: b"---".to_vec(),
            request_end: 1,
            referer_end: 2,
            status: 0,
            backend: None,
            tries: 0,
            sent: 0,
            tls: None,
        }
    }

    /// The answer: its status, the backend that gave it (or failed last) and the attempts.
    pub(super) fn answered(&mut self, status: u16, backend: Option<SocketAddr>, tries: usize) {
        self.status = status;
        self.backend = backend;
        self.tries = tries;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let t = &self.text;
        let (request, referer, agent) = (
            &t[..self.request_end],
            &t[self.request_end..self.referer_end],
            &t[self.referer_end..],
        );
        let secs = self.start.elapsed().as_secs_f64();
        self.log.push(|out| {
            let _ = write!(out, "{} - - [", self.client);
            timestamp(out);
            out.extend_from_slice(b"] \"");
            out.extend_from_slice(request);
            let _ = write!(out, "\" {} {} \"", self.status, self.sent);
            out.extend_from_slice(referer);
            out.extend_from_slice(b"\" \"");
            out.extend_from_slice(agent);
            out.extend_from_slice(b"\" \"");
            backend(out, self.backend);
            let _ = write!(out, "\" {secs:.3} {}", self.tries);
            if let Some((version, alpn)) = self.tls {
                let _ = write!(out, " {version} {alpn}");
            }
            out.push(b'\n');
        });
    }
}

/// Writes a TCP connection's line: `status` 200 (relayed), 502 or 503; `(to, from)`: the
/// bytes relayed to and from the client.
pub(super) fn tcp_line(
    log: &LocalLog,
    client: IpAddr,
    start: Instant,
    status: u16,
    backend_addr: Option<SocketAddr>,
    tries: usize,
    (to_client, from_client): (u64, u64),
) {
    let secs = start.elapsed().as_secs_f64();
    log.push(|out| {
        let _ = write!(out, "{client} - - [");
        timestamp(out);
        let _ = write!(out, "] \"TCP\" {status} {to_client} \"-\" \"-\" \"");
        backend(out, backend_addr);
        let _ = writeln!(out, "\" {secs:.3} {tries} {from_client}");
    });
}

fn backend(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr {
        Some(a) => {
            let _ = write!(out, "{a}");
        }
        None => out.push(b'-'),
    }
}

fn version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// NGINX's escaping: `"`, `\`, control bytes and bytes above 0x7e as `\xHH`.
fn escape(out: &mut Vec<u8>, raw: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in raw {
        if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            out.push(b);
        } else {
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]);
        }
    }
}

/// `30/Nov/2026:12:40:00 +0000`: the fields of the cached HTTP date, in NGINX's order.
fn timestamp(out: &mut Vec<u8>) {
    date::with(|d| {
        // "Mon, 30 Nov 2026 12:40:00 GMT"
        let (day, month, year, time) = (&d[5..7], &d[8..11], &d[12..16], &d[17..25]);
        for (part, sep) in [(day, b"/"), (month, b"/"), (year, b":")] {
            out.extend_from_slice(part);
            out.extend_from_slice(sep);
        }
        out.extend_from_slice(time);
        out.extend_from_slice(b" +0000");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_lines_are_escaped() {
        let mut out = Vec::new();
        escape(&mut out, b"ok \"x\"\n127.0.0.1 \\ \xff");
        assert_eq!(out, b"ok \\x22x\\x22\\x0A127.0.0.1 \\x5C \\xFF");
    }

    #[test]
    fn timestamps_are_nginx_time_local_in_utc() {
        let mut out = Vec::new();
        timestamp(&mut out);
        let s = String::from_utf8(out).expect("ascii");
        // 30/Nov/2026:12:40:00 +0000
        let b = s.as_bytes();
        assert_eq!(s.len(), 26, "{s}");
        assert!(
            b[2] == b'/' && b[6] == b'/' && b[11] == b':' && s.ends_with(" +0000"),
            "{s}"
        );
        assert!(s[..2].bytes().all(|c| c.is_ascii_digit()), "{s}");
        assert!(s[7..11].parse::<u32>().is_ok_and(|y| y >= 2024), "{s}");
    }
}
