//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4): the lookup table
//! of one frontend, computed from its backends alone.
//!
//! Each backend gets a permutation of the table's M positions from two hashes of its
//! address and port (an offset and a skip, M prime so every skip visits every position);
//! the backends then take turns claiming the next free position of their permutation
//! until the table is full. Each backend ends up with M/N positions, give or take one,
//! and removing one backend moves little more than its own positions.
//!
//! The table depends only on the backends' addresses and ports and on M, through hashes
//! defined here (FNV-1a and SplitMix64, not the standard library's hasher, whose output
//! may change between Rust releases), so every node computes the same table and a flow
//! that lands on another node keeps its backend.

use std::{fmt, net::Ipv4Addr, str::FromStr};

/// Table size when `--maglev-table-size` is not given (Cilium's default).
pub const DEFAULT_TABLE_SIZE: u16 = 16381;

/// The largest table: positions hold u16 slot numbers and the frontend stores M as a u16.
const MAX_TABLE_SIZE: u16 = 65521;

/// M, the number of positions of every Maglev table: a prime, so that each backend's skip
/// visits every position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableSize(u16);

impl TableSize {
    /// `size` if it is a prime from 3 to 65521.
    pub fn new(size: u64) -> Result<Self, String> {
        let fits = u16::try_from(size)
            .ok()
            .filter(|&m| (3..=MAX_TABLE_SIZE).contains(&m));
        match fits {
            Some(m) if is_prime(m) => Ok(Self(m)),
            Some(_) => Err(format!("{size} is not prime (e.g. 16381, 32749, 65521)")),
            None => Err(format!(
                "{size} is out of range: a prime from 3 to {MAX_TABLE_SIZE}"
            )),
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl Default for TableSize {
    fn default() -> Self {
        Self(DEFAULT_TABLE_SIZE)
    }
}

impl FromStr for TableSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let size = s
            .parse::<u64>()
            .map_err(|_| format!("{s:?} is not a number"))?;
        Self::new(size)
    }
}

impl fmt::Display for TableSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

fn is_prime(n: u16) -> bool {
    let n = u32::from(n);
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The (offset, skip) of a backend's permutation of `m` positions.
fn permutation(backend: (Ipv4Addr, u16), m: u64) -> (u64, u64) {
    let mut name = backend.0.octets().to_vec();
    name.extend_from_slice(&backend.1.to_be_bytes());
    let base = fnv1a(&name);
    let offset = splitmix64(base) % m;
    let skip = splitmix64(base ^ 0x5bd1_e995_5bd1_e995) % (m - 1) + 1;
    (offset, skip)
}

/// The table of a frontend whose backends are `backends`, in slot order: `size` positions,
/// each the slot number (1-based, as in `lb4_services`) of its backend. Empty without
/// backends.
pub fn table(backends: &[(Ipv4Addr, u16)], size: TableSize) -> Vec<u16> {
    let m = u64::from(size.get());
    let positions = usize::from(size.get());
    if backends.is_empty() {
        return Vec::new();
    }
    let permutations: Vec<(u64, u64)> = backends.iter().map(|&b| permutation(b, m)).collect();
    let mut next = vec![0u64; backends.len()];
    let mut table = vec![0u16; positions];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in permutations.iter().enumerate() {
            // A free position exists while the table is not full, and each backend's
            // permutation visits every position within m steps.
            let position = loop {
                let position = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[position] == 0 {
                    break position;
                }
            };
            // The compiler truncates a frontend's backends to u16::MAX slots.
            table[position] = u16::try_from(i + 1).unwrap_or(u16::MAX);
            filled += 1;
            if filled == positions {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u8) -> Vec<(Ipv4Addr, u16)> {
        (1..=n)
            .map(|i| (Ipv4Addr::new(10, 0, i, 2), 8080))
            .collect()
    }

    fn shares(table: &[u16], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &slot in table {
            counts[usize::from(slot) - 1] += 1;
        }
        counts
    }

    #[test]
    fn sizes_must_be_prime_and_fit() {
        assert_eq!(TableSize::default().get(), 16381);
        assert_eq!("65521".parse::<TableSize>().map(TableSize::get), Ok(65521));
        assert_eq!("251".parse::<TableSize>().map(TableSize::get), Ok(251));
        let err = "16384".parse::<TableSize>().unwrap_err();
        assert!(err.contains("16384 is not prime"), "{err}");
        assert!(
            "65537"
                .parse::<TableSize>()
                .unwrap_err()
                .contains("out of range")
        );
        assert!("2".parse::<TableSize>().is_err());
        assert!(
            "lots"
                .parse::<TableSize>()
                .unwrap_err()
                .contains("not a number")
        );
    }

    #[test]
    fn each_backend_gets_about_m_over_n_positions() {
        for n in [1u8, 2, 3, 5, 7, 10, 31] {
            let size = TableSize::default();
            let table = table(&backends(n), size);
            assert_eq!(table.len(), usize::from(size.get()));
            let fair = f64::from(size.get()) / f64::from(n);
            for (slot, count) in shares(&table, usize::from(n)).into_iter().enumerate() {
                let ratio = count as f64 / fair;
                assert!(
                    (0.9..=1.1).contains(&ratio),
                    "n={n}: backend slot {} has {count} positions, fair is {fair:.0}",
                    slot + 1
                );
            }
        }
    }

    #[test]
    fn the_table_depends_only_on_the_backends() {
        let size = TableSize::new(251).unwrap();
        assert_eq!(table(&backends(5), size), table(&backends(5), size));
        assert_ne!(table(&backends(5), size), table(&backends(6), size)[..]);
        assert!(table(&[], size).is_empty());
        // A fixed value: the hashes are defined here, so a table never changes between
        // builds, Rust releases or nodes.
        let small = table(&backends(3), TableSize::new(7).unwrap());
        assert_eq!(small, GOLDEN_7);
    }

    const GOLDEN_7: [u16; 7] = [3, 1, 1, 1, 3, 2, 2];

    #[test]
    fn removing_one_backend_moves_little_more_than_its_positions() {
        let size = TableSize::default();
        let all = backends(5);
        let before = table(&all, size);
        // Remove the third backend: slots after it shift down by one, so compare backends.
        let rest: Vec<_> = all.iter().copied().filter(|b| *b != all[2]).collect();
        let after = table(&rest, size);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|&(&b, &a)| {
                let was = all[usize::from(b) - 1];
                was != all[2] && rest[usize::from(a) - 1] != was
            })
            .count();
        let share = moved as f64 / f64::from(size.get());
        // The removed backend's own fifth moves by necessity; the paper reports a few
        // percent more.
        assert!(
            share < 0.05,
            "{moved} positions of surviving backends moved"
        );
    }
}
