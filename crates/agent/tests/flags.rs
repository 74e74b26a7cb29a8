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
