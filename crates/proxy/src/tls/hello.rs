//! Reading the TLS ClientHello at the start of a TCP connection, without terminating TLS,
//! to route pass-through connections by SNI (what HAProxy's `req.ssl_sni` and NGINX's
//! `ssl_preread` do).
//!
//! The reader is a pure function of the bytes read so far: the caller reads more and calls
//! [`parse`] again while it says [`Hello::Partial`], then forwards every byte it read,
//! untouched, to the chosen backend. Nothing here allocates more than about the hello's size.

use std::borrow::Cow;

/// What the bytes read so far say about a TLS ClientHello.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// More bytes are needed (the record or the handshake message is not whole yet).
    Partial,
    /// A whole ClientHello; its server_name (host_name type), lowercased, without a trailing
    /// dot, if it has one.
    Complete {
        /// The first host_name of the server_name extension.
        server_name: Option<String>,
        /// The ALPN protocol names, in the client's order of preference.
        alpn: Vec<Vec<u8>>,
    },
    /// Not a TLS ClientHello (wrong content type, version, malformed lengths, ...): the
    /// reason, one short line.
    NotTls(&'static str),
}

/// Most bytes that will be read looking for a ClientHello; past it:
/// `NotTls("ClientHello too long")`.
///
/// One full TLS record (a 2^14-byte fragment and its 5-byte header). Real hellos are far
/// smaller: 0.5 KB classically, ~1.8 KB with an X25519MLKEM768 key share (1216 bytes of
/// it), a few KB with ECH or a resumption ticket, so 16 KiB leaves ample room for
/// post-quantum key shares while bounding what each not-yet-routed connection can make us
/// hold: a peer that trickles bytes pins at most this much. It is also the bound NGINX
/// (`preread_buffer_size` 16k) and HAProxy (`tune.bufsize` 16k) use, so a hello they can
/// route, this routes. 64 KiB (the handshake bound of rustls) would quadruple the memory a
/// slow-loris peer pins for hellos no mainstream client sends.
pub(crate) const MAX_HELLO: usize = 16 * 1024 + 5;

/// TLS record content type of handshake messages.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Size of a TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
/// Size of a handshake message header: type, 24-bit length.
const HANDSHAKE_HEADER: usize = 4;
/// Largest record fragment a peer may send (RFC 8446 section 5.1, RFC 5246 section 6.2.1).
const MAX_FRAGMENT: usize = 1 << 14;
/// Extension carrying the server name (RFC 6066 section 3).
const EXT_SERVER_NAME: u16 = 0;
/// Extension carrying the ALPN protocol list (RFC 7301).
const EXT_ALPN: u16 = 16;
/// `name_type` of a DNS host name in the server_name extension.
const NAME_TYPE_HOST_NAME: u8 = 0;
/// Longest DNS name in its textual form, without the trailing dot (RFC 1035 section 2.3.4).
const MAX_DNS_NAME: usize = 253;
/// Longest DNS label (RFC 1035 section 2.3.4).
const MAX_DNS_LABEL: usize = 63;

/// Parses the bytes read so far from the client: whether they hold a whole ClientHello,
/// need more, or are not TLS. Only the first [`MAX_HELLO`] bytes are looked at; bytes after
/// the hello (the client's next flight, early data) are ignored.
pub(crate) fn parse(buf: &[u8]) -> Hello {
    let window = &buf[..buf.len().min(MAX_HELLO)];
    let message = match handshake_message(window) {
        Ok(message) => message,
        // The window is full and still short of the hello: reading more would exceed the
        // bound, so this is final.
        Err(Hello::Partial) if buf.len() >= MAX_HELLO => {
            return Hello::NotTls("ClientHello too long");
        }
        Err(answer) => return answer,
    };
    match client_hello(&message) {
        Ok(hello) => hello,
        Err(reason) => Hello::NotTls(reason),
    }
}

/// Reassembles the first handshake message from the handshake records at the start of
/// `window`, or says why it cannot yet (`Partial`) or ever (`NotTls`).
///
/// A message may be split over records at any byte, the 4-byte handshake header
/// included (RFC 8446 section 5.1), so the header is gathered bytewise; a message within
/// one record, the usual case, is borrowed rather than copied.
fn handshake_message(window: &[u8]) -> Result<Cow<'_, [u8]>, Hello> {
    let mut rest = window;
    let mut header = [0u8; HANDSHAKE_HEADER];
    // Handshake bytes in the whole records walked so far.
    let mut have = 0usize;
    // Length of the whole message, header included, once its header has been seen.
    let mut whole_len = None;
    let need = loop {
        if let Some(need) = whole_len
            && have >= need
        {
            break need;
        }
        let Some((record, after)) = rest.split_first_chunk::<RECORD_HEADER>() else {
            // Check what there is of the header, so that garbage is refused as soon as
            // its first byte arrives rather than once five have.
            return Err(check_record_prefix(rest).unwrap_or(Hello::Partial));
        };
        if let Some(refusal) = check_record_prefix(record) {
            return Err(refusal);
        }
        let len = record_len(record);
        if len == 0 {
            // RFC 8446 section 5.1: "MUST NOT send zero-length fragments of Handshake type".
            return Err(Hello::NotTls("empty TLS handshake record"));
        }
        if len > MAX_FRAGMENT {
            return Err(Hello::NotTls("TLS record too long"));
        }
        let fragment = &after[..len.min(after.len())];
        // Take the handshake header from this fragment even when it is not whole yet, so a
        // message that is not a ClientHello, or too long to ever fit, is refused early.
        if whole_len.is_none() {
            for (i, &byte) in fragment.iter().enumerate() {
                let at = have + i;
                if at >= HANDSHAKE_HEADER {
                    break;
                }
                header[at] = byte;
                if at == 0 && byte != HANDSHAKE_CLIENT_HELLO {
                    return Err(Hello::NotTls("not a ClientHello"));
                }
                if at == HANDSHAKE_HEADER - 1 {
                    let body = usize::from(header[1]) << 16
                        | usize::from(header[2]) << 8
                        | usize::from(header[3]);
                    let whole = HANDSHAKE_HEADER + body;
                    // Even in a single record it would not fit in the window.
                    if RECORD_HEADER + whole > MAX_HELLO {
                        return Err(Hello::NotTls("ClientHello too long"));
                    }
                    whole_len = Some(whole);
                }
            }
        }
        if fragment.len() < len {
            return Err(Hello::Partial);
        }
        have += len;
        rest = &after[len..];
    };
    gather(window, need).ok_or(Hello::NotTls("malformed TLS records"))
}

/// Refuses a record header (or what has arrived of it) that cannot start a handshake
/// record; `None` if it can.
///
/// Record versions 0x0300..=0x0303 are accepted: RFC 5246 appendix E.1 says a client may
/// send any {03,XX} in the record layer, naming {03,00} as typical for the initial hello,
/// and RFC 8446 has 0x0301 or 0x0303 there. The record version says nothing about what
/// will be negotiated, so refusing 0x0300 would only break old clients whose hello the
/// backend may still accept; SSLv2-compatible hellos (first byte 0x80) cannot carry SNI
/// and are refused as not a handshake record.
fn check_record_prefix(prefix: &[u8]) -> Option<Hello> {
    if let Some(&content_type) = prefix.first()
        && content_type != CONTENT_HANDSHAKE
    {
        return Some(Hello::NotTls("not a TLS handshake record"));
    }
    if let Some(&major) = prefix.get(1)
        && major != 3
    {
        return Some(Hello::NotTls("unsupported TLS record version"));
    }
    if let Some(&minor) = prefix.get(2)
        && minor > 3
    {
        return Some(Hello::NotTls("unsupported TLS record version"));
    }
    None
}

/// The first `need` handshake bytes of the records at the start of `window`, which
/// [`handshake_message`] has checked hold them; `None` only if that check was wrong.
fn gather(window: &[u8], need: usize) -> Option<Cow<'_, [u8]>> {
    let (record, after) = window.split_first_chunk::<RECORD_HEADER>()?;
    if record_len(record) >= need {
        return after.get(..need).map(Cow::Borrowed);
    }
    // `need` is at most MAX_HELLO, so this allocation is bounded.
    let mut message = Vec::with_capacity(need);
    let mut rest = window;
    while message.len() < need {
        let (record, after) = rest.split_first_chunk::<RECORD_HEADER>()?;
        let len = record_len(record);
        let fragment = after.get(..len)?;
        message.extend_from_slice(fragment.get(..len.min(need - message.len()))?);
        rest = &after[len..];
    }
    Some(Cow::Owned(message))
}

/// The fragment length a record header announces.
fn record_len(header: &[u8; RECORD_HEADER]) -> usize {
    usize::from(u16::from_be_bytes([header[3], header[4]]))
}

/// Bounds-checked reading of TLS's big-endian integers and length-prefixed vectors: every
/// read past the end is `None`, never a panic.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// The next `n` bytes.
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(taken)
    }

    /// The next byte.
    fn u8(&mut self) -> Option<u8> {
        let (&byte, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(byte)
    }

    /// The next big-endian 16-bit integer.
    fn u16(&mut self) -> Option<u16> {
        let (bytes, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_be_bytes(*bytes))
    }

    /// A vector with an 8-bit length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    /// A vector with a 16-bit length prefix.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// Whether every byte has been read.
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses a whole ClientHello handshake message (header included, RFC 8446 section 4.1.2,
/// RFC 5246 section 7.4.1.2) for its server name and ALPN list.
fn client_hello(message: &[u8]) -> Result<Hello, &'static str> {
    const MALFORMED: &str = "malformed ClientHello";
    let mut r = Reader(message.get(HANDSHAKE_HEADER..).ok_or(MALFORMED)?);
    let version = r.u16().ok_or(MALFORMED)?;
    // TLS 1.3 keeps 0x0303 here (the real versions are in supported_versions); anything
    // outside major version 3 is SSLv2 or not TLS at all.
    if version >> 8 != 3 {
        return Err("unsupported ClientHello version");
    }
    r.take(32).ok_or(MALFORMED)?; // random
    let session_id = r.vec8().ok_or(MALFORMED)?;
    if session_id.len() > 32 {
        return Err(MALFORMED);
    }
    let cipher_suites = r.vec16().ok_or(MALFORMED)?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(MALFORMED);
    }
    if r.vec8().ok_or(MALFORMED)?.is_empty() {
        // compression_methods must list at least `null`.
        return Err(MALFORMED);
    }
    let mut server_name = None;
    let mut alpn = Vec::new();
    // SSLv3 and early TLS 1.0 hellos end here, without an extensions block.
    if !r.is_empty() {
        let mut extensions = Reader(r.vec16().ok_or(MALFORMED)?);
        // The extensions end the message; anything after them means our framing is wrong.
        if !r.is_empty() {
            return Err(MALFORMED);
        }
        let (mut seen_server_name, mut seen_alpn) = (false, false);
        while !extensions.is_empty() {
            let kind = extensions.u16().ok_or(MALFORMED)?;
            let data = extensions.vec16().ok_or(MALFORMED)?;
            // RFC 8446 section 4.2 forbids repeats; for the two we route on, a repeat
            // would make our choice and the backend's differ, so it is refused.
            match kind {
                EXT_SERVER_NAME if seen_server_name => return Err("duplicate server_name"),
                EXT_SERVER_NAME => {
                    seen_server_name = true;
                    server_name = parse_server_name(data)?;
                }
                EXT_ALPN if seen_alpn => return Err("duplicate ALPN extension"),
                EXT_ALPN => {
                    seen_alpn = true;
                    alpn = parse_alpn(data)?;
                }
                _ => {}
            }
        }
    }
    Ok(Hello::Complete { server_name, alpn })
}

/// The first host_name of a server_name extension's ServerNameList (RFC 6066 section 3),
/// validated and normalised.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    const MALFORMED: &str = "malformed server_name extension";
    let mut outer = Reader(data);
    let list = outer.vec16().ok_or(MALFORMED)?;
    if !outer.is_empty() || list.is_empty() {
        return Err(MALFORMED);
    }
    let mut list = Reader(list);
    let mut first = None;
    while !list.is_empty() {
        let name_type = list.u8().ok_or(MALFORMED)?;
        // Every name type defined or proposed is a 16-bit-length opaque, which is how
        // OpenSSL, NGINX and HAProxy skip the ones they do not know.
        let name = list.vec16().ok_or(MALFORMED)?;
        if name_type == NAME_TYPE_HOST_NAME && first.is_none() {
            first = Some(name);
        }
    }
    first.map(normalise_host_name).transpose()
}

/// Checks a host_name is a plausible DNS name and puts it in the form routes are matched
/// against: lowercase (DNS is case-insensitive), without the trailing dot (an absolute
/// name is the same host, and RFC 6066 forbids the dot anyway, yet some clients send it).
fn normalise_host_name(name: &[u8]) -> Result<String, &'static str> {
    const INVALID: &str = "invalid server name";
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > MAX_DNS_NAME {
        return Err(INVALID);
    }
    // Underscores are not in host names but do appear in real ones (service-style
    // labels, some internal names), and backends accept them, so they are tolerated.
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_');
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() || label.len() > MAX_DNS_LABEL || !label.iter().all(allowed) {
            return Err(INVALID);
        }
    }
    // Only ASCII got through, so this is valid UTF-8 and cannot fail.
    String::from_utf8(name.to_ascii_lowercase()).map_err(|_| INVALID)
}

/// The protocol names of an ALPN extension's ProtocolNameList (RFC 7301 section 3.1).
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
    const MALFORMED: &str = "malformed ALPN extension";
    let mut outer = Reader(data);
    let list = outer.vec16().ok_or(MALFORMED)?;
    if !outer.is_empty() || list.is_empty() {
        return Err(MALFORMED);
    }
    let mut list = Reader(list);
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let protocol = list.vec8().ok_or(MALFORMED)?;
        if protocol.is_empty() {
            return Err(MALFORMED);
        }
        protocols.push(protocol.to_vec());
    }
    Ok(protocols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};
    use std::sync::Arc;

    /// The first flight rustls sends for `name`, offering `alpn`.
    fn rustls_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        // The provider is named rather than taken from crate features, which another
        // crate in the build could widen.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// The handshake bytes of a run of records, their headers dropped.
    fn unframe(mut records: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while !records.is_empty() {
            let len = usize::from(u16::from_be_bytes([records[3], records[4]]));
            out.extend_from_slice(&records[5..5 + len]);
            records = &records[5 + len..];
        }
        out
    }

    /// Handshake bytes framed as handshake records of at most `size` bytes each.
    fn frame(handshake: &[u8], size: usize, version: u16) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in handshake.chunks(size) {
            out.push(CONTENT_HANDSHAKE);
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A TLS 1.2-style ClientHello handshake message with these extensions (`None`: no
    /// extensions block at all).
    fn hello_message(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session_id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // cipher_suites
        body.extend_from_slice(&[1, 0]); // compression_methods
        if let Some(extensions) = extensions {
            let mut block = Vec::new();
            for (kind, data) in extensions {
                block.extend_from_slice(&kind.to_be_bytes());
                block.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
                block.extend_from_slice(data);
            }
            body.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
            body.extend_from_slice(&block);
        }
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        message
    }

    /// A server_name extension's data listing these (name_type, name) entries.
    fn server_name_ext(entries: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        (EXT_SERVER_NAME, data)
    }

    /// A whole single-record hello whose server_name extension holds just `name`.
    fn hello_named(name: &[u8]) -> Vec<u8> {
        frame(
            &hello_message(Some(&[server_name_ext(&[(0, name)])])),
            MAX_FRAGMENT,
            0x0301,
        )
    }

    /// The server name `buf` completes with.
    fn name_of(buf: &[u8]) -> Option<String> {
        match parse(buf) {
            Hello::Complete { server_name, .. } => server_name,
            other => panic!("expected a whole hello, got {other:?}"),
        }
    }

    /// A hello's extensions: (type, data) pairs.
    type Extensions = Vec<(u16, Vec<u8>)>;

    /// A xorshift generator: deterministic fuzz input without a dependency.
    struct Rng(u64);

    impl Rng {
        /// The next pseudo-random number.
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// A pseudo-random number below `n`.
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// A real hello yields its SNI and its ALPN list in order.
    #[test]
    fn rustls_hello_gives_sni_and_alpn() {
        let hello = rustls_hello("a.test", &[b"h2", b"http/1.1"]);
        assert_eq!(
            parse(&hello),
            Hello::Complete {
                server_name: Some("a.test".into()),
                alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            }
        );
    }

    /// No ALPN extension is an empty list, not an error.
    #[test]
    fn rustls_hello_without_alpn() {
        let hello = rustls_hello("b.example.com", &[]);
        assert_eq!(
            parse(&hello),
            Hello::Complete {
                server_name: Some("b.example.com".into()),
                alpn: vec![],
            }
        );
    }

    /// rustls sends no SNI for an IP address: no server name.
    #[test]
    fn ip_address_sends_no_sni() {
        for ip in ["192.0.2.1", "2001:db8::1"] {
            let hello = rustls_hello(ip, &[b"h2"]);
            assert_eq!(
                parse(&hello),
                Hello::Complete {
                    server_name: None,
                    alpn: vec![b"h2".to_vec()],
                },
                "{ip}"
            );
        }
    }

    /// Every cut of a valid hello waits for more rather than refusing.
    #[test]
    fn every_prefix_is_partial() {
        let hello = rustls_hello("a.test", &[b"h2"]);
        for end in 0..hello.len() {
            assert_eq!(
                parse(&hello[..end]),
                Hello::Partial,
                "prefix of {end} bytes"
            );
        }
    }

    /// The client's next records do not change the answer.
    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let mut buf = rustls_hello("a.test", &[b"h2"]);
        let whole = parse(&buf);
        // A ChangeCipherSpec and early data, as a TLS 1.3 client may send next.
        buf.extend_from_slice(&[20, 3, 3, 0, 1, 1, 23, 3, 3, 0, 2, 0xaa, 0xbb]);
        assert_eq!(parse(&buf), whole);
    }

    /// Fragmentation over records, even mid-header, changes nothing.
    #[test]
    fn hello_split_over_records() {
        let hello = rustls_hello("a.test", &[b"h2", b"http/1.1"]);
        let whole = parse(&hello);
        let handshake = unframe(&hello);
        // 1 and 3 split the handshake header itself across records.
        for size in [1, 3, 100, 1000] {
            let records = frame(&handshake, size, 0x0303);
            assert!(
                records.len() <= MAX_HELLO,
                "{size}-byte records fit the bound"
            );
            assert_eq!(parse(&records), whole, "{size}-byte records");
            for end in 0..records.len() {
                assert_eq!(
                    parse(&records[..end]),
                    Hello::Partial,
                    "{size}: {end} bytes"
                );
            }
        }
    }

    /// Record versions SSL 3.0 to TLS 1.2 are read; others refused.
    #[test]
    fn record_versions() {
        let message = hello_message(Some(&[server_name_ext(&[(0, b"a.test")])]));
        for version in [0x0300, 0x0301, 0x0302, 0x0303] {
            assert_eq!(
                name_of(&frame(&message, MAX_FRAGMENT, version)).as_deref(),
                Some("a.test")
            );
        }
        for version in [0x0304, 0x0200, 0x0403, 0xfeff] {
            assert_eq!(
                parse(&frame(&message, MAX_FRAGMENT, version)),
                Hello::NotTls("unsupported TLS record version"),
                "{version:#06x}"
            );
        }
    }

    /// Other protocols and non-ClientHello handshakes are refused, early.
    #[test]
    fn garbage_is_not_tls() {
        let refused = |buf: &[u8]| matches!(parse(buf), Hello::NotTls(_));
        assert!(refused(b"GET / HTTP/1.1\r\n"));
        // Refused from the first byte, without waiting for a record header's worth.
        assert!(refused(b"G"));
        assert!(refused(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(refused(b"SSH-2.0-OpenSSH_9.6\r\n"));
        // An SSLv2-compatible hello.
        assert!(refused(&[0x80, 0x2e, 0x01, 0x03, 0x01]));
        // Handshake record, but a ServerHello.
        let mut server_hello = hello_message(None);
        server_hello[0] = 2;
        assert_eq!(
            parse(&frame(&server_hello, MAX_FRAGMENT, 0x0303)),
            Hello::NotTls("not a ClientHello")
        );
        // Known as soon as the handshake type arrives.
        assert_eq!(
            parse(&[22, 3, 1, 0, 200, 2]),
            Hello::NotTls("not a ClientHello")
        );
        assert_eq!(
            parse(&[22, 3, 1, 0, 0]),
            Hello::NotTls("empty TLS handshake record")
        );
        assert_eq!(
            parse(&[22, 3, 1, 0x40, 0x01]),
            Hello::NotTls("TLS record too long")
        );
    }

    /// A non-handshake record before the hello is whole is refused.
    #[test]
    fn other_records_before_the_hello_are_not_tls() {
        let hello = rustls_hello("a.test", &[]);
        let mut buf = vec![20, 3, 3, 0, 1, 1]; // ChangeCipherSpec
        buf.extend_from_slice(&hello);
        assert_eq!(parse(&buf), Hello::NotTls("not a TLS handshake record"));
        // An alert in the middle of a fragmented hello.
        let records = frame(&unframe(&hello), 100, 0x0303);
        let mut buf = records[..105].to_vec();
        buf.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
        buf.extend_from_slice(&records[105..]);
        assert_eq!(parse(&buf), Hello::NotTls("not a TLS handshake record"));
    }

    /// Names come out in the form routes match: lowercase, no final dot.
    #[test]
    fn sni_is_lowercased_without_trailing_dot() {
        assert_eq!(
            name_of(&hello_named(b"WWW.Example.COM")).as_deref(),
            Some("www.example.com")
        );
        assert_eq!(name_of(&hello_named(b"a.test.")).as_deref(), Some("a.test"));
        assert_eq!(
            name_of(&hello_named(b"_svc.My-Host.test.")).as_deref(),
            Some("_svc.my-host.test")
        );
        assert_eq!(
            name_of(&hello_named(b"localhost")).as_deref(),
            Some("localhost")
        );
        // The longest name: 3 labels of 63 and one of 61, with their dots, 253 bytes.
        let long = [&[b'a'; 63][..], &[b'b'; 63], &[b'c'; 63], &[b'd'; 61]].join(&b'.');
        assert_eq!(long.len(), MAX_DNS_NAME);
        assert_eq!(name_of(&hello_named(&long)).map(|n| n.len()), Some(253));
        let mut dotted = long.clone();
        dotted.push(b'.');
        assert_eq!(name_of(&hello_named(&dotted)).map(|n| n.len()), Some(253));
    }

    /// Names that cannot be DNS names close the connection.
    #[test]
    fn invalid_sni_is_refused() {
        let too_long = [&[b'a'; 63][..], &[b'b'; 63], &[b'c'; 63], &[b'd'; 62]].join(&b'.');
        let long_label = [b'a'; 64];
        let invalid: [&[u8]; 11] = [
            b"",
            b".",
            b"a..b",
            b".a.test",
            b"a.test..",
            b"a test",
            b"a/b",
            b"a.test\0",
            "bücher.test".as_bytes(),
            &too_long,
            &long_label,
        ];
        for name in invalid {
            assert_eq!(
                parse(&hello_named(name)),
                Hello::NotTls("invalid server name"),
                "{}",
                name.escape_ascii()
            );
        }
    }

    /// Other name types are skipped; the first host_name wins.
    #[test]
    fn first_host_name_is_taken() {
        let ext = server_name_ext(&[(7, b"\xff\xff"), (0, b"first.test"), (0, b"second.test")]);
        let buf = frame(&hello_message(Some(&[ext])), MAX_FRAGMENT, 0x0301);
        assert_eq!(name_of(&buf).as_deref(), Some("first.test"));
        // Only other name types: no server name.
        let ext = server_name_ext(&[(7, b"opaque")]);
        let buf = frame(&hello_message(Some(&[ext])), MAX_FRAGMENT, 0x0301);
        assert_eq!(name_of(&buf), None);
    }

    /// An SSLv3-style hello with no extensions block is whole.
    #[test]
    fn hello_without_extensions() {
        let buf = frame(&hello_message(None), MAX_FRAGMENT, 0x0300);
        assert_eq!(
            parse(&buf),
            Hello::Complete {
                server_name: None,
                alpn: vec![],
            }
        );
    }

    /// Lengths that disagree with their container are refused.
    #[test]
    fn malformed_extensions_are_refused() {
        let alpn = |data: &[u8]| (EXT_ALPN, data.to_vec());
        let cases: Vec<(Extensions, &str)> = vec![
            (vec![alpn(&[0, 0])], "malformed ALPN extension"),
            (vec![alpn(&[0, 1, 0])], "malformed ALPN extension"),
            (vec![alpn(&[0, 3, 2, b'h'])], "malformed ALPN extension"),
            (
                vec![alpn(&[0, 3, 2, b'h', b'2', 0])],
                "malformed ALPN extension",
            ),
            (
                vec![alpn(&[0, 3, 2, b'h', b'2']), alpn(&[0, 3, 2, b'h', b'2'])],
                "duplicate ALPN extension",
            ),
            (
                vec![(EXT_SERVER_NAME, vec![])],
                "malformed server_name extension",
            ),
            (
                vec![(EXT_SERVER_NAME, vec![0, 0])],
                "malformed server_name extension",
            ),
            (
                vec![(EXT_SERVER_NAME, vec![0, 4, 0, 0, 9, b'a'])],
                "malformed server_name extension",
            ),
            (
                vec![
                    server_name_ext(&[(0, b"a.test")]),
                    server_name_ext(&[(0, b"b.test")]),
                ],
                "duplicate server_name",
            ),
        ];
        for (extensions, reason) in cases {
            let buf = frame(&hello_message(Some(&extensions)), MAX_FRAGMENT, 0x0303);
            assert_eq!(parse(&buf), Hello::NotTls(reason), "{extensions:?}");
        }
        // An extension running past the extensions block, and bytes after the block.
        let mut message = hello_message(Some(&[alpn(&[0, 3, 2, b'h', b'2'])]));
        let at = message.len() - 7; // the ALPN extension's length
        message[at + 1] += 1;
        assert_eq!(
            parse(&frame(&message, MAX_FRAGMENT, 0x0303)),
            Hello::NotTls("malformed ClientHello")
        );
        let mut message = hello_message(Some(&[]));
        message.push(0);
        message[3] += 1;
        assert_eq!(
            parse(&frame(&message, MAX_FRAGMENT, 0x0303)),
            Hello::NotTls("malformed ClientHello")
        );
    }

    /// The MAX_HELLO bound is exact: a hello filling it is read, one past is not.
    #[test]
    fn too_long_hellos_are_refused() {
        // A handshake length that could never fit: refused at once.
        assert_eq!(
            parse(&[22, 3, 1, 0x40, 0, 1, 0, 0x40, 0]),
            Hello::NotTls("ClientHello too long")
        );
        // The largest message a single full record holds is accepted...
        let pad = |n: usize| (0xffff_u16, vec![0; n]);
        let small = hello_message(Some(&[server_name_ext(&[(0, b"a.test")]), pad(0)]));
        let room = MAX_FRAGMENT - small.len();
        let message = hello_message(Some(&[server_name_ext(&[(0, b"a.test")]), pad(room)]));
        assert_eq!(message.len(), MAX_FRAGMENT);
        let buf = frame(&message, MAX_FRAGMENT, 0x0303);
        assert_eq!(buf.len(), MAX_HELLO);
        assert_eq!(name_of(&buf).as_deref(), Some("a.test"));
        // ...but not when framed in smaller records: partial until the bound, then refused.
        let buf = frame(&message, 1000, 0x0303);
        assert_eq!(parse(&buf[..MAX_HELLO - 1]), Hello::Partial);
        assert_eq!(
            parse(&buf[..MAX_HELLO]),
            Hello::NotTls("ClientHello too long")
        );
        assert_eq!(parse(&buf), Hello::NotTls("ClientHello too long"));
    }

    /// Every single-byte corruption of a real hello is answered.
    #[test]
    fn corrupted_hellos_never_panic() {
        let hello = rustls_hello("a.test", &[b"h2", b"http/1.1"]);
        let fragmented = frame(&unframe(&hello), 100, 0x0303);
        for original in [&hello, &fragmented] {
            let mut buf = original.clone();
            for i in 0..buf.len() {
                for flip in [0x01, 0x80, 0xff] {
                    buf[i] ^= flip;
                    let _ = parse(&buf);
                    buf[i] ^= flip;
                }
            }
        }
    }

    /// Random input, raw or behind a handshake record header, is answered.
    #[test]
    fn random_bytes_never_panic() {
        let hello = rustls_hello("a.test", &[b"h2"]);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = rng.below(600);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Half get a plausible record header, to reach the hello parser.
            if rng.below(2) == 0 && buf.len() >= 5 {
                buf[..3].copy_from_slice(&[22, 3, 1]);
            }
            let _ = parse(&buf);
            // And a real hello with a few random bytes overwritten.
            let mut buf = hello.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(buf.len());
                buf[at] = rng.next() as u8;
            }
            let _ = parse(&buf);
        }
    }
}
