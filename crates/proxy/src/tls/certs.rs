//! Certificates and keys read from PEM files, checked the way an operator needs to hear
//! about them (which file, what is wrong), and the set of them a listener serves, chosen
//! per handshake by the client's SNI.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// One certificate of a listener as configured: its files and, optionally, the names it
/// serves (otherwise its DNS subjectAltNames).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertSpec {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Exact names and `*.example.com` wildcards, lower case; empty: the certificate's own
    /// DNS names.
    pub names: Vec<String>,
}

/// Which of a pair's two files a problem is in, so that configuration errors name its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The certificate chain file.
    Cert,
    /// The private key file.
    Key,
    /// One of the configured `names`.
    Names,
}

/// A certificate pair that cannot be served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertError {
    /// Which file (or the names) the problem is in.
    pub part: Part,
    /// One line, naming the file.
    pub message: String,
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CertError {}

/// A certificate ready to serve, with what the dashboard and logs tell about it.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// Chain and signing key, as rustls serves them.
    pub key: Arc<CertifiedKey>,
    /// The names it is chosen for (configured, or its DNS names), lower case.
    pub names: Vec<String>,
    /// The leaf's notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// The leaf's serial number, hex (logs: which certificate a reload installed).
    pub serial: String,
    /// The leaf's subject, as text.
    pub subject: String,
}

impl Loaded {
    /// Whether the leaf has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.not_after < now
    }

    /// The leaf's notAfter as text, UTC (`Dec 13 13:32:03 2026 +00:00`).
    pub fn not_after_text(&self) -> String {
        x509_parser::time::ASN1Time::from_timestamp(self.not_after)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| self.not_after.to_string())
    }
}

/// Reads and checks one certificate pair: both files parse, the key signs for the
/// certificate, and each configured name is one the certificate is valid for.
pub fn load(spec: &CertSpec, provider: &CryptoProvider) -> Result<Loaded, CertError> {
    let err = |part, message: String| CertError { part, message };
    let chain = read_chain(&spec.cert).map_err(|m| err(Part::Cert, m))?;
    let key = PrivateKeyDer::from_pem_file(&spec.key).map_err(|e| {
        err(
            Part::Key,
            format!(
                "{}: no usable private key: {}",
                spec.key.display(),
                pem_error(&e)
            ),
        )
    })?;
    let signing = provider.key_provider.load_private_key(key).map_err(|e| {
        err(
            Part::Key,
            format!("{}: unsupported private key: {e}", spec.key.display()),
        )
    })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(err(
                Part::Key,
                format!(
                    "{}: the private key does not match the certificate in {}",
                    spec.key.display(),
                    spec.cert.display()
                ),
            ));
        }
    }
    let leaf = Leaf::parse(&certified.cert[0])
        .map_err(|m| err(Part::Cert, format!("{}: {m}", spec.cert.display())))?;
    let names = if spec.names.is_empty() {
        if leaf.dns_names.is_empty() {
            return Err(err(
                Part::Cert,
                format!(
                    "{}: the certificate names no DNS name (subjectAltName): list the names it serves in `names`",
                    spec.cert.display()
                ),
            ));
        }
        leaf.dns_names.clone()
    } else {
        for name in &spec.names {
            if !leaf.covers(name) {
                return Err(err(
                    Part::Names,
                    format!(
                        "no certificate for {name:?}: {} is valid for {}",
                        spec.cert.display(),
                        if leaf.dns_names.is_empty() {
                            "no DNS name".to_owned()
                        } else {
                            leaf.dns_names.join(", ")
                        }
                    ),
                ));
            }
        }
        spec.names.clone()
    };
    Ok(Loaded {
        key: Arc::new(certified),
        names,
        not_after: leaf.not_after,
        serial: leaf.serial,
        subject: leaf.subject,
    })
}

/// A PEM certificate file's chain, leaf first.
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {}", path.display(), pem_error(&e)))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(chain)
}

/// pki-types' PEM errors, in words that say what to fix.
fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read: {io}"),
        Error::NoItemsFound => "no PEM item of the expected kind in the file".to_owned(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// What a leaf certificate says about itself.
struct Leaf {
    dns_names: Vec<String>,
    not_after: i64,
    serial: String,
    subject: String,
}

impl Leaf {
    fn parse(der: &CertificateDer<'_>) -> Result<Leaf, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                    dns_names.push(n.to_ascii_lowercase());
                }
            }
        }
        Ok(Leaf {
            dns_names,
            not_after: cert.validity().not_after.timestamp(),
            serial: cert.raw_serial_as_string().replace(':', ""),
            subject: cert.subject().to_string(),
        })
    }

    /// Whether the certificate is valid for `name` (an exact name or a `*.` wildcard as
    /// configured): one of its DNS names equals it, or is a wildcard covering it.
    fn covers(&self, name: &str) -> bool {
        name_matches(&self.dns_names, name)
    }
}

/// The certificates a listener serves, indexed by name.
#[derive(Debug, Default)]
pub struct CertSet {
    /// In configuration order; the first is the default.
    pub certs: Vec<Loaded>,
    exact: HashMap<String, usize>,
    /// `example.com` for `*.example.com`.
    wildcard: HashMap<String, usize>,
    /// Serve the first certificate to clients without SNI or with an unknown name.
    fallback: bool,
}

impl CertSet {
    /// Indexes `certs`; an earlier certificate wins a name two claim. `fallback`: whether
    /// the first one answers names none claims.
    pub fn new(certs: Vec<Loaded>, fallback: bool) -> CertSet {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, c) in certs.iter().enumerate() {
            for name in &c.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        CertSet {
            certs,
            exact,
            wildcard,
            fallback,
        }
    }

    /// Whether clients whose name no certificate claims get the default one.
    pub fn serves_unknown(&self) -> bool {
        self.fallback
    }

    /// The certificate for a client's SNI: an exact name, else a wildcard one label up,
    /// else the default (unless unknown names are refused).
    pub fn pick(&self, sni: Option<&str>) -> Option<&Loaded> {
        let found = sni.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.exact.get(&name).copied().or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent).copied()
            })
        });
        match found {
            Some(i) => self.certs.get(i),
            None if self.fallback => self.certs.first(),
            None => None,
        }
    }
}

/// Whether `name` matches one of `patterns` (exact names, `*.suffix` wildcards matching
/// one label), case-insensitively: SNI routing of pass-through listeners.
pub fn name_matches(patterns: &[String], name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    patterns.iter().any(|p| {
        *p == name
            || p.strip_prefix("*.").is_some_and(|suffix| {
                name.split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `names` (rcgen), written with its key into `dir`.
    fn pair(dir: &Path, file: &str, names: &[&str]) -> CertSpec {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let c = rcgen::generate_simple_self_signed(names).unwrap();
        let cert = dir.join(format!("{file}.pem"));
        let key = dir.join(format!("{file}.key"));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        CertSpec {
            cert,
            key,
            names: Vec::new(),
        }
    }

    #[test]
    fn names_come_from_the_certificate_and_pick_exact_then_wildcard_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let p = crate::tls::provider();
        let a = load(&pair(dir.path(), "a", &["a.test"]), &p).unwrap();
        let b = load(&pair(dir.path(), "b", &["b.test", "*.b.test"]), &p).unwrap();
        assert_eq!(b.names, ["b.test", "*.b.test"]);
        let set = CertSet::new(vec![a, b], true);
        let pick = |sni: Option<&str>| set.pick(sni).map(|c| c.names[0].clone());
        assert_eq!(pick(Some("A.TEST.")).as_deref(), Some("a.test"));
        assert_eq!(pick(Some("x.b.test")).as_deref(), Some("b.test"));
        // A wildcard covers one label only.
        assert_eq!(pick(Some("y.x.b.test")).as_deref(), Some("a.test"));
        assert_eq!(pick(None).as_deref(), Some("a.test"));
        let strict = CertSet::new(set.certs.clone(), false);
        assert!(strict.pick(Some("other.test")).is_none());
        assert!(strict.pick(None).is_none());
        assert!(strict.pick(Some("b.test")).is_some());
    }

    #[test]
    fn a_mismatched_key_a_missing_file_and_an_uncovered_name_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = crate::tls::provider();
        let a = pair(dir.path(), "a", &["a.test"]);
        let b = pair(dir.path(), "b", &["b.test"]);
        let crossed = CertSpec {
            key: b.key.clone(),
            ..a.clone()
        };
        let e = load(&crossed, &p).unwrap_err();
        assert_eq!(e.part, Part::Key);
        assert!(e.message.contains("does not match the certificate"), "{e}");
        let missing = CertSpec {
            cert: dir.path().join("nope.pem"),
            ..a.clone()
        };
        let e = load(&missing, &p).unwrap_err();
        assert_eq!(e.part, Part::Cert);
        assert!(e.message.contains("nope.pem"), "{e}");
        let uncovered = CertSpec {
            names: vec!["c.test".into()],
            ..a.clone()
        };
        let e = load(&uncovered, &p).unwrap_err();
        assert_eq!(e.part, Part::Names);
        assert!(
            e.message.contains("\"c.test\"") && e.message.contains("a.test"),
            "{e}"
        );
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let e = load(&CertSpec { cert: garbage, ..a }, &p).unwrap_err();
        assert_eq!(e.part, Part::Cert);
    }

    #[test]
    fn server_names_match_exactly_or_one_label_under_a_wildcard() {
        let pats = vec!["a.test".to_owned(), "*.b.test".to_owned()];
        assert!(name_matches(&pats, "a.test"));
        assert!(name_matches(&pats, "A.Test."));
        assert!(name_matches(&pats, "x.b.test"));
        assert!(!name_matches(&pats, "b.test"));
        assert!(!name_matches(&pats, "y.x.b.test"));
        assert!(!name_matches(&pats, "xa.test"));
        assert!(!name_matches(&pats, ".b.test"));
    }
}
