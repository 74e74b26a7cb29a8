//! Ports of rows: port ranges as prefixes, and named ports as numbers.

use std::collections::BTreeSet;

use super::workloads::Workload;

/// Numbers of the pod's container ports named `name` with protocol `proto`.
pub(super) fn named(w: &Workload<'_>, name: &str, proto: u8) -> BTreeSet<u16> {
    w.ports
        .iter()
        .filter(|(n, p, _)| n == name && *p == proto)
        .map(|(_, _, number)| *number)
        .collect()
}

/// The smallest set of aligned power-of-two blocks covering `first..=last`, as (start,
/// number of fixed leading bits).
pub(super) fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut start, last) = (u32::from(first), u32::from(last));
    while start <= last {
        // The largest block aligned at `start` that stays within the range.
        let mut size: u32 = if start == 0 {
            1 << 16
        } else {
            1 << start.trailing_zeros()
        };
        while start + size - 1 > last {
            size >>= 1;
        }
        // Both fit: start <= 65535 and size is a power of two up to 2^16.
        out.push((start as u16, (16 - size.trailing_zeros()) as u8));
        start += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::port_prefixes;

    #[test]
    fn port_ranges_become_aligned_blocks() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(8000, 8003), vec![(8000, 14)]);
        assert_eq!(port_prefixes(80, 90), vec![(80, 13), (88, 15), (90, 16)]);
        assert_eq!(port_prefixes(65535, 65535), vec![(65535, 16)]);
        for (first, last) in [(1, 65535), (1000, 2000), (7, 9)] {
            let covered: u32 = port_prefixes(first, last)
                .iter()
                .map(|(_, bits)| 1u32 << (16 - bits))
                .sum();
            assert_eq!(covered, u32::from(last - first) + 1);
        }
    }
}
