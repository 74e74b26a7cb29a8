//! The probe matrix says why a cell is denied: a policy drop (from the datapath's own
//! events), a closed port, an SCTP port on a kernel without SCTP sockets, and a world host
//! probing a ClusterIP each get their own mark; a cell that cannot run fails the matrix
//! only with --strict.

use sluice_integration::TestLab;

const LAB: &str = "apiVersion: sluice.dev/v1alpha1
kind: Lab
serviceCIDR: 10.96.0.0/16
txChecksumOffload: false
nodes:
  - name: node-1
    podCIDR: 10.244.1.0/24
world:
  - name: internet
    address: 203.0.113.10
    ports: [{port: 80, protocol: TCP}]
";

/// Pods a, b, c, each serving 80/TCP behind a Service of its own with ports 80 and 81
/// (81 reaches no listener); b admits only app=a.
fn objects() -> String {
    let mut yaml = String::new();
    for name in ["a", "b", "c"] {
        yaml += &format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {name}}}}}
spec:
  containers:
  - name: c
    image: agnhost
    ports: [{{containerPort: 80, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: {name}}}
  ports:
  - {{name: open, port: 80, targetPort: 80, protocol: TCP}}
  - {{name: closed, port: 81, targetPort: 81, protocol: TCP}}
---
"
        );
    }
    yaml + "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: a}}
"
}

#[test]
fn the_matrix_tells_policy_drops_refusals_unrunnable_and_unrouted_cells_apart() {
    let mut lab = TestLab::up("outcomes", LAB);
    lab.apply_yaml("objects.yaml", &objects());
    let args = [
        "lab",
        "probe",
        "--via",
        "service",
        "--world",
        "--port",
        "80",
        "--port",
        "81",
        "--protocol",
        "TCP",
        "--protocol",
        "SCTP",
    ];
    let out = lab.cli_output(&args);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let json = lab.cli_json(&args);
    let kind = |from: &str, to: &str, port: u64, protocol: &str| -> String {
        json["probes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["from"] == from && p["to"] == to && p["port"] == port && p["protocol"] == protocol)
            .unwrap_or_else(|| panic!("{from} -> {to} {port}/{protocol} in {json}"))["outcome"]["kind"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(kind("default/a", "default/b", 80, "TCP"), "allowed");
    assert_eq!(
        kind("default/c", "default/b", 80, "TCP"),
        "denied-by-policy"
    );
    assert_eq!(kind("default/a", "default/c", 81, "TCP"), "refused");
    assert_eq!(kind("default/a", "default/b", 80, "SCTP"), "not-runnable");
    assert_eq!(kind("world/internet", "default/a", 80, "TCP"), "not-routed");
    let denied = json["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["from"] == "default/c"
                && p["to"] == "default/b"
                && p["port"] == 80
                && p["protocol"] == "TCP"
        })
        .unwrap();
    assert_eq!(denied["outcome"]["direction"], "ingress", "{denied}");
    assert_eq!(denied["outcome"]["endpoint"], "default/b", "{denied}");

    // Four different marks in the table, and the legend.
    for mark in ["X", "R", "-", "N"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("default/") || l.starts_with("world/"))
                && table.contains(&format!(" {mark}")),
            "mark {mark} in\n{table}"
        );
    }
    assert!(
        table.contains("X denied by policy") && table.contains("not runnable"),
        "{table}"
    );

    // --strict: the unrunnable SCTP cells fail the matrix.
    let mut strict = args.to_vec();
    strict.push("--strict");
    let out = lab.cli_output(&strict);
    assert_ne!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A single probe names the policy and the pod whose policy dropped it.
    let out = lab.cli_output(&[
        "lab",
        "probe",
        "--from",
        "default/c",
        "--to",
        "default/b",
        "--port",
        "80",
    ]);
    let line = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{line}");
    assert!(
        line.contains("denied by policy (ingress of default/b)"),
        "{line}"
    );
}
