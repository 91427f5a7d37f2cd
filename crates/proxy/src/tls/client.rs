//! TLS to backends: the rustls client configuration of a pool (trusted roots, the name
//! sent and verified, a client certificate for mTLS, ALPN), and the handshake on a new
//! backend connection. rustls keeps the sessions, so a reconnect resumes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;

use super::certs::read_chain;
use super::provider;

/// TLS to a listener's backends (`[listener.backend_tls]`, `--backend-tls` and friends).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendTls {
    /// PEM file of the CAs to trust; none: the system's roots.
    pub ca: Option<PathBuf>,
    /// The name sent as SNI and verified; none: the backend's IP address (verified
    /// against the certificate's IP subjectAltNames; no SNI is sent for an address).
    pub server_name: Option<String>,
    /// Client certificate chain and key (mTLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Accept any certificate: testing only, logged loudly.
    pub insecure_skip_verify: bool,
}

/// A pool's TLS client.
pub struct Upstream {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// The client for `tls`; `h2`: offer ALPN `h2` (and require it), else `http/1.1`.
    pub fn new(listener: &str, tls: &BackendTls, h2: bool) -> anyhow::Result<Upstream> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = if tls.insecure_skip_verify {
            tracing::warn!(
                listener,
                "backend_tls.insecure_skip_verify is on: backend certificates are NOT verified; for testing only"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider.clone())))
        } else {
            builder.with_root_certificates(roots(tls.ca.as_ref())?)
        };
        let mut config = match &tls.client_cert {
            Some((cert, key)) => {
                let chain = read_chain(cert).map_err(anyhow::Error::msg)?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    anyhow::anyhow!("{}: no usable private key: {e:?}", key.display())
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| anyhow::anyhow!("client certificate {}: {e}", cert.display()))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let server_name = match &tls.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| anyhow::anyhow!("server_name {n:?}: {e}"))?,
            ),
            None => None,
        };
        Ok(Upstream {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The TLS handshake on a new connection to `addr`, within `timeout`. The error says
    /// what failed, in rustls' words ("invalid peer certificate: UnknownIssuer").
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        match tokio::time::timeout(timeout, self.connector.connect(name, tcp)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(std::io::Error::new(e.kind(), format!("TLS handshake: {e}"))),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("TLS handshake: no answer within {timeout:?}"),
            )),
        }
    }
}

/// The CAs of `ca`, or the system's.
fn roots(ca: Option<&PathBuf>) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("{}: {e:?}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                anyhow::bail!("{}: no CA certificate in the file", path.display());
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                anyhow::bail!(
                    "no CA certificate found in the system's trust store: set backend_tls.ca"
                );
            }
        }
    }
    Ok(roots)
}

/// Accepts any certificate, but still checks the handshake's signatures (so the peer holds
/// the key of the certificate it sent).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
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
