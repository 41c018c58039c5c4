//! Who is calling: the socket peer, or, behind trusted proxies, the nearest untrusted hop.

use std::net::{IpAddr, SocketAddr};

use super::allowlist::IpSet;

/// Resolves the client address for the allowlist.
///
/// When the peer is a trusted proxy, `X-Forwarded-For` is walked from the right (the entries
/// our own proxies appended) and the first address that is not a trusted proxy is the client.
/// The leftmost entry is never taken on trust: anyone can write it. If every hop is trusted the
/// leftmost one is used; if a hop is not an address, the trusted hop that passed it on is used,
/// since nothing further left can be believed.
pub fn resolve<'h>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'h [u8]>,
    trusted: &IpSet,
) -> IpAddr {
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let mut client = peer;
    // Several X-Forwarded-For headers are one list in order; walk them right to left.
    for header in forwarded_for.rev() {
        for entry in header.rsplit(|&b| b == b',') {
            match parse_hop(entry) {
                Some(hop) if trusted.contains(hop) => client = hop,
                Some(hop) => return hop,
                None => return client,
            }
        }
    }
    client
}

fn parse_hop(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    text.parse::<IpAddr>()
        .or_else(|_| text.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> IpSet {
        IpSet::new(["10.0.0.0/8".parse().unwrap()])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn run(peer: &str, headers: &[&str]) -> IpAddr {
        resolve(ip(peer), headers.iter().map(|h| h.as_bytes()), &trusted())
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        assert_eq!(run("203.0.113.9", &["47.94.95.118"]), ip("203.0.113.9"));
    }

    #[test]
    fn trusted_peer_yields_rightmost_untrusted_hop() {
        assert_eq!(run("10.0.0.1", &["47.94.95.118"]), ip("47.94.95.118"));
        // A spoofed leftmost entry is ignored.
        assert_eq!(
            run("10.0.0.1", &["47.94.95.118, 203.0.113.9, 10.0.0.7"]),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn several_headers_form_one_list() {
        assert_eq!(
            run("10.0.0.1", &["47.94.95.118", "203.0.113.9, 10.1.1.1"]),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn all_trusted_or_missing_falls_back_sensibly() {
        assert_eq!(run("10.0.0.1", &[]), ip("10.0.0.1"));
        assert_eq!(run("10.0.0.1", &["10.0.0.5, 10.0.0.6"]), ip("10.0.0.5"));
        assert_eq!(run("10.0.0.1", &["garbage, 10.0.0.6"]), ip("10.0.0.6"));
    }

    #[test]
    fn ports_and_ipv6_hops_are_understood() {
        assert_eq!(run("10.0.0.1", &["47.94.95.118:5555"]), ip("47.94.95.118"));
        assert_eq!(run("10.0.0.1", &["2001:db8::1"]), ip("2001:db8::1"));
    }
}
