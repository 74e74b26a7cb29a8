//! The reconcile loop of a real agent process: it keeps repairing drift and still stops on
//! SIGTERM after its source has ended, its API answers while a long pass runs, and its
//! periodic check finds drift in a large map (needs root and bpffs; never skipped).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test: a failed step must fail the test loudly"
)]

mod support;

use std::{
    fs,
    time::{Duration, Instant},
};

use aya::maps::lpm_trie::Key;
use sluice_api::{Client, CountedBy};
use sluice_common::{IPPROTO_TCP, IpcacheEntry, Lb4Key, Lb4Service, addr_be, names};
use sluice_datapath::PinnedMaps;
use support::{Agent, snapshot, vip, write};

#[test]
fn keeps_reconciling_and_stops_on_sigterm_after_its_source_ends() {
    let mut agent = Agent::start("source-ends", &snapshot(1, 1), "0.5");
    agent.wait_realized(1);
    let frontend = Lb4Key::new(vip(0), 80, IPPROTO_TCP, 0);
    let mut maps = PinnedMaps::open(agent.pins.path()).expect("open the agent's pinned maps");
    assert!(
        maps.services.get(&frontend, 0).is_ok(),
        "frontend programmed"
    );

    // Removing the cluster file's directory ends the source: nothing can replace the file.
    fs::remove_dir_all(&agent.source_dir).expect("remove the source directory");
    agent.wait("the source to end", Duration::from_secs(10), |a| {
        a.log_text().contains("source ended")
    });
    let reconciles = agent.status().reconciles;

    // Drift behind the agent's back: only the periodic pass can repair it now.
    maps.services
        .remove(&frontend)
        .expect("remove the frontend");
    let removed = Instant::now();
    agent.wait(
        "the periodic pass to restore the frontend",
        Duration::from_secs(10),
        |_| maps.services.get(&frontend, 0).is_ok(),
    );
    eprintln!(
        "frontend removed after the source ended: repaired in {:?} (interval 0.5 s)",
        removed.elapsed()
    );
    // The pass counts itself once it has finished, after its writes: wait for the count.
    agent.wait(
        "the repairing pass to be counted",
        Duration::from_secs(10),
        |a| a.status().reconciles > reconciles,
    );
    let status = agent.status();
    assert!(status.healthy, "{status:?}");

    let exit = agent.terminate(Duration::from_secs(10));
    assert!(exit.success(), "{exit}\n{}", agent.log_text());
    assert!(!agent.socket.exists(), "the agent removed its socket");
}

#[test]
fn status_answers_while_a_long_pass_runs() {
    const SERVICES: u32 = 10_000;
    let mut agent = Agent::start("busy", &snapshot(1, 1), "2");
    agent.wait_realized(1);

    // Thousands of services: one pass compiles them and writes five map entries each (a
    // frontend, two slots, two backends), seconds of work in a debug build. Status reports
    // the realized maps' sizes the loop last counted, so it does not grow with them.
    write(&agent.cluster_file(), &snapshot(2, SERVICES));
    let written = Instant::now();
    let client = Client::new(&agent.socket);
    let mut during_pass = Vec::new();
    let mut slowest = Duration::ZERO;
    loop {
        let asked = Instant::now();
        let status = client
            .status()
            .unwrap_or_else(|e| panic!("status: {e}\n{}", agent.log_text()));
        let took = asked.elapsed();
        slowest = slowest.max(took);
        if status.realized_revision >= 2 {
            break;
        }
        if status.desired_revision == 2 {
            during_pass.push(took);
        }
        assert!(
            written.elapsed() < Duration::from_secs(300),
            "{SERVICES} services not realized within 300 s\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "{SERVICES} services realized {:?} after the write; status answered {} times during \
         the pass, slowest {:?}",
        written.elapsed(),
        during_pass.len(),
        slowest
    );
    assert!(
        during_pass.len() >= 3,
        "status answered only {} times while the pass ran",
        during_pass.len()
    );
    assert!(
        slowest < Duration::from_secs(1),
        "status took {slowest:?} while a pass ran"
    );
    let frontend = Lb4Key::new(vip(SERVICES - 1), 80, IPPROTO_TCP, 0);
    let maps = PinnedMaps::open(agent.pins.path()).expect("open the agent's pinned maps");
    assert!(
        maps.services.get(&frontend, 0).is_ok(),
        "last frontend programmed"
    );
}

/// The periodic check reads the maps a slice per tick rather than whole, yet a forged, a
/// missing and an extra entry in a services map of more than 10,000 entries are each found
/// and repaired within the bound: two sweeps of 24 s and one full pass (60 s in all). So is
/// an extra prefix in the ipcache, an LPM trie.
#[test]
fn drift_in_a_large_map_is_found_and_repaired_by_the_rolling_check() {
    const SERVICES: u32 = 10_000;
    const BOUND: Duration = Duration::from_secs(60);
    let mut agent = Agent::start("drift10k", &snapshot(1, SERVICES), "2");
    agent.wait_realized(1);
    let mut maps = PinnedMaps::open(agent.pins.path()).expect("open the agent's pinned maps");
    let entries = maps.services.keys().count();
    assert!(entries >= 10_000, "services map holds {entries} entries");

    let forged = Lb4Key::new(vip(1_234), 80, IPPROTO_TCP, 1);
    let desired = maps.services.get(&forged, 0).expect("slot 1 of svc-1234");
    let bogus = Lb4Service::slot("10.250.0.1".parse().unwrap(), 9);
    maps.services
        .insert(forged, bogus, 0)
        .expect("forge slot 1");
    let started = Instant::now();
    agent.wait("the forged slot to be restored", BOUND, |_| {
        maps.services.get(&forged, 0).ok() == Some(desired)
    });
    let forged_took = started.elapsed();

    let missing = Lb4Key::new(vip(4_321), 80, IPPROTO_TCP, 0);
    maps.services.remove(&missing).expect("remove a frontend");
    let started = Instant::now();
    agent.wait("the removed frontend to be restored", BOUND, |_| {
        maps.services.get(&missing, 0).is_ok()
    });
    let missing_took = started.elapsed();

    let extra = Lb4Key::new(vip(SERVICES + 7), 80, IPPROTO_TCP, 0);
    let frontend = Lb4Service::frontend(2, sluice_common::SVC_FLAG_CLUSTER_IP);
    maps.services
        .insert(extra, frontend, 0)
        .expect("add a frontend");
    let started = Instant::now();
    agent.wait("the extra frontend to be removed", BOUND, |_| {
        maps.services.get(&extra, 0).is_err()
    });
    let extra_took = started.elapsed();

    // An LPM trie is read by the kernel's generic batch: an extra prefix goes too.
    let prefix = Key::new(16, addr_be("10.250.0.0".parse().unwrap()));
    maps.ipcache
        .insert(&prefix, IpcacheEntry::default(), 0)
        .expect("add an ipcache prefix");
    let started = Instant::now();
    // A lookup matches the longest prefix (the world's /0 too): look for the key itself.
    agent.wait("the extra ipcache prefix to be removed", BOUND, |_| {
        !maps.ipcache.keys().any(|k| {
            k.is_ok_and(|k| k.prefix_len() == prefix.prefix_len() && k.data() == prefix.data())
        })
    });
    let prefix_took = started.elapsed();

    eprintln!(
        "{entries} service entries, interval 2 s: forged slot repaired in {forged_took:?}, \
         missing frontend in {missing_took:?}, extra frontend in {extra_took:?}, extra \
         ipcache prefix in {prefix_took:?}"
    );
    let log = agent.log_text();
    assert_eq!(
        log.matches("drift found by the periodic check").count(),
        4,
        "one repair per drift:\n{log}"
    );
    let status = agent.status();
    assert!(status.healthy, "{status:?}");
}

/// `status` reports the realized maps' sizes as the loop last established them, first from
/// the pass that wrote them, then from each sweep of the periodic check that read them, so
/// no call walks a map of tens of thousands of entries; the counts are the kernel's, and
/// say how and when they were taken. The runtime maps (conntrack) are counted per call.
#[test]
fn status_reports_map_sizes_the_loop_counted_without_walking_them() {
    const SERVICES: u32 = 10_000;
    let mut agent = Agent::start("counted", &snapshot(1, SERVICES), "2");
    agent.wait_realized(1);
    let maps = PinnedMaps::open(agent.pins.path()).expect("open the agent's pinned maps");
    let in_kernel = maps.services.keys().count() as u64;
    let client = Client::new(&agent.socket);
    let services = |status: &sluice_api::AgentStatus| {
        status
            .maps
            .iter()
            .find(|m| m.name == names::SERVICES)
            .cloned()
            .expect("status reports the services map")
    };
    let counted = services(&client.status().expect("status"));
    assert_eq!(counted.entries, in_kernel, "{counted:?}");
    assert!(
        matches!(counted.counted_by, CountedBy::Pass | CountedBy::Sweep),
        "{counted:?}"
    );

    // 40,000 entries: a sweep of three ticks, 6 s at the 2 s interval.
    let started = Instant::now();
    agent.wait(
        "a sweep to count the services map",
        Duration::from_secs(60),
        |_| services(&client.status().expect("status")).counted_by == CountedBy::Sweep,
    );
    let swept = started.elapsed();
    let mut slowest = Duration::ZERO;
    let mut status = None;
    for _ in 0..5 {
        let asked = Instant::now();
        status = Some(client.status().expect("status"));
        slowest = slowest.max(asked.elapsed());
    }
    let status = status.expect("five answers");
    let counted = services(&status);
    assert_eq!(counted.entries, in_kernel, "{counted:?}");
    let conntrack = status
        .maps
        .iter()
        .find(|m| m.name == names::CONNTRACK)
        .expect("status reports conntrack");
    assert_eq!(conntrack.counted_by, CountedBy::Now, "{conntrack:?}");
    eprintln!(
        "{in_kernel} service entries: counted by a sweep {swept:?} after the first look \
         ({:.1} s before the answer); status slowest of 5: {slowest:?}",
        counted.counted_ago_s
    );
}
