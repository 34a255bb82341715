//! Who the client is, when regscope sits behind a forwarding proxy it trusts: `--trusted-proxies`
//! takes the client from `Forwarded` or `X-Forwarded-For`, and only from a trusted peer; anyone
//! else's headers say nothing.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

/// An address block: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let bad = || format!("{text:?} is not an address block (like 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7)");
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> u128 {
            match ip {
                IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        let ip = ip.to_canonical();
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
        bits(ip) & mask == bits(self.addr) & mask
    }
}

/// The client of a request that came from `peer`: from its forwarding headers when `peer` is
/// trusted (the nearest address in them that is not itself a trusted proxy), else `peer`.
pub(crate) fn client_of(peer: SocketAddr, headers: &HeaderMap, trusted: &[Cidr]) -> SocketAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if trusted.is_empty() || !is_trusted(peer.ip()) {
        return peer;
    }
    // `Forwarded` first (the standard), then `X-Forwarded-For`; each header line may hold a list,
    // and several lines are one list in order. Walk from the nearest hop outwards (no allocation:
    // this runs per request behind a trusted balancer).
    let hops = |name: http::header::HeaderName, parse: fn(&str) -> Option<IpAddr>| {
        let values = headers.get_all(name).into_iter().filter_map(|v| v.to_str().ok());
        values.flat_map(|v| v.split(',')).filter_map(parse)
    };
    let client = |name: http::header::HeaderName, parse: fn(&str) -> Option<IpAddr>| {
        hops(name.clone(), parse).rev().find(|ip| !is_trusted(*ip)).or_else(|| hops(name, parse).next())
    };
    let x_forwarded_for = http::header::HeaderName::from_static("x-forwarded-for");
    let found = client(http::header::FORWARDED, forwarded_for)
        .or_else(|| client(x_forwarded_for, |hop| hop.trim().parse().ok()));
    found.map_or(peer, |ip| SocketAddr::new(ip.to_canonical(), 0))
}

/// The address in one `Forwarded` element's `for=` (quoted, bracketed IPv6, an optional port).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let value = element.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.trim().eq_ignore_ascii_case("for").then(|| value.trim().trim_matches('"'))
    })?;
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let host = match value.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => value,
    };
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks() {
        let cases: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8", "10.200.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("192.0.2.7", "192.0.2.7", true),
            ("192.0.2.7", "192.0.2.8", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("2001:db8::/32", "2001:db8:1::5", true),
            ("2001:db8::/32", "2001:db9::5", false),
            ("127.0.0.0/8", "::ffff:127.0.0.1", true),
            ("::/0", "10.0.0.1", false),
        ];
        for (block, ip, want) in cases {
            let cidr: Cidr = block.parse().unwrap();
            assert_eq!(cidr.contains(ip.parse().unwrap()), *want, "{block} ∋ {ip}");
        }
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "host", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn clients() {
        let trusted: Vec<Cidr> = vec!["127.0.0.0/8".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.1:40000".parse().unwrap();
        type Case<'a> = (SocketAddr, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (peer, &[("x-forwarded-for", "203.0.113.7")], "203.0.113.7"),
            (peer, &[("x-forwarded-for", "203.0.113.7, 10.1.1.1")], "203.0.113.7"),
            (peer, &[("x-forwarded-for", "198.51.100.9, 203.0.113.7")], "203.0.113.7"),
            (peer, &[("x-forwarded-for", "198.51.100.9"), ("x-forwarded-for", "203.0.113.7")], "203.0.113.7"),
            (peer, &[("forwarded", "for=203.0.113.7;proto=https"), ("x-forwarded-for", "198.51.100.9")], "203.0.113.7"),
            (peer, &[("forwarded", r#"for="[2001:db8::7]:4711""#)], "2001:db8::7"),
            (peer, &[("forwarded", "for=203.0.113.7:8080, for=10.0.0.3")], "203.0.113.7"),
            (peer, &[("x-forwarded-for", "10.0.0.2, 10.0.0.3")], "10.0.0.2"),
            (peer, &[("x-forwarded-for", "not an address")], "127.0.0.1"),
            (peer, &[], "127.0.0.1"),
            (stranger, &[("x-forwarded-for", "203.0.113.7")], "198.51.100.1"),
            (stranger, &[("forwarded", "for=203.0.113.7")], "198.51.100.1"),
        ];
        for (from, headers, want) in cases {
            let mut map = HeaderMap::new();
            for (name, value) in *headers {
                map.append(http::HeaderName::from_static(name), value.parse().unwrap());
            }
            assert_eq!(client_of(*from, &map, &trusted).ip().to_string(), *want, "{from} {headers:?}");
        }
        assert_eq!(client_of(peer, &HeaderMap::new(), &[]), peer);
    }
}
