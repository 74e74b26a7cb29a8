//! The reconcile loop of a real agent process: it keeps repairing drift and still stops on
//! SIGTERM after its source has ended, and its API answers while a long pass runs (needs
//! root and bpffs; never skipped).

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

use sluice_api::Client;
use sluice_common::{IPPROTO_TCP, Lb4Key};
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
    // frontend, two slots, two backends), seconds of work in a debug build. Status itself
    // counts every map's entries, so it too grows with them: 10,000 keep it near 0.1 s.
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
