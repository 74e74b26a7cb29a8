//! Pods with a fixed address (`status.podIP` or the `sluice.dev/pod-ip` annotation), as the
//! conformance cases with ipBlock rules need: honoured in the real lab, and a clash refused
//! by the CLI naming the pod and the field, with nothing changed.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use sluice_integration::{ONE_NODE_LAB, TestLab};

const FIXED: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 200);

fn pod(name: &str, ip: Option<Ipv4Addr>) -> String {
    let status = ip.map_or(String::new(), |ip| format!("status: {{podIP: {ip}}}\n"));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers: [{{name: c, image: agnhost}}]\n{status}"
    )
}

#[test]
fn a_fixed_pod_address_is_honoured_and_a_clash_refused_with_nothing_changed() {
    let mut lab = TestLab::up("fixedip", ONE_NODE_LAB);
    lab.apply_yaml(
        "fixed.yaml",
        &format!("{}---\n{}", pod("fixed", Some(FIXED)), pod("client", None)),
    );
    assert_eq!(lab.pod_ip("default/fixed"), FIXED);
    assert_ne!(lab.pod_ip("default/client"), FIXED);

    // A real connection reaches the pod at that address.
    let listener = lab.in_pod("default/fixed", || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 9000)).unwrap()
    });
    let peer = lab.in_pod("default/client", || {
        TcpStream::connect_timeout(&SocketAddr::from((FIXED, 9000)), Duration::from_secs(3))
            .map(|s| s.local_addr().unwrap().ip())
    });
    let (_, seen) = listener.accept().unwrap();
    assert_eq!(peer.unwrap(), seen.ip(), "the client reached {FIXED}");

    // A second pod asking for the same address: refused, the pod and field named.
    let before = lab.cli_json(&["lab", "get", "pods"]);
    let file = std::env::temp_dir().join(format!("sluice-fixedip-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        format!(
            "{}---\n{}",
            pod("clash", Some(FIXED)),
            pod("innocent", None)
        ),
    )
    .unwrap();
    let out = lab.cli_output(&["lab", "apply", "-f", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "Pod default/clash: status.podIP: 10.244.1.200 is the address of pod default/fixed"
        ),
        "{stderr}"
    );
    assert_eq!(
        lab.cli_json(&["lab", "get", "pods"]),
        before,
        "nothing applied"
    );
}
