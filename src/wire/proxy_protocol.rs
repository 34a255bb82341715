//! PROXY protocol (v1 text, v2 binary), as L4 balancers (AWS NLB, haproxy, Envoy) send it ahead of
//! the connection's bytes to say who the client is. With `--proxy-protocol` every connection
//! must start with one; anything else closes the connection before a byte is forwarded.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v2's signature: twelve bytes no HTTP request can start with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line the specification allows, CRLF included.
const V1_MAX: usize = 107;

/// What a PROXY header says of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The client the balancer relayed.
    Client(SocketAddr),
    /// The balancer speaking for itself (v2 `LOCAL`, v1 `UNKNOWN`, or a family without an
    /// address, such as a Unix socket): the peer's own address stands.
    Peer,
}

/// Why a connection was closed without being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    NoHeader,
    Malformed,
    TimedOut,
}

/// Reads exactly one PROXY header off `stream` (never a byte of what follows), within `within`.
pub(crate) async fn read_header(stream: &mut TcpStream, within: Duration) -> Result<Source, Refused> {
    match tokio::time::timeout(within, read(stream)).await {
        Ok(result) => result,
        Err(_) => Err(Refused::TimedOut),
    }
}

async fn read(stream: &mut TcpStream) -> Result<Source, Refused> {
    // Both versions are at least 15 bytes long ("PROXY UNKNOWN\r\n", v2's fixed part is 16), so
    // reading 12 never reads past a header.
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.map_err(|_| Refused::NoHeader)?;
    if head == V2_SIGNATURE {
        let mut fixed = [0u8; 4];
        stream.read_exact(&mut fixed).await.map_err(|_| Refused::Malformed)?;
        let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        let mut rest = vec![0u8; len];
        stream.read_exact(&mut rest).await.map_err(|_| Refused::Malformed)?;
        return parse_v2(fixed[0], fixed[1], &rest).ok_or(Refused::Malformed);
    }
    if !head.starts_with(b"PROXY ") {
        return Err(Refused::NoHeader);
    }
    let mut line = head.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(Refused::Malformed);
        }
        line.push(stream.read_u8().await.map_err(|_| Refused::Malformed)?);
    }
    parse_v1(&line).ok_or(Refused::Malformed)
}

/// `PROXY TCP4 src dst sport dport\r\n` (or TCP6, or UNKNOWN with anything after it).
pub(crate) fn parse_v1(line: &[u8]) -> Option<Source> {
    let line = std::str::from_utf8(line).ok()?.strip_suffix("\r\n")?;
    let mut fields = line.split(' ');
    if fields.next()? != "PROXY" {
        return None;
    }
    let family = fields.next()?;
    if family == "UNKNOWN" {
        return Some(Source::Peer);
    }
    let (src, _dst, sport, _dport) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
    if fields.next().is_some() {
        return None;
    }
    let ip: IpAddr = match family {
        "TCP4" => IpAddr::V4(src.parse::<Ipv4Addr>().ok()?),
        "TCP6" => IpAddr::V6(src.parse::<Ipv6Addr>().ok()?),
        _ => return None,
    };
    // Ports are decimal without leading zeros, 0–65535.
    let port: u16 = sport.parse().ok().filter(|_| sport == "0" || !sport.starts_with('0'))?;
    Some(Source::Client(SocketAddr::new(ip, port)))
}

/// v2 after the signature: version and command, family and protocol, then the addresses.
pub(crate) fn parse_v2(version_command: u8, family: u8, rest: &[u8]) -> Option<Source> {
    if version_command >> 4 != 2 {
        return None;
    }
    match version_command & 0x0f {
        0 => return Some(Source::Peer),
        1 => {}
        _ => return None,
    }
    match family {
        // TCP or UDP over IPv4: source, destination, source port, destination port.
        0x11 | 0x12 if rest.len() >= 12 => {
            let ip = Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
            Some(Source::Client(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([rest[8], rest[9]]))))
        }
        0x21 | 0x22 if rest.len() >= 36 => {
            let octets: [u8; 16] = rest[..16].try_into().ok()?;
            let port = u16::from_be_bytes([rest[32], rest[33]]);
            Some(Source::Client(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port)))
        }
        0x11 | 0x12 | 0x21 | 0x22 => None,
        // Unspecified or Unix sockets: no address to use.
        _ => Some(Source::Peer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines() {
        let client = |s: &str| Some(Source::Client(s.parse().unwrap()));
        let cases: &[(&str, Option<Source>)] = &[
            ("PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n", client("192.0.2.7:56324")),
            ("PROXY TCP6 2001:db8::7 2001:db8::1 4711 5001\r\n", client("[2001:db8::7]:4711")),
            ("PROXY UNKNOWN\r\n", Some(Source::Peer)),
            ("PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", Some(Source::Peer)),
            ("PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\n", None),
            ("PROXY TCP4 192.0.2.7 10.0.0.1 56324\r\n", None),
            ("PROXY TCP4 192.0.2.7 10.0.0.1 56324 443 x\r\n", None),
            ("PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n", None),
            ("PROXY TCP6 192.0.2.7 10.0.0.1 1 2\r\n", None),
            ("PROXY TCP4 192.0.2.7 10.0.0.1 065535 1\r\n", None),
            ("PROXY TCP4 192.0.2.7 10.0.0.1 65536 1\r\n", None),
            ("PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n", None),
            ("GET / HTTP/1.1\r\n", None),
        ];
        for (line, want) in cases {
            assert_eq!(parse_v1(line.as_bytes()), *want, "{line:?}");
        }
    }

    #[test]
    fn v2_headers() {
        let v4 = [192, 0, 2, 7, 10, 0, 0, 1, 0xdc, 0x04, 0x01, 0xbb];
        let mut v6 = vec![0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        v6.extend([0u8; 16]);
        v6.extend([0x12, 0x67, 0x13, 0x89]);
        let client = |s: &str| Some(Source::Client(s.parse().unwrap()));
        let cases: &[(u8, u8, &[u8], Option<Source>)] = &[
            (0x21, 0x11, &v4, client("192.0.2.7:56324")),
            (0x21, 0x21, &v6, client("[2001:db8::7]:4711")),
            (0x20, 0x00, &[], Some(Source::Peer)),
            (0x20, 0x11, &v4, Some(Source::Peer)),
            (0x21, 0x31, &[0; 216], Some(Source::Peer)),
            (0x21, 0x11, &v4[..8], None),
            (0x21, 0x21, &v4, None),
            (0x11, 0x11, &v4, None),
            (0x22, 0x11, &v4, None),
        ];
        for (vc, family, rest, want) in cases {
            assert_eq!(parse_v2(*vc, *family, rest), *want, "{vc:#x} {family:#x}");
        }
    }
}
