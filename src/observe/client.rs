//! Who is calling: the client's IP address, which the per-address limits
//! are keyed by and which the history records as the actor of an
//! ActivationService call (`peer:<ip>`).
//!
//! It is the TCP peer, unless the peer is one of the operator's trusted
//! proxies (`--trusted-proxies CIDR,...`: the load balancers in front of
//! the replicas). Then it is the right-most hop of `x-forwarded-for` that
//! is not itself a trusted proxy, or, without that header, `x-real-ip`.
//! Right-most, because every proxy appends the address it was called from:
//! the left part of the list is whatever the client sent and proves
//! nothing. From any other peer both headers are ignored, so a client
//! cannot pick the address it is limited and recorded as. A value that is
//! not a list of IP addresses is ignored too (the peer is the client):
//! never an error, since the caller may not even know the header is there.
//!
//! Only a forwarded address is put in the request's extensions
//! ([`ClientAddr`]); a call without one is its peer's, so the hot path of a
//! server without trusted proxies adds nothing per call.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

/// The address a trusted proxy said it forwarded the call for, in the
/// request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The metadata key proxies append the address they were called from to.
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
/// The metadata key some proxies put the one client address in.
pub const X_REAL_IP: &str = "x-real-ip";

/// The networks whose calls may say who they forward for. Empty by
/// default: no peer is trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses `10.0.0.0/8,192.168.1.5,fd00::/8`: CIDRs or single addresses,
    /// separated by commas (spaces and empty items are ignored).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let net = IpNet::from_str(item)
                .map(|n| n.trunc())
                .or_else(|_| IpAddr::from_str(item).map(IpNet::from))
                .map_err(|_| {
                    format!("`{item}` is neither a CIDR (such as 10.0.0.0/8) nor an IP address")
                })?;
            nets.push(net);
        }
        Ok(TrustedProxies(nets))
    }

    /// Whether no peer is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is inside a trusted network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The address a trusted proxy forwarded the call from `peer` for;
    /// `None` when `peer` is not trusted or gave no usable address (the
    /// client is then `peer` itself).
    pub fn forwarded_for(&self, peer: IpAddr, headers: &HeaderMap) -> Option<IpAddr> {
        if !self.contains(peer) {
            return None;
        }
        let mut hops = headers.get_all(X_FORWARDED_FOR).iter().peekable();
        if hops.peek().is_some() {
            return self.rightmost_untrusted(hops);
        }
        headers.get(X_REAL_IP).and_then(|v| hop(v.to_str().ok()?))
    }

    /// The right-most hop that is not a trusted proxy; if every hop is one,
    /// the left-most (the one furthest away). `None` at the first value,
    /// from the right, that is not an address.
    fn rightmost_untrusted<'a>(
        &self,
        values: impl DoubleEndedIterator<Item = &'a HeaderValue>,
    ) -> Option<IpAddr> {
        let mut furthest = None;
        // Several header lines are one list, in order.
        for value in values.rev() {
            for item in value.to_str().ok()?.rsplit(',') {
                let ip = hop(item)?;
                if !self.contains(ip) {
                    return Some(ip);
                }
                furthest = Some(ip);
            }
        }
        furthest
    }
}

impl std::fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nets: Vec<String> = self.0.iter().map(IpNet::to_string).collect();
        f.write_str(&nets.join(","))
    }
}

/// One hop of `x-forwarded-for`: an address, perhaps with a port (some
/// proxies add it: `203.0.113.7:41234`, `[2001:db8::1]:443`).
fn hop(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let ip = IpAddr::from_str(text)
        .or_else(|_| SocketAddr::from_str(text).map(|a| a.ip()))
        .ok()?;
    Some(ip.to_canonical())
}

/// The TCP peer's address, with or without TLS.
pub fn peer_addr<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

/// The client's address: the one a trusted proxy forwarded the call for
/// (the request's [`ClientAddr`] extension), else the TCP peer's.
pub fn client_ip(forwarded: Option<&ClientAddr>, peer: Option<SocketAddr>) -> Option<IpAddr> {
    match forwarded {
        Some(ClientAddr(ip)) => Some(*ip),
        None => peer.map(|p| p.ip().to_canonical()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(list: &str) -> TrustedProxies {
        TrustedProxies::parse(list).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const LB: &str = "10.0.0.2";

    #[test]
    fn cidrs_and_single_addresses_parse_and_anything_else_is_refused() {
        let t = trusted(" 10.0.0.0/8, 192.168.1.5 ,,fd00::/8");
        assert!(t.contains(ip("10.200.0.1")));
        assert!(t.contains(ip("192.168.1.5")));
        assert!(!t.contains(ip("192.168.1.6")));
        assert!(t.contains(ip("fd00::1")));
        // An IPv4 peer seen through an IPv6 socket.
        assert!(t.contains(ip("::ffff:10.1.2.3")));
        assert!(trusted("").is_empty());
        // Host bits are allowed and dropped, as most tools do.
        assert!(trusted("10.1.2.3/8").contains(ip("10.9.9.9")));
        for bad in [
            "10.0.0.0/33",
            "10.0.0",
            "lb.example",
            "10.0.0.0/8;",
            "::/129",
        ] {
            let err = TrustedProxies::parse(bad).unwrap_err();
            assert!(err.contains('`'), "{err}");
        }
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_sends() {
        let t = trusted("10.0.0.0/8");
        let h = headers(&[("x-forwarded-for", "203.0.113.7"), ("x-real-ip", "1.2.3.4")]);
        assert_eq!(t.forwarded_for(ip("198.51.100.1"), &h), None);
        assert_eq!(TrustedProxies::default().forwarded_for(ip(LB), &h), None);
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let t = trusted("10.0.0.0/8");
        let from = |pairs: &[(&str, &str)]| t.forwarded_for(ip(LB), &headers(pairs));
        assert_eq!(
            from(&[("x-forwarded-for", "203.0.113.7")]),
            Some(ip("203.0.113.7"))
        );
        // The client forged the left part; the proxy appended the truth.
        assert_eq!(
            from(&[("x-forwarded-for", "1.1.1.1, 203.0.113.7, 10.0.0.9")]),
            Some(ip("203.0.113.7"))
        );
        // Several header lines are one list.
        assert_eq!(
            from(&[
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "203.0.113.7,10.0.0.9")
            ]),
            Some(ip("203.0.113.7"))
        );
        // Ports and brackets, IPv6, IPv4-mapped.
        assert_eq!(
            from(&[("x-forwarded-for", "203.0.113.7:41234")]),
            Some(ip("203.0.113.7"))
        );
        assert_eq!(
            from(&[("x-forwarded-for", "[2001:db8::1]:443")]),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(
            from(&[("x-forwarded-for", "::ffff:203.0.113.7")]),
            Some(ip("203.0.113.7"))
        );
        // Only proxies: the furthest one.
        assert_eq!(
            from(&[("x-forwarded-for", "10.0.0.7, 10.0.0.9")]),
            Some(ip("10.0.0.7"))
        );
        // x-real-ip only without x-forwarded-for.
        assert_eq!(
            from(&[("x-real-ip", "203.0.113.8")]),
            Some(ip("203.0.113.8"))
        );
        assert_eq!(
            from(&[
                ("x-real-ip", "203.0.113.8"),
                ("x-forwarded-for", "203.0.113.7")
            ]),
            Some(ip("203.0.113.7"))
        );
    }

    #[test]
    fn malformed_values_are_ignored_and_the_peer_is_the_client() {
        let t = trusted("10.0.0.0/8");
        let from = |pairs: &[(&str, &str)]| t.forwarded_for(ip(LB), &headers(pairs));
        for bad in [
            "",
            " ",
            "unknown",
            "203.0.113.7 garbage",
            "1.2.3.4, , ",
            "::::",
            "300.1.1.1",
        ] {
            assert_eq!(from(&[("x-forwarded-for", bad)]), None, "{bad:?}");
            assert_eq!(from(&[("x-real-ip", bad)]), None, "{bad:?}");
        }
        // A malformed hop left of the client is never read.
        assert_eq!(
            from(&[("x-forwarded-for", "garbage, 203.0.113.7")]),
            Some(ip("203.0.113.7"))
        );
        // Not UTF-8 text.
        let mut h = HeaderMap::new();
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"203.0.113.\xff").unwrap(),
        );
        assert_eq!(t.forwarded_for(ip(LB), &h), None);
    }
}
