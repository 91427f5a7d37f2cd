//! TLS plumbing for the tests of TLS (issue 15): a test PKI made with rcgen (a CA, leaf
//! certificates for chosen names with a chosen serial, written as PEM files into a
//! tempdir), rustls client configurations (trusting the CA, or accepting any certificate so
//! that a test can look at what was served), a connect helper returning the stream and the
//! leaf the server sent (DER, compared byte for byte with the one generated), HTTP/1.1 and
//! HTTP/2 clients over one TLS connection, and TLS backends (HTTP/1.1, or HTTP/2 when ALPN
//! says h2; optionally requiring a client certificate) that record what they saw. Every
//! server is a task of the test's runtime on 127.0.0.1 port 0, so it stops with the test.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, DigitallySignedStruct, ProtocolVersion, RootCertStore, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::http::{Failed, Reply};

/// The client side of a TLS connection over TCP.
pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// rustls' `ring` provider: every configuration here names it (no process-wide default).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.2 and 1.3, rustls' defaults.
pub const ALL_VERSIONS: &[&SupportedProtocolVersion] = rustls::ALL_VERSIONS;

/// TLS 1.2 only: a client an `min_version = "1.3"` listener must refuse.
pub const TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// A certificate authority that signs leaf certificates, and the directory its files are
/// written to (removed when the PKI is dropped).
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate, PEM, in `dir`.
    pub ca_pem: PathBuf,
}

/// A leaf certificate and its key: in memory, and as PEM files.
#[derive(Clone)]
pub struct Leaf {
    /// The certificate, exactly as generated: what a server must send.
    pub der: CertificateDer<'static>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
    /// The PEM files written (certificate, key).
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: u64,
}

impl Leaf {
    /// The key, as rustls takes it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key_der.clone()).into()
    }
}

/// Writes `text` to `path` all at once: a new file renamed over the old one, so that a
/// process watching `path` never reads half of it.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

impl Pki {
    /// A new CA whose subject CN is `name`; its certificate written to `ca.pem`.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).expect("write ca.pem");
        Pki { dir, ca, ca_pem }
    }

    /// The CA certificate.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A path in this PKI's directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A leaf for `names` (DNS names; `127.0.0.1` becomes an IP SAN), subject CN the first
    /// name, serial `serial`, valid for server and client authentication; written to
    /// `{stem}.pem` and `{stem}.key`.
    pub fn leaf(&self, stem: &str, names: &[&str], serial: u64) -> Leaf {
        self.leaf_with(stem, names, serial, |_| {})
    }

    /// [`Pki::leaf`], with `edit` changing the parameters last (validity dates ...).
    pub fn leaf_with(
        &self,
        stem: &str,
        names: &[&str],
        serial: u64,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_else(|| stem.to_string()),
        );
        params.serial_number = Some(SerialNumber::from(serial));
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        edit(&mut params);
        let cert = params.signed_by(&key, &self.ca).expect("leaf certificate");
        let leaf = Leaf {
            der: cert.der().clone(),
            key_der: key.serialize_der(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert: self.path(&format!("{stem}.pem")),
            key: self.path(&format!("{stem}.key")),
            serial,
        };
        std::fs::write(&leaf.cert, &leaf.cert_pem).expect("write certificate");
        std::fs::write(&leaf.key, &leaf.key_pem).expect("write key");
        leaf
    }

    /// The roots a client of this PKI trusts: its CA only.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der()).expect("CA certificate");
        roots
    }

    /// A client trusting this CA, offering `alpn`, speaking `versions`.
    pub fn client_versions(
        &self,
        alpn: &[&str],
        versions: &[&'static SupportedProtocolVersion],
    ) -> ClientConfig {
        let mut c = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        c
    }

    /// A client trusting this CA, offering `alpn` (none: no ALPN extension).
    pub fn client(&self, alpn: &[&str]) -> ClientConfig {
        self.client_versions(alpn, ALL_VERSIONS)
    }

    /// A server sending `leaf` (and the CA after it), offering `alpn`; requiring a client
    /// certificate issued by `client_ca` when given.
    pub fn server(&self, leaf: &Leaf, alpn: &[&str], client_ca: Option<&Pki>) -> ServerConfig {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(ALL_VERSIONS)
            .expect("versions");
        let builder = match client_ca {
            Some(ca) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()), provider())
                    .build()
                    .expect("client verifier"),
            ),
            None => builder.with_no_client_auth(),
        };
        let mut s = builder
            .with_single_cert(vec![leaf.der.clone(), self.ca_der()], leaf.private_key())
            .expect("server certificate");
        s.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        s
    }
}

/// A client that accepts any certificate (signatures still checked), so that a test can
/// look at which one a server sent when it would not verify for the name asked (an unknown
/// SNI answered with the default certificate).
pub fn any_cert_client(alpn: &[&str]) -> ClientConfig {
    let p = provider();
    let mut c = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(ALL_VERSIONS)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(p)))
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    c
}

#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A completed client handshake: the stream, and what was negotiated.
pub struct Tls {
    pub stream: ClientTls,
    /// The leaf certificate the server sent.
    pub leaf: CertificateDer<'static>,
    pub alpn: Option<Vec<u8>>,
    pub version: Option<ProtocolVersion>,
}

/// Connects to `addr` and completes a TLS handshake as `config` says, verifying (and, with
/// SNI enabled, sending) `name`; the handshake's error as an `io::Error` when it fails.
pub async fn try_connect(addr: SocketAddr, config: ClientConfig, name: &str) -> io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).expect("server name");
    let stream = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let (_, conn) = stream.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the server sent a certificate")
        .clone()
        .into_owned();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let version = conn.protocol_version();
    Ok(Tls {
        stream,
        leaf,
        alpn,
        version,
    })
}

/// [`try_connect`], which must succeed.
pub async fn connect(addr: SocketAddr, config: ClientConfig, name: &str) -> Tls {
    try_connect(addr, config, name)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {addr} as {name:?}: {e}"))
}

/// An HTTP/1.1 client connection over one TLS stream (requests one after the other on it).
pub struct H1Tls {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl H1Tls {
    /// Starts HTTP/1.1 on `stream`; `host` is sent as `Host`.
    pub async fn new(stream: ClientTls, host: &str) -> H1Tls {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 over TLS");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        H1Tls {
            send,
            host: host.to_string(),
        }
    }

    /// One GET on this connection; the error when no whole answer came.
    pub async fn try_get(&mut self, path: &str) -> Result<Reply, Failed> {
        self.send.ready().await?;
        let req = Request::get(path)
            .header("host", &self.host)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let res = self.send.send_request(req).await?;
        collect(res).await
    }

    /// One GET that must be answered.
    pub async fn get(&mut self, path: &str) -> Reply {
        self.try_get(path).await.expect("request over TLS failed")
    }
}

/// An HTTP/2 client connection over one TLS stream.
pub struct H2Tls {
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    host: String,
}

impl H2Tls {
    /// Starts HTTP/2 on `stream` (which negotiated h2); `host` is the requests' authority.
    pub async fn new(stream: ClientTls, host: &str) -> H2Tls {
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("HTTP/2 over TLS");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        H2Tls {
            send,
            host: host.to_string(),
        }
    }

    /// One GET on this connection; the error when no whole answer came.
    pub async fn try_get(&mut self, path: &str) -> Result<Reply, Failed> {
        self.send.ready().await?;
        let req = Request::get(format!("https://{}{path}", self.host))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let res = self.send.send_request(req).await?;
        collect(res).await
    }

    /// One GET that must be answered.
    pub async fn get(&mut self, path: &str) -> Reply {
        self.try_get(path)
            .await
            .expect("HTTP/2 request over TLS failed")
    }
}

async fn collect(res: Response<Incoming>) -> Result<Reply, Failed> {
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        version: parts.version,
        body,
    })
}

/// What a TLS backend saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The SNI the client sent.
    pub sni: Option<String>,
    /// The ALPN protocol negotiated.
    pub alpn: Option<Vec<u8>>,
    /// The request's HTTP version.
    pub version: Version,
    /// The client certificate's leaf, when one was sent.
    pub client_cert: Option<CertificateDer<'static>>,
}

/// A TLS backend: its address, the requests it served, the handshakes it failed.
pub struct TlsBackend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub failures: Arc<Mutex<Vec<String>>>,
}

impl TlsBackend {
    /// The requests served so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// The handshakes failed so far, why.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().expect("failures").clone()
    }
}

/// Starts a TLS backend on 127.0.0.1 port 0 with `config`: HTTP/2 when ALPN negotiated
/// `h2`, HTTP/1.1 otherwise; every request answered 200, `x-served-by: {name}`, body
/// `name`.
pub async fn tls_backend(name: &str, config: ServerConfig) -> TlsBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let (seen2, failures2, name) = (seen.clone(), failures.clone(), name.to_string());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen, failures, name) = (
                acceptor.clone(),
                seen2.clone(),
                failures2.clone(),
                name.clone(),
            );
            tokio::spawn(async move {
                let stream = match acceptor.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        failures.lock().expect("failures").push(e.to_string());
                        return;
                    }
                };
                let (_, conn) = stream.get_ref();
                let sni = conn.server_name().map(str::to_string);
                let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
                let client_cert = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.clone().into_owned());
                let h2 = alpn.as_deref() == Some(b"h2".as_slice());
                let service = service_fn(move |req: Request<Incoming>| {
                    seen.lock().expect("seen").push(Seen {
                        sni: sni.clone(),
                        alpn: alpn.clone(),
                        version: req.version(),
                        client_cert: client_cert.clone(),
                    });
                    let name = name.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("x-served-by", &name)
                                .body(Full::new(Bytes::from(name)))
                                .expect("response"),
                        )
                    }
                });
                let io = TokioIo::new(stream);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
            });
        }
    });
    TlsBackend {
        addr,
        seen,
        failures,
    }
}
