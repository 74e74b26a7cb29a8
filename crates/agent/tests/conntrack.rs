//! Conntrack housekeeping of a real agent process on its real pinned `ct4`: the lifetimes
//! it configures, the garbage collector, and the purge of a removed backend's service
//! connections (needs root and bpffs; never skipped).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test: a failed step must fail the test loudly"
)]

mod support;

use std::{net::Ipv4Addr, time::Duration};

use nix::time::{ClockId, clock_gettime};
use sluice_common::{
    CT_EGRESS, CT_FLAG_CLOSING, CT_FLAG_SEEN_REPLY, CT_SERVICE, Ct4Entry, Ct4Key, CtConfig,
    IPPROTO_TCP, IPPROTO_UDP, MapId, addr_be,
};
use sluice_datapath::PinnedMaps;
use sluice_store::Snapshot;
use support::{Agent, snapshot, vip, write};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 9);
const NS_PER_SEC: u64 = 1_000_000_000;

/// The backends `support::snapshot` gives service 0 (port 8080).
fn backend(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + n)
}

fn now_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).unwrap();
    now.tv_sec() as u64 * NS_PER_SEC + now.tv_nsec() as u64
}

/// An entry last seen `age_s` seconds ago, translated to `nat` if any.
fn entry(age_s: u64, flags: u8, nat: Option<(Ipv4Addr, u16)>) -> Ct4Entry {
    let last_seen_ns = now_ns() - age_s * NS_PER_SEC;
    Ct4Entry {
        created_ns: last_seen_ns,
        last_seen_ns,
        packets: 1,
        nat_address: nat.map_or(0, |(a, _)| addr_be(a)),
        nat_port: nat.map_or(0, |(_, p)| p.to_be()),
        flags,
        ..Ct4Entry::default()
    }
}

fn present(maps: &PinnedMaps, key: &Ct4Key) -> bool {
    maps.conntrack.get(key, 0).is_ok()
}

#[test]
fn the_collector_removes_expired_entries_by_the_configured_lifetimes() {
    let mut agent = Agent::start_with(
        "ct-gc",
        &snapshot(1, 1),
        &[
            "--ct-gc-interval",
            "0.2",
            "--ct-timeout-syn",
            "5",
            "--ct-timeout-non-tcp",
            "30",
        ],
    );
    agent.wait_realized(1);
    let mut maps = PinnedMaps::open(agent.pins.path()).unwrap();
    let configured = CtConfig {
        tcp_syn_s: 5,
        non_tcp_s: 30,
        ..CtConfig::default()
    };
    assert_eq!(
        maps.ct_config.get(&0, 0).unwrap(),
        configured,
        "the flags reach the datapath's ct_config"
    );
    assert_eq!(agent.status().conntrack, Some(configured), "and status");

    let key =
        |port: u16, proto: u8| Ct4Key::new((CLIENT, port), (backend(0), 8080), proto, CT_EGRESS);
    let cases = [
        // (key, entry, expired)
        (key(1, IPPROTO_UDP), entry(31, 0, None), true),
        (key(2, IPPROTO_UDP), entry(10, 0, None), false),
        (key(3, IPPROTO_TCP), entry(6, 0, None), true),
        (
            key(4, IPPROTO_TCP),
            entry(600, CT_FLAG_SEEN_REPLY, None),
            false,
        ),
    ];
    for (key, entry, _) in &cases {
        maps.conntrack.insert(key, entry, 0).unwrap();
    }
    agent.wait("the collector to run", Duration::from_secs(10), |a| {
        a.log_text()
            .contains("conntrack GC removed expired entries")
    });
    for (key, _, expired) in &cases {
        assert_eq!(!present(&maps, key), *expired, "{key:?}");
    }
}

#[test]
fn a_removed_backend_loses_its_service_connections_at_once() {
    let mut agent = Agent::start("ct-purge", &snapshot(1, 1), "0.5");
    agent.wait_realized(1);
    let mut maps = PinnedMaps::open(agent.pins.path()).unwrap();
    let frontend = (vip(0), 80);
    let set = |maps: &mut PinnedMaps, key: Ct4Key, entry: Ct4Entry| {
        maps.conntrack.insert(key, entry, 0).unwrap();
        key
    };
    let mut keys = Vec::new();
    for n in [0, 1] {
        let port = 40000 + n as u16;
        // A client's connection through the frontend to backend n: its choice and its
        // translated tuple.
        keys.push((
            set(
                &mut maps,
                Ct4Key::new((CLIENT, port), frontend, IPPROTO_TCP, CT_SERVICE),
                entry(0, CT_FLAG_SEEN_REPLY, Some((backend(n), 8080))),
            ),
            n == 0,
        ));
        keys.push((
            set(
                &mut maps,
                Ct4Key::new((CLIENT, port), (backend(n), 8080), IPPROTO_TCP, CT_EGRESS),
                entry(0, CT_FLAG_SEEN_REPLY, Some(frontend)),
            ),
            n == 0,
        ));
    }
    // A direct connection to backend 0, not through the service: it stays.
    keys.push((
        set(
            &mut maps,
            Ct4Key::new((CLIENT, 41000), (backend(0), 8080), IPPROTO_TCP, CT_EGRESS),
            entry(0, CT_FLAG_SEEN_REPLY, None),
        ),
        false,
    ));

    // Backend 0 leaves the EndpointSlice.
    let mut objects = serde_json::to_value(snapshot(2, 1)).unwrap();
    objects["endpointSlices"][0]["endpoints"]
        .as_array_mut()
        .unwrap()
        .remove(0);
    let next: Snapshot = serde_json::from_value(objects).unwrap();
    write(&agent.cluster_file(), &next);
    agent.wait_realized(2);

    for (key, purged) in &keys {
        assert_eq!(!present(&maps, key), *purged, "{key:?}");
    }
    assert!(
        agent
            .log_text()
            .contains("purged the conntrack entries of removed backends"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn a_backend_removed_while_no_agent_ran_is_purged_at_start() {
    let mut agent = Agent::start("ct-restart", &snapshot(1, 1), "0.5");
    agent.wait_realized(1);
    let mut maps = PinnedMaps::open(agent.pins.path()).unwrap();
    let frontend = (vip(0), 80);
    let service = |n: u32| {
        Ct4Key::new(
            (CLIENT, 40000 + n as u16),
            frontend,
            IPPROTO_TCP,
            CT_SERVICE,
        )
    };
    for n in [0, 1] {
        let chose = entry(0, CT_FLAG_SEEN_REPLY, Some((backend(n), 8080)));
        maps.conntrack.insert(service(n), chose, 0).unwrap();
    }

    // Backend 0 leaves while the agent is down; the pinned datapath keeps running.
    agent.terminate(Duration::from_secs(10));
    let mut objects = serde_json::to_value(snapshot(2, 1)).unwrap();
    objects["endpointSlices"][0]["endpoints"]
        .as_array_mut()
        .unwrap()
        .remove(0);
    write(
        &agent.cluster_file(),
        &serde_json::from_value(objects).unwrap(),
    );
    agent.restart(&["--reconcile-interval", "0.5"]);
    agent.wait_realized(2);

    assert!(
        !present(&maps, &service(0)),
        "backend 0's connection purged"
    );
    assert!(present(&maps, &service(1)), "backend 1's connection kept");
}

#[test]
fn the_collector_walks_a_large_table() {
    const ENTRIES: u32 = 50_000;
    let mut agent = Agent::start_with(
        "ct-gc-large",
        &snapshot(1, 1),
        &["--ct-gc-interval", "1", "--ct-max-entries", "131072"],
    );
    agent.wait_realized(1);
    let mut maps = PinnedMaps::open(agent.pins.path()).unwrap();
    // Half of them idle past the UDP lifetime (60 s by default).
    for i in 0..ENTRIES {
        let client = Ipv4Addr::from(u32::from(CLIENT) + i / 60_000);
        let key = Ct4Key::new(
            (client, (i % 60_000) as u16 + 1),
            (backend(0), 8080),
            IPPROTO_UDP,
            CT_EGRESS,
        );
        let age = if i % 2 == 0 { 120 } else { 1 };
        maps.conntrack.insert(key, entry(age, 0, None), 0).unwrap();
    }
    // The runs so far, as the agent logged them (a run may have started mid-insert).
    let runs = |a: &Agent| -> Vec<String> {
        a.log_text()
            .lines()
            .filter(|l| l.contains("conntrack GC removed expired entries"))
            .map(str::to_owned)
            .collect()
    };
    let removed = |line: &str| -> u32 {
        let value = line.split("removed=").nth(1).unwrap_or_default();
        value
            .split(' ')
            .next()
            .unwrap_or_default()
            .parse()
            .unwrap_or(0)
    };
    agent.wait("the collector's runs", Duration::from_secs(30), |a| {
        runs(a).iter().map(|l| removed(l)).sum::<u32>() == ENTRIES / 2
    });
    for line in runs(&agent) {
        eprintln!("{ENTRIES} entries, half expired: {line}");
    }
    assert_eq!(
        maps.conntrack.keys().filter_map(Result::ok).count(),
        ENTRIES as usize / 2
    );
}

#[test]
fn under_pressure_closed_and_half_open_entries_go_first() {
    // A full-size table (65,536) filled past the default threshold (0.8).
    const CHURNED: u32 = 25_000;
    const ESTABLISHED: u32 = 30_000;
    let mut agent = Agent::start_with(
        "ct-pressure",
        &snapshot(1, 1),
        // Entries written here are not the datapath's, which its `created` counter would
        // announce: the regular run's count finds them.
        &["--ct-pressure-interval", "0.2", "--ct-gc-interval", "1"],
    );
    agent.wait_realized(1);
    let mut maps = PinnedMaps::open(agent.pins.path()).unwrap();
    let key = |i: u32, proto: u8| {
        let client = Ipv4Addr::from(u32::from(CLIENT) + i / 60_000);
        Ct4Key::new(
            (client, (i % 60_000) as u16 + 1),
            (backend(0), 8080),
            proto,
            CT_EGRESS,
        )
    };
    // The churn first: closed (FIN or RST seen) and half-open (no reply), idle 2 s, within
    // their lifetimes (10 s and 60 s); then the established connections and UDP flows,
    // whose inserts take the table past the threshold.
    let churned: Vec<_> = (0..CHURNED).map(|i| key(i, IPPROTO_TCP)).collect();
    for (n, k) in churned.iter().enumerate() {
        let flags = if n % 2 == 0 {
            CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING
        } else {
            0
        };
        maps.conntrack.insert(k, entry(2, flags, None), 0).unwrap();
    }
    let kept: Vec<_> = (CHURNED..CHURNED + ESTABLISHED)
        .map(|i| key(i, IPPROTO_TCP))
        .chain((0..1000).map(|i| key(i, IPPROTO_UDP)))
        .collect();
    for k in &kept {
        let flags = if k.proto == IPPROTO_TCP {
            CT_FLAG_SEEN_REPLY
        } else {
            0
        };
        maps.conntrack.insert(k, entry(5, flags, None), 0).unwrap();
    }
    agent.wait(
        "the collector under pressure",
        Duration::from_secs(30),
        |a| {
            a.status()
                .conntrack_pressure
                .is_some_and(|p| p.removed_under_pressure == u64::from(CHURNED))
        },
    );
    let started = std::time::Instant::now();
    let entries = maps.inventory.entries(MapId::Conntrack).unwrap();
    let counted = started.elapsed();
    let runs: Vec<_> = agent
        .log_text()
        .lines()
        .filter(|l| l.contains("conntrack under pressure"))
        .map(str::to_owned)
        .collect();
    println!(
        "{} of 65,536 entries, {CHURNED} closed or half-open: {runs:?}; counting the {entries} \
         left took {counted:?}",
        CHURNED as usize + kept.len()
    );
    assert!(churned.iter().all(|k| !present(&maps, k)));
    assert!(
        kept.iter().all(|k| present(&maps, k)),
        "established TCP and UDP entries stay"
    );
    assert_eq!(entries, kept.len() as u64);
}
