//! The PROXY protocol header (HAProxy's, versions 1 and 2) a TCP listener sends a backend
//! before the client's bytes, so that the backend learns the client's address as it would
//! from `X-Forwarded-For`. NGINX (`proxy_protocol on`), HAProxy (`send-proxy`), Envoy and
//! most servers read it. Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::io::Write as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::config::ProxyProtocol;

/// The v2 signature (12 bytes), chosen to be invalid in any text protocol.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Appends the header for a connection from `client` to `local` (the listener's address
/// as the client reached it). Both addresses go in one family: IPv4 when both are IPv4
/// (IPv4-mapped IPv6 counts as IPv4, as on a dual-stack listener), IPv6 otherwise.
pub(super) fn encode(
    version: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
    out: &mut Vec<u8>,
) {
    let (src, dst) = match (v4(client.ip()), v4(local.ip())) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
        (s, d) => (IpAddr::V6(v6(s)), IpAddr::V6(v6(d))),
    };
    let (sport, dport) = (client.port(), local.port());
    match version {
        ProxyProtocol::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            let _ = write!(out, "PROXY {family} {src} {dst} {sport} {dport}\r\n");
        }
        ProxyProtocol::V2 => {
            out.extend_from_slice(V2_SIGNATURE);
            // Version 2, command PROXY.
            out.push(0x21);
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    // TCP over IPv4; 12 bytes of addresses.
                    out.extend_from_slice(&[0x11, 0, 12]);
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    // TCP over IPv6; 36 bytes of addresses.
                    out.extend_from_slice(&[0x21, 0, 36]);
                    out.extend_from_slice(&v6(s).octets());
                    out.extend_from_slice(&v6(d).octets());
                }
            }
            out.extend_from_slice(&sport.to_be_bytes());
            out.extend_from_slice(&dport.to_be_bytes());
        }
    }
}

fn v4(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: ProxyProtocol, client: &str, local: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode(
            version,
            client.parse().unwrap(),
            local.parse().unwrap(),
            &mut out,
        );
        out
    }

    #[test]
    fn v1_lines_are_the_specs_examples() {
        assert_eq!(
            header(ProxyProtocol::V1, "192.168.0.1:56324", "192.168.0.11:443"),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        assert_eq!(
            header(ProxyProtocol::V1, "[2001:db8::1]:56324", "[::1]:443"),
            b"PROXY TCP6 2001:db8::1 ::1 56324 443\r\n"
        );
        // A dual-stack listener sees IPv4 clients as mapped addresses: sent as IPv4.
        assert_eq!(
            header(
                ProxyProtocol::V1,
                "[::ffff:10.0.0.7]:5000",
                "[::ffff:10.0.0.1]:80"
            ),
            b"PROXY TCP4 10.0.0.7 10.0.0.1 5000 80\r\n"
        );
        // Mixed families: both as IPv6.
        assert_eq!(
            header(ProxyProtocol::V1, "10.0.0.7:5000", "[2001:db8::2]:80"),
            b"PROXY TCP6 ::ffff:10.0.0.7 2001:db8::2 5000 80\r\n"
        );
    }

    #[test]
    fn v2_headers_carry_family_length_addresses_and_ports() {
        let h = header(ProxyProtocol::V2, "192.168.0.1:56324", "192.168.0.11:443");
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 168, 0, 1, 192, 168, 0, 11]);
        want.extend_from_slice(&56324u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(h, want);
        let h = header(ProxyProtocol::V2, "[2001:db8::1]:1", "[::1]:2");
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            &h[16..32],
            &"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&h[48..], &[0, 1, 0, 2]);
    }
}
