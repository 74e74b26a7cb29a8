//! Address allocation: pod IPs from a node's pod CIDR, ClusterIPs from the service CIDR.

use std::{collections::BTreeSet, net::Ipv4Addr};

use ipnet::Ipv4Net;

/// First pod address: .1 is the node's router.
pub const FIRST_POD_OFFSET: u32 = 2;
/// First automatically allocated ClusterIP. The addresses below it stay free for Services
/// that ask for one explicitly, as well-known ones do (`kubernetes` at .1).
pub const FIRST_CLUSTER_IP_OFFSET: u32 = 10;

pub fn router_ip(cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

/// The lowest address of `cidr` at or above `network + first_offset` that is not in `used`,
/// leaving out the broadcast address.
pub fn lowest_free(
    cidr: Ipv4Net,
    first_offset: u32,
    used: &BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let first = u32::from(cidr.network()).checked_add(first_offset)?;
    let last = u32::from(cidr.broadcast()).checked_sub(1)?;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip))
}

/// Whether `ip` can be a ClusterIP of `cidr`: inside it, not its network or broadcast address.
pub fn is_assignable(cidr: Ipv4Net, ip: Ipv4Addr) -> bool {
    cidr.contains(&ip) && ip != cidr.network() && ip != cidr.broadcast()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn pod_ips_start_at_two_and_reuse_the_lowest_free() {
        let cidr = net("10.244.1.0/24");
        let mut used = BTreeSet::new();
        let a = lowest_free(cidr, FIRST_POD_OFFSET, &used).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 244, 1, 2));
        used.insert(a);
        used.insert(Ipv4Addr::new(10, 244, 1, 3));
        assert_eq!(
            lowest_free(cidr, FIRST_POD_OFFSET, &used),
            Some(Ipv4Addr::new(10, 244, 1, 4))
        );
        used.remove(&a);
        assert_eq!(lowest_free(cidr, FIRST_POD_OFFSET, &used), Some(a));
    }

    #[test]
    fn a_full_range_has_nothing_free_and_never_hands_out_broadcast() {
        let cidr = net("10.244.1.0/30");
        let used = BTreeSet::new();
        assert_eq!(
            lowest_free(cidr, FIRST_POD_OFFSET, &used),
            Some(Ipv4Addr::new(10, 244, 1, 2))
        );
        let used = BTreeSet::from([Ipv4Addr::new(10, 244, 1, 2)]);
        assert_eq!(lowest_free(cidr, FIRST_POD_OFFSET, &used), None);
    }

    #[test]
    fn cluster_ips_start_at_ten() {
        let cidr = net("10.96.0.0/16");
        assert_eq!(
            lowest_free(cidr, FIRST_CLUSTER_IP_OFFSET, &BTreeSet::new()),
            Some(Ipv4Addr::new(10, 96, 0, 10))
        );
        assert!(is_assignable(cidr, Ipv4Addr::new(10, 96, 0, 1)));
        assert!(!is_assignable(cidr, Ipv4Addr::new(10, 96, 0, 0)));
        assert!(!is_assignable(cidr, Ipv4Addr::new(10, 96, 255, 255)));
        assert!(!is_assignable(cidr, Ipv4Addr::new(10, 97, 0, 1)));
    }

    #[test]
    fn router_is_the_first_host_address() {
        assert_eq!(
            router_ip(net("10.244.1.0/24")),
            Ipv4Addr::new(10, 244, 1, 1)
        );
    }
}
