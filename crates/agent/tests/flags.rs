//! Load-balancing flags are checked before the agent touches anything: a Maglev table size
//! that is not prime, or an unknown algorithm, is refused with the flag named.

use std::process::Command;

/// Runs the agent with `args` after the required flags; it must exit with an error.
/// The paths do not exist: flags are checked before any of them is used.
fn refused(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice-agent"))
        .args([
            "--node",
            "node-a",
            "--cluster-file",
            "/nonexistent/cluster.json",
            "--pin-dir",
            "/nonexistent/pins",
        ])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running sluice-agent: {e}"));
    assert!(!output.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_maglev_table_size_must_be_prime() {
    let err = refused(&["--maglev-table-size", "16384"]);
    assert!(
        err.contains("--maglev-table-size") && err.contains("16384 is not prime"),
        "{err}"
    );
    let err = refused(&["--maglev-table-size", "131071"]);
    assert!(
        err.contains("--maglev-table-size") && err.contains("out of range"),
        "{err}"
    );
}

#[test]
fn the_lb_algorithm_is_random_or_maglev() {
    let err = refused(&["--lb-algorithm", "round-robin"]);
    assert!(
        err.contains("--lb-algorithm") && err.contains("random or maglev"),
        "{err}"
    );
}

/// The agent with `args` alone (no --cluster-file given); it must exit with an error.
fn refused_without_cluster_file(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice-agent"))
        .args(["--node", "node-a", "--pin-dir", "/nonexistent/pins"])
        .args(args)
        .env_remove("SLUICE_SOURCE")
        .env_remove("SLUICE_CLUSTER_FILE")
        .env_remove("SLUICE_KUBECONFIG")
        .env_remove("SLUICE_CLUSTER_CIDR")
        .output()
        .unwrap_or_else(|e| panic!("running sluice-agent: {e}"));
    assert!(!output.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn each_source_takes_only_its_own_flags() {
    let err = refused_without_cluster_file(&[]);
    assert!(
        err.contains("--cluster-file is required with --source cluster-file"),
        "{err}"
    );
    let err = refused(&["--kubeconfig", "/nonexistent/kubeconfig"]);
    assert!(err.contains("apply to --source kubernetes only"), "{err}");
    let err = refused(&["--source", "kubernetes"]);
    assert!(
        err.contains("--cluster-file applies to --source cluster-file only"),
        "{err}"
    );
    let err = refused_without_cluster_file(&["--source", "etcd"]);
    assert!(
        err.contains("--source") && err.contains("kubernetes"),
        "{err}"
    );
    let err = refused_without_cluster_file(&[
        "--source",
        "kubernetes",
        "--cluster-cidr",
        "10.244.0.0/33",
    ]);
    assert!(err.contains("--cluster-cidr"), "{err}");
}
