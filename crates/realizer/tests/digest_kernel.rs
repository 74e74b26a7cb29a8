//! The drift check's in-kernel digest (bpf/iter_digest.c) against the digest user space
//! computes of the same content, for a map of every family the iterator covers: the hash
//! maps and the Maglev tables (arrays inside a hash of maps). Needs root and bpffs; never
//! skipped.
// Test helpers outside #[test] functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use aya::Pod;
use sluice_common::*;
use sluice_datapath::{
    Datapath, DatapathConfig, PinDir, PinnedMaps,
    digest::{Digest, pod_entry_hash},
};
use sluice_realizer::{
    Cursor, Desired, KernelMap, KernelTables, MIN_SLICE, Scan,
    maglev::{MaglevTables, table_digest},
};

fn load() -> (PinDir, Datapath, KernelTables) {
    let pins = PinDir::unique("sluice-test-digest-");
    let datapath = Datapath::load(pins.path(), &DatapathConfig::default())
        .unwrap_or_else(|err| panic!("loading the datapath into {}: {err}", pins.path().display()));
    let tables = KernelTables::open(pins.path()).expect("open the realized maps");
    (pins, datapath, tables)
}

/// The map's digest as the kernel's iterator folds it, in slices as the scan reads it.
fn kernel_digest<K: Pod + std::hash::Hash + Eq, V: Pod>(
    map: &impl KernelMap<K, V>,
    seed: u64,
) -> Digest {
    let mut walk = None;
    loop {
        let (_, done) = map.digest_from(&mut walk, 10_000, seed).unwrap();
        if let Some(digest) = done {
            return digest;
        }
        assert!(walk.is_some(), "a walk not at its end goes on");
    }
}

fn user_digest<K: Pod, V: Pod>(entries: &BTreeMap<K, V>, seed: u64) -> Digest {
    sluice_realizer::digest_of(seed, entries)
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 + i)
}

/// Fills `map` with `content`, checks both digests agree, then that a forged, a removed
/// and an added entry each change the kernel's, and that undoing each restores it.
fn check_family<K, V, M>(
    what: &str,
    map: &mut M,
    content: &BTreeMap<K, V>,
    seed: u64,
    other: (K, V),
    forged: V,
) where
    K: Pod + Ord + Copy + std::fmt::Debug + std::hash::Hash,
    V: Pod + Copy,
    M: KernelMap<K, V>,
{
    for (k, v) in content {
        map.upsert(k, v).unwrap();
    }
    let want = user_digest(content, seed);
    let started = Instant::now();
    let got = kernel_digest(map, seed);
    eprintln!(
        "{what}: {} entries digested in the kernel in {:?}",
        got.entries,
        started.elapsed()
    );
    assert_eq!(got, want, "{what}: the kernel's digest is user space's");
    assert_eq!(got.entries, content.len() as u64);

    let (&first, &value) = content.iter().next().unwrap();
    map.upsert(&first, &forged).unwrap();
    assert_ne!(kernel_digest(map, seed), want, "{what}: a forged entry");
    map.upsert(&first, &value).unwrap();
    assert_eq!(kernel_digest(map, seed), want, "{what}: restored");

    map.remove(&first).unwrap();
    assert_ne!(kernel_digest(map, seed), want, "{what}: a removed entry");
    map.upsert(&first, &value).unwrap();
    assert_eq!(kernel_digest(map, seed), want, "{what}: put back");

    map.upsert(&other.0, &other.1).unwrap();
    assert_ne!(kernel_digest(map, seed), want, "{what}: an added entry");
    map.remove(&other.0).unwrap();
    assert_eq!(kernel_digest(map, seed), want, "{what}: removed again");
}

#[test]
fn the_kernels_digest_of_every_hash_map_and_maglev_table_is_user_spaces_and_sees_every_drift() {
    let (pins, _datapath, mut tables) = load();
    let seed = tables.seed;
    let n = 20_000u32;

    let services: BTreeMap<_, _> = (0..n)
        .map(|i| {
            let key = Lb4Key::new(vip(i / 2), 80, IPPROTO_TCP, (i % 2) as u16);
            let value = if i % 2 == 0 {
                Lb4Service::frontend(1, SVC_FLAG_CLUSTER_IP)
            } else {
                Lb4Service::slot(vip(100_000 + i), 8080)
            };
            (key, value)
        })
        .collect();
    let other = Lb4Key::new(Ipv4Addr::new(10, 97, 0, 1), 80, IPPROTO_TCP, 0);
    check_family(
        "services",
        &mut tables.services,
        &services,
        seed,
        (other, Lb4Service::frontend(1, SVC_FLAG_CLUSTER_IP)),
        Lb4Service::slot(Ipv4Addr::new(10, 0, 0, 1), 81),
    );

    let active = Lb4Backend {
        state: BACKEND_STATE_ACTIVE,
        pad: [0; 3],
    };
    let backends: BTreeMap<_, _> = (0..n)
        .map(|i| {
            (
                Lb4BackendKey::new(vip(200_000 + i), 8080, IPPROTO_TCP),
                active,
            )
        })
        .collect();
    check_family(
        "backends",
        &mut tables.backends,
        &backends,
        seed,
        (
            Lb4BackendKey::new(Ipv4Addr::new(10, 1, 1, 1), 1, IPPROTO_UDP),
            active,
        ),
        Lb4Backend {
            state: BACKEND_STATE_ACTIVE + 1,
            pad: [0; 3],
        },
    );

    let endpoints: BTreeMap<_, _> = (1..=110u32)
        .map(|i| (i, EndpointInfo::new(vip(300_000 + i), 256 + i)))
        .collect();
    check_family(
        "endpoints",
        &mut tables.endpoints,
        &endpoints,
        seed,
        (5_000, EndpointInfo::new(Ipv4Addr::new(10, 2, 2, 2), 7)),
        EndpointInfo::new(Ipv4Addr::new(10, 2, 2, 3), 8),
    );

    // A Maglev table of 16381 positions, as the realizer installs it, then forged,
    // shortened and lengthened behind its back (a table of another size is another map).
    let frontend = Lb4Key::new(vip(1), 80, IPPROTO_TCP, 0);
    let lanes: Vec<MaglevLanes> = (0..4096u16)
        .map(|i| [i % 7 + 1, i % 5 + 1, i % 3 + 1, 1])
        .collect();
    tables.maglev.install(&[(frontend, lanes.clone())]).unwrap();
    let want = table_digest(seed, &lanes);
    let started = Instant::now();
    let got = tables.maglev.digest(&frontend, seed).unwrap();
    eprintln!(
        "maglev: a table of {} elements digested in {:?}",
        lanes.len(),
        started.elapsed()
    );
    assert_eq!(
        got,
        Some(want),
        "maglev: the kernel's digest is user space's"
    );
    let maps = PinnedMaps::open(pins.path()).unwrap();
    let mut table = maps.maglev.get(&frontend, 0).unwrap();
    table.set(17, [9, 9, 9, 9], 0).unwrap();
    assert_ne!(
        tables.maglev.digest(&frontend, seed).unwrap(),
        Some(want),
        "maglev: forged"
    );
    table.set(17, lanes[17], 0).unwrap();
    assert_eq!(
        tables.maglev.digest(&frontend, seed).unwrap(),
        Some(want),
        "maglev: restored"
    );
    for size in [4095, 4097] {
        let mut other = lanes.clone();
        other.resize(size, [1, 1, 1, 1]);
        tables.maglev.install(&[(frontend, other)]).unwrap();
        assert_ne!(
            tables.maglev.digest(&frontend, seed).unwrap(),
            Some(want),
            "maglev: {size} elements"
        );
    }
    tables.maglev.remove(&[frontend]).unwrap();
    assert_eq!(
        tables.maglev.digest(&frontend, seed).unwrap(),
        None,
        "maglev: no table"
    );
}

/// CPU time (user and system) this thread has used, to the nanosecond (getrusage counts
/// in scheduler ticks on some kernels).
fn thread_cpu() -> std::time::Duration {
    // SAFETY: timespec is plain integers, for which all zeroes is a value.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// One sweep's CPU time at 100,000 Services with 10 backends each (1,100,000 service
/// entries, 1,000,000 backends, maps of 2^21 entries): the in-kernel digest against
/// reading every entry with batched lookups and hashing it here (what the check did
/// before, and still does for LPM tries). A measurement, printed; run in release:
/// `cargo test --release -p sluice-realizer --test digest_kernel -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: fills maps of two million entries"]
fn one_sweep_at_a_million_backends() {
    let pins = PinDir::unique("sluice-test-digest-1m-");
    let config = DatapathConfig {
        lb_max_entries: 1 << 21,
        ..DatapathConfig::default()
    };
    let _datapath = Datapath::load(pins.path(), &config).expect("load the datapath");
    let mut tables = KernelTables::open(pins.path()).expect("open the realized maps");
    let seed = tables.seed;
    let (services_n, per) = (100_000u32, 10u32);
    let mut services = BTreeMap::new();
    let mut backends = BTreeMap::new();
    for s in 0..services_n {
        services.insert(
            Lb4Key::new(vip(s), 80, IPPROTO_TCP, 0),
            Lb4Service::frontend(per as u16, SVC_FLAG_CLUSTER_IP),
        );
        for b in 0..per {
            let addr = Ipv4Addr::from(0x0b00_0000 + s * per + b);
            services.insert(
                Lb4Key::new(vip(s), 80, IPPROTO_TCP, b as u16 + 1),
                Lb4Service::slot(addr, 8080),
            );
            backends.insert(
                Lb4BackendKey::new(addr, 8080, IPPROTO_TCP),
                Lb4Backend {
                    state: BACKEND_STATE_ACTIVE,
                    pad: [0; 3],
                },
            );
        }
    }
    let started = Instant::now();
    for (k, v) in &services {
        tables.services.upsert(k, v).unwrap();
    }
    for (k, v) in &backends {
        tables.backends.upsert(k, v).unwrap();
    }
    eprintln!(
        "filled {} service entries and {} backends in {:?}",
        services.len(),
        backends.len(),
        started.elapsed()
    );
    // The ipcache, an LPM trie, keeps batched reads: 200,000 pods' /32s, GKE's limit.
    for i in 0..200_000u32 {
        let key = IpcacheKey {
            prefixlen: 32,
            address: u32::from(Ipv4Addr::from(0x0c00_0000 + i)).to_be(),
        };
        tables
            .ipcache
            .upsert(&key, &IpcacheEntry::default())
            .unwrap();
    }
    for _ in 0..2 {
        let cpu = thread_cpu();
        let read = read_and_hash(&tables.ipcache, seed);
        eprintln!(
            "ipcache: batched reads of {read} entries in slices of {MIN_SLICE}, hashed here, \
             {:?} CPU",
            thread_cpu() - cpu
        );
    }

    let cpu = thread_cpu();
    let want = (user_digest(&services, seed), user_digest(&backends, seed));
    eprintln!(
        "desired content's digests, computed whole: {:?} CPU",
        thread_cpu() - cpu
    );

    for round in 0..3 {
        let cpu = thread_cpu();
        let got = (
            kernel_digest(&tables.services, seed),
            kernel_digest(&tables.backends, seed),
        );
        let kernel = thread_cpu() - cpu;
        assert_eq!(got, want);

        let cpu = thread_cpu();
        let read = read_and_hash(&tables.services, seed) + read_and_hash(&tables.backends, seed);
        let batched = thread_cpu() - cpu;
        eprintln!(
            "round {round}: in-kernel digest of both maps {kernel:?} CPU; batched reads of \
             {read} entries in slices of {MIN_SLICE}, hashed here, {batched:?} CPU"
        );
    }
}

/// Reads `map` whole in slices of [`MIN_SLICE`] with batched lookups and hashes each
/// entry here; returns how many it read.
fn read_and_hash<K: Pod, V: Pod>(map: &impl KernelMap<K, V>, seed: u64) -> usize {
    let (mut cursor, mut fold, mut read) = (Cursor::Start, Digest::default(), 0);
    loop {
        let next = map
            .read_from(cursor, MIN_SLICE, &mut |k, v| {
                read += 1;
                fold.add(pod_entry_hash(seed, k, v));
            })
            .unwrap();
        match next {
            Some(next) => cursor = next,
            None => return read,
        }
    }
}

/// A change made behind the realizer's back.
type Drift = dyn Fn(&mut KernelTables);

/// A small map is checked at every tick by a lookup of each desired key while its
/// footprint (the kernel memory it reports) has not moved since a digest found it right:
/// a forged, a removed and an added entry are each still found and repaired at the next
/// tick. Prints one tick's CPU time both ways: a digest walks every bucket of the maps'
/// capacities (a million for services and backends), the lookups only the keys.
#[test]
fn a_small_map_checked_by_its_keys_still_finds_every_drift_at_the_next_tick() {
    let (_pins, _datapath, mut tables) = load();
    assert!(
        sluice_datapath::digest::footprints_count_entries(),
        "this kernel's map footprints follow their entry counts (Linux 6.6 and later)"
    );
    let services: BTreeMap<_, _> = (0..100u32)
        .flat_map(|i| {
            [
                (
                    Lb4Key::new(vip(i), 80, IPPROTO_TCP, 0),
                    Lb4Service::frontend(1, SVC_FLAG_CLUSTER_IP),
                ),
                (
                    Lb4Key::new(vip(i), 80, IPPROTO_TCP, 1),
                    Lb4Service::slot(vip(10_000 + i), 8080),
                ),
            ]
        })
        .collect();
    let active = Lb4Backend {
        state: BACKEND_STATE_ACTIVE,
        pad: [0; 3],
    };
    let backends: BTreeMap<_, _> = (0..100u32)
        .map(|i| {
            (
                Lb4BackendKey::new(vip(10_000 + i), 8080, IPPROTO_TCP),
                active,
            )
        })
        .collect();
    let (endpoints, ipcache, source_ranges, policies, maglev) = (
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
    );
    let desired = Desired {
        services: &services,
        backends: &backends,
        endpoints: &endpoints,
        ipcache: &ipcache,
        source_ranges: &source_ranges,
        policies: &policies,
        policy_capacity: 1024,
        maglev: &maglev,
    };
    tables.realize(desired).unwrap();
    let mut scan = Scan::new(12);
    let tick = |tables: &mut KernelTables, scan: &mut Scan| {
        let started = thread_cpu();
        let tick = tables.check(scan, desired, 1).unwrap();
        (tick, thread_cpu() - started)
    };
    let (mut digested, mut looked_up) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        scan.restart();
        let (first, cpu) = tick(&mut tables, &mut scan);
        assert!(first.drifted.is_empty(), "{first:?}");
        digested.push(cpu);
        let (next, cpu) = tick(&mut tables, &mut scan);
        assert!(next.drifted.is_empty(), "{next:?}");
        looked_up.push(cpu);
    }
    eprintln!(
        "{} service and {} backend entries: one tick's check by digests {digested:?}, by \
         lookups {looked_up:?} (thread CPU time)",
        services.len(),
        backends.len()
    );

    let (&key, &value) = services.iter().nth(7).unwrap();
    let extra = Lb4Key::new(vip(5_000), 80, IPPROTO_TCP, 0);
    let drifts: [(&str, Box<Drift>); 3] = [
        (
            "forged",
            Box::new(move |t: &mut KernelTables| {
                t.services
                    .upsert(&key, &Lb4Service::slot(vip(9_999), 1))
                    .unwrap()
            }),
        ),
        (
            "removed",
            Box::new(move |t: &mut KernelTables| t.services.remove(&key).unwrap()),
        ),
        (
            "added",
            Box::new(move |t: &mut KernelTables| t.services.upsert(&extra, &value).unwrap()),
        ),
    ];
    for (what, drift) in drifts {
        // A clean tick first: it goes by the keys, as an idle agent's ticks do.
        let (clean, _) = tick(&mut tables, &mut scan);
        assert!(clean.drifted.is_empty(), "{what}: {clean:?}");
        let (clean, _) = tick(&mut tables, &mut scan);
        assert!(clean.drifted.is_empty(), "{what}: {clean:?}");
        drift(&mut tables);
        let (found, _) = tick(&mut tables, &mut scan);
        assert_eq!(found.drifted, vec![MapId::Services], "{what}");
        assert_eq!(found.repaired.len(), 1, "{what}: {:?}", found.repaired);
        assert_eq!(
            tables.services.read_all().unwrap(),
            services,
            "{what}: repaired"
        );
    }
}
