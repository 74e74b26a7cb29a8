//! CI test of the simulated cluster (needs root and bpffs; never skipped): the same
//! generator, agent and measurement path as `sluice-bench --cluster`, at a tiny size. It
//! checks that the agent realized the generated cluster and every change of the churn,
//! the node leaving and joining included; it asserts no timing.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_bench::cluster::{self, Change, ClusterConfig};

#[test]
fn a_tiny_simulated_cluster_is_realized_through_its_churn() {
    let config = ClusterConfig::tiny();
    let results = cluster::run(&config, &mut |line| eprintln!("{line}")).unwrap();
    let shape = config.shape;

    let fill = |name: &str| {
        results
            .maps
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no map {name}"))
            .entries
    };
    // Every pod's /32 (those on the agent's node have no veth, so they are addresses like
    // the others), every node's pod CIDR and address.
    assert!(
        fill("ipcache") >= (shape.pods + 2 * shape.nodes) as u64,
        "{:?}",
        results.maps
    );
    // Every endpoint is a backend; every Service a frontend.
    assert!(fill("lb4_backends") > 0 && fill("lb4_services") >= shape.services as u64);
    // Hash maps are charged for their capacity, LPM tries for their entries.
    assert!(
        results.maps.iter().all(|m| m.memlock > 0 || m.entries == 0),
        "{:?}",
        results.maps
    );

    assert!(results.churn_events > 0);
    assert!(
        results.missed.is_empty(),
        "changes never realized: {:?}",
        results.missed
    );
    for change in [
        Change::PodAdded,
        Change::PodDeleted,
        Change::ServiceRolled,
        Change::NodeLeft,
        Change::NodeJoined,
    ] {
        assert!(
            results
                .latencies
                .get(&change)
                .is_some_and(|l| !l.is_empty()),
            "{change:?} was never measured: {:?}",
            results.latencies
        );
    }
    assert!(results.traffic_start.values().any(|t| t.list_pages > 0));
    assert!(results.traffic_churn.values().any(|t| t.watch_events > 0));

    let report = cluster::report::render(&results, &config, "test");
    eprintln!("{report}");
    assert!(report.contains("Watch event to realized maps"));
}
