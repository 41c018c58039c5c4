//! Sets of networks: who may call an action, and whose `X-Forwarded-For` we believe.

use std::net::IpAddr;

use ipnet::IpNet;

/// A set of CIDRs. Lookups are a linear scan: real allowlists hold a handful of entries, and
/// a scan over a few cache lines beats any tree at that size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    nets: Vec<IpNet>,
}

impl IpSet {
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> IpSet {
        let mut nets: Vec<IpNet> = nets.into_iter().collect();
        nets.sort();
        nets.dedup();
        IpSet { nets }
    }

    /// Whether `ip` is in the set. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, as seen on a
    /// dual-stack listener) are matched as the IPv4 address they carry.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(cidrs: &[&str]) -> IpSet {
        IpSet::new(cidrs.iter().map(|c| c.parse().unwrap()))
    }

    #[test]
    fn matches_v4_and_v6_cidrs() {
        let s = set(&["10.20.0.0/16", "2001:db8::/32", "1.13.19.96/32"]);
        assert!(s.contains("10.20.3.4".parse().unwrap()));
        assert!(!s.contains("10.21.0.1".parse().unwrap()));
        assert!(s.contains("2001:db8::1".parse().unwrap()));
        assert!(!s.contains("2001:db9::1".parse().unwrap()));
        assert!(s.contains("1.13.19.96".parse().unwrap()));
        assert!(!s.contains("1.13.19.97".parse().unwrap()));
    }

    #[test]
    fn ipv4_mapped_ipv6_matches_as_ipv4() {
        let s = set(&["127.0.0.2/32"]);
        assert!(s.contains("::ffff:127.0.0.2".parse().unwrap()));
        assert!(!s.contains("::ffff:127.0.0.3".parse().unwrap()));
    }

    #[test]
    fn empty_set_matches_nothing() {
        assert!(!IpSet::default().contains("127.0.0.1".parse().unwrap()));
    }
}
