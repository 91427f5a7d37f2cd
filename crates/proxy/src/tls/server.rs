//! TLS termination for a listener: the rustls server configuration (versions, ALPN,
//! session tickets), the certificates chosen by SNI, their reload without dropping a
//! connection, and the handshake with its failures counted by reason.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;

use super::certs::{self, CertError, CertSet, CertSpec, Loaded};
use super::hello::{self, Hello};
use super::provider;

/// How a listener terminates TLS (`[listener.tls]`, or `--tls-cert` and `--tls-key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerTls {
    /// At least one; the first is the default certificate.
    pub certs: Vec<CertSpec>,
    /// Lowest protocol version accepted. Default TLS 1.2.
    pub min_version: TlsVersion,
    /// Clients without SNI, or with a name no certificate claims, get the first
    /// certificate (true, the default) or a failed handshake.
    pub default_for_unknown: bool,
    /// Session resumption by tickets (TLS 1.2 and 1.3). Default on.
    pub session_tickets: bool,
    /// How often the certificate and key files are looked at for changes. Default 5s.
    pub check_interval: Duration,
}

/// A TLS protocol version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TlsVersion {
    /// TLS 1.2 (and 1.3).
    #[default]
    V12,
    /// TLS 1.3 only.
    V13,
}

/// Why a handshake failed, as `/metrics` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Not TLS at all (plain HTTP to a TLS port, say).
    NotTls,
    /// No common version, cipher suite or ALPN protocol.
    Incompatible,
    /// The client's SNI names no certificate and unknown names are refused.
    UnknownName,
    /// The client sent an alert (it did not trust our certificate, typically).
    ClientAlert,
    /// The client went away or the handshake took too long.
    Closed,
    /// Anything else rustls refused.
    Other,
}

impl Failure {
    /// Every reason, in the order of the counters.
    pub const ALL: [Failure; 6] = [
        Failure::NotTls,
        Failure::Incompatible,
        Failure::UnknownName,
        Failure::ClientAlert,
        Failure::Closed,
        Failure::Other,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::NotTls => "not_tls",
            Failure::Incompatible => "incompatible",
            Failure::UnknownName => "unknown_name",
            Failure::ClientAlert => "client_alert",
            Failure::Closed => "closed",
            Failure::Other => "other",
        }
    }

    fn of(error: &std::io::Error) -> Failure {
        use rustls::Error as E;
        match error.get_ref().and_then(|e| e.downcast_ref::<E>()) {
            Some(E::InvalidMessage(_) | E::InappropriateMessage { .. }) => Failure::NotTls,
            Some(E::InappropriateHandshakeMessage { .. }) => Failure::NotTls,
            Some(E::PeerIncompatible(_) | E::NoApplicationProtocol) => Failure::Incompatible,
            Some(E::AlertReceived(_)) => Failure::ClientAlert,
            Some(E::General(m)) if m.contains("no server certificate") => Failure::UnknownName,
            Some(_) => Failure::Other,
            None => match error.kind() {
                std::io::ErrorKind::InvalidData => Failure::NotTls,
                _ => Failure::Closed,
            },
        }
    }
}

/// Handshakes completed, by version and ALPN protocol.
#[derive(Debug, Default)]
pub struct Handshakes {
    /// TLS 1.2 then 1.3, each: h2, http/1.1, none.
    done: [[AtomicU64; 3]; 2],
    failed: [AtomicU64; Failure::ALL.len()],
}

impl Handshakes {
    /// `(version, alpn, count)` of completed handshakes.
    pub fn completed(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (v, version) in ["TLSv1.2", "TLSv1.3"].into_iter().enumerate() {
            for (a, alpn) in ["h2", "http/1.1", "none"].into_iter().enumerate() {
                out.push((version, alpn, self.done[v][a].load(Ordering::Relaxed)));
            }
        }
        out
    }

    /// `(reason, count)` of failed handshakes.
    pub fn failed(&self) -> Vec<(&'static str, u64)> {
        Failure::ALL
            .iter()
            .zip(&self.failed)
            .map(|(f, n)| (f.label(), n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// A certificate as the dashboard and `/backends` show it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertInfo {
    /// The names it is chosen for.
    pub names: Vec<String>,
    /// The leaf's subject.
    pub subject: String,
    /// Serial number, hex.
    pub serial: String,
    /// notAfter, as text (UTC).
    pub not_after: String,
    /// notAfter, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// Whether it has expired.
    pub expired: bool,
}

/// A listener's TLS: what each new handshake uses, swapped whole on reload.
pub struct Terminator {
    listener: String,
    provider: Arc<CryptoProvider>,
    config: ArcSwap<ServerConfig>,
    resolver: Arc<Resolver>,
    /// Kept across reloads, so that tickets issued before still resume.
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    sessions: Arc<ServerSessionMemoryCache>,
    settings: Mutex<(ListenerTls, Vec<Stamp>)>,
    /// Counters for `/metrics`.
    pub handshakes: Handshakes,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// An accepted, handshaken connection.
pub struct Accepted {
    /// The socket.
    pub tcp: TcpStream,
    /// The TLS session on it.
    pub conn: rustls::ServerConnection,
}

impl Terminator {
    /// Loads the certificates and builds the configuration; `alpn`: the protocols offered,
    /// in preference order (none for TCP listeners).
    pub fn new(listener: &str, tls: &ListenerTls, alpn: &[&[u8]]) -> anyhow::Result<Terminator> {
        let provider = provider();
        let set = load_set(tls, &provider).map_err(|e| anyhow::anyhow!("{e}"))?;
        warn_expired(listener, &set);
        let resolver = Arc::new(Resolver {
            set: ArcSwap::from_pointee(set),
            alpn: alpn.iter().map(|a| a.to_vec()).collect(),
        });
        let ticketer = rustls::crypto::ring::Ticketer::new()?;
        let sessions = ServerSessionMemoryCache::new(4096);
        let config = build(tls, &provider, &resolver, &ticketer, &sessions)?;
        Ok(Terminator {
            listener: listener.to_owned(),
            provider,
            config: ArcSwap::from_pointee(config),
            resolver,
            ticketer,
            sessions,
            settings: Mutex::new((tls.clone(), stamps(tls))),
            handshakes: Handshakes::default(),
        })
    }

    /// What a server that drives its own connections (the admin API's hyper) accepts
    /// with: the current configuration. Not counted in the handshake metrics.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// The TLS handshake on a new connection, within `timeout`; a failure is counted by
    /// reason and returned.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Result<Accepted, (Failure, std::io::Error)> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.load_full());
        let handshake = async {
            if !self.resolver.set.load().serves_unknown() {
                self.refuse_unknown(&tcp).await?;
            }
            acceptor.accept(tcp).await
        };
        let result = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(stream)) => Ok(stream.into_inner()),
            Ok(Err(e)) => Err((Failure::of(&e), e)),
            Err(_) => Err((
                Failure::Closed,
                std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
            )),
        };
        match result {
            Ok((tcp, conn)) => {
                let v =
                    usize::from(conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3));
                let a = match conn.alpn_protocol() {
                    Some(b"h2") => 0,
                    Some(_) => 1,
                    None => 2,
                };
                self.handshakes.done[v][a].fetch_add(1, Ordering::Relaxed);
                Ok(Accepted { tcp, conn })
            }
            Err((failure, error)) => {
                let i = Failure::ALL.iter().position(|f| *f == failure).unwrap_or(0);
                self.handshakes.failed[i].fetch_add(1, Ordering::Relaxed);
                Err((failure, error))
            }
        }
    }

    /// With unknown names refused: looks at the ClientHello before rustls does, and
    /// answers a name no certificate serves (or none) with the `unrecognized_name` alert
    /// (RFC 6066 §3), as HAProxy's `strict-sni` does, rather than rustls' generic one.
    async fn refuse_unknown(&self, tcp: &TcpStream) -> std::io::Result<()> {
        let mut buf = vec![0u8; hello::MAX_HELLO];
        loop {
            let n = tcp.peek(&mut buf).await?;
            match hello::parse(&buf[..n]) {
                Hello::Complete { server_name, .. } => {
                    if self
                        .resolver
                        .set
                        .load()
                        .pick(server_name.as_deref())
                        .is_some()
                    {
                        return Ok(());
                    }
                    // level fatal (2), unrecognized_name (112), in a TLS 1.2 record.
                    let _ = tcp.try_write(&[21, 3, 3, 0, 2, 2, 112]);
                    return Err(std::io::Error::other(rustls::Error::General(format!(
                        "no server certificate for {:?}",
                        server_name.unwrap_or_default()
                    ))));
                }
                // rustls says what is wrong with it.
                Hello::NotTls(_) => return Ok(()),
                Hello::Partial if n == buf.len() || n == 0 => return Ok(()),
                // The rest is on its way. A peek leaves the bytes, so tokio would call the
                // socket ready again at once (a client stalling mid-hello would keep the
                // worker spinning): the readiness is forgotten, and the next peek waits for
                // new bytes. Sound on the workers' current-thread runtimes, where no event
                // is processed between the peek and this (see `proxy::stream`).
                Hello::Partial => {
                    let _ = tcp.try_io(tokio::io::Interest::READABLE, || {
                        Err::<(), _>(std::io::Error::from(std::io::ErrorKind::WouldBlock))
                    });
                }
            }
        }
    }

    /// Loads the certificates of `tls` again (a reload, or changed files): new handshakes
    /// use them, open connections keep theirs. On an error nothing changes. Returns what
    /// changed, for the reload report.
    pub fn reload(&self, tls: &ListenerTls) -> Result<Vec<String>, CertError> {
        let set = load_set(tls, &self.provider)?;
        let mut settings = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        let old: Vec<String> = self
            .resolver
            .set
            .load()
            .certs
            .iter()
            .map(|c| c.serial.clone())
            .collect();
        let new: Vec<String> = set.certs.iter().map(|c| c.serial.clone()).collect();
        let mut changes = Vec::new();
        if old != new {
            changes.push(format!(
                "{}: certificates (serials {})",
                self.listener,
                new.join(", ")
            ));
        }
        warn_expired(&self.listener, &set);
        if settings.0 != *tls {
            let config = build(
                tls,
                &self.provider,
                &self.resolver,
                &self.ticketer,
                &self.sessions,
            )
            .map_err(|e| CertError {
                part: certs::Part::Cert,
                message: e.to_string(),
            })?;
            self.config.store(Arc::new(config));
            changes.push(format!("{}: tls settings", self.listener));
        }
        self.resolver.set.store(Arc::new(set));
        *settings = (tls.clone(), stamps(tls));
        Ok(changes)
    }

    /// Whether a certificate or key file changed on disk since it was last loaded, and the
    /// settings to load it again with; the interval to look again after.
    pub fn poll_files(&self) -> (Option<ListenerTls>, Duration) {
        let settings = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        let changed = stamps(&settings.0) != settings.1;
        (
            changed.then(|| settings.0.clone()),
            settings.0.check_interval,
        )
    }

    /// Marks the files as seen (after a refused change, so that it is not refused again
    /// every interval until it changes once more).
    pub fn mark_seen(&self) {
        let mut settings = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        settings.1 = stamps(&settings.0);
    }

    /// The certificates served now, in configuration order.
    pub fn certificates(&self) -> Vec<CertInfo> {
        let now = SystemTime::now();
        self.resolver
            .set
            .load()
            .certs
            .iter()
            .map(|c| CertInfo {
                names: c.names.clone(),
                subject: c.subject.clone(),
                serial: c.serial.clone(),
                not_after: c.not_after_text(),
                not_after_unix: c.not_after,
                expired: c.expired(now),
            })
            .collect()
    }
}

fn load_set(tls: &ListenerTls, provider: &CryptoProvider) -> Result<CertSet, CertError> {
    let certs = tls
        .certs
        .iter()
        .map(|spec| certs::load(spec, provider))
        .collect::<Result<Vec<Loaded>, _>>()?;
    Ok(CertSet::new(certs, tls.default_for_unknown))
}

fn warn_expired(listener: &str, set: &CertSet) {
    let now = SystemTime::now();
    for c in &set.certs {
        if c.expired(now) {
            tracing::warn!(listener, subject = %c.subject, not_after = %c.not_after_text(), "certificate has expired: clients will refuse it");
        }
    }
}

fn build(
    tls: &ListenerTls,
    provider: &Arc<CryptoProvider>,
    resolver: &Arc<Resolver>,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
    sessions: &Arc<ServerSessionMemoryCache>,
) -> Result<ServerConfig, rustls::Error> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = resolver.alpn.clone();
    if tls.session_tickets {
        config.ticketer = ticketer.clone();
        config.session_storage = sessions.clone();
    } else {
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    Ok(config)
}

/// Picks each handshake's certificate from the current set.
#[derive(Debug)]
struct Resolver {
    set: ArcSwap<CertSet>,
    alpn: Vec<Vec<u8>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.set
            .load()
            .pick(hello.server_name())
            .map(|c| c.key.clone())
    }
}

/// A file's modification time and length: a changed certificate changes one of them.
type Stamp = Option<(SystemTime, u64)>;

fn stamps(tls: &ListenerTls) -> Vec<Stamp> {
    tls.certs
        .iter()
        .flat_map(|c| [&c.cert, &c.key])
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// Loads a listener's certificates again whenever their files change on disk (looked at
/// every `check_interval`): a renewal by certbot or cert-manager needs no signal. A change
/// that does not load (a key written after its certificate, say) is logged, the old
/// certificates stay, and the next change is tried again.
pub async fn watch_files(tls: Arc<Terminator>) {
    loop {
        let (changed, interval) = tls.poll_files();
        if let Some(settings) = changed {
            match tls.reload(&settings) {
                Ok(changes) => {
                    tracing::info!(listener = %tls.listener, ?changes, "certificate files changed: reloaded")
                }
                Err(error) => {
                    tls.mark_seen();
                    tracing::warn!(listener = %tls.listener, %error, "certificate files changed but cannot be used; still serving the previous certificates");
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}
