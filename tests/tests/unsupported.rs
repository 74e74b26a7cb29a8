//! A Service field the datapath does not implement is reported, not silently half-programmed:
//! `sluice status` names each field with its value and what is programmed instead, the agent
//! logs it, and the part that is implemented (the ClusterIP frontend) works.

use std::{
    fs,
    net::SocketAddr,
    time::{Duration, Instant},
};

use sluice_integration::{ONE_NODE_LAB, TestLab, examples, http_get};

const STICKY: &str = "apiVersion: v1
kind: Service
metadata:
  name: sticky
spec:
  type: LoadBalancer
  loadBalancerIP: 192.0.2.80
  ipFamilyPolicy: RequireDualStack
  selector: {app: nginx}
  ports:
  - {port: 80, nodePort: 30080}
";

#[test]
fn a_load_balancer_ip_and_dual_stack_are_reported_and_the_cluster_ip_works() {
    let mut lab = TestLab::up("unsupported", ONE_NODE_LAB);
    lab.lab
        .apply(&[
            examples().join("nginx.yaml"),
            examples().join("client.yaml"),
        ])
        .unwrap_or_else(|e| panic!("apply nginx + client: {e}"));
    lab.apply_yaml("sticky.yaml", STICKY);

    // Sorted by their line, so by field within the Service.
    let status = lab.cli_json(&["status"]);
    let reported: Vec<(String, String, String)> = status["unsupported"]
        .as_array()
        .unwrap_or_else(|| panic!("no unsupported list in {status}"))
        .iter()
        .map(|u| {
            assert_eq!(u["kind"], "Service", "{u}");
            let object = format!(
                "{}/{}",
                u["namespace"].as_str().unwrap(),
                u["name"].as_str().unwrap()
            );
            let field = u["field"].as_str().unwrap().to_string();
            assert!(!u["programmed"].as_str().unwrap().is_empty(), "{u}");
            (object, field, u["value"].as_str().unwrap().to_string())
        })
        .collect();
    let expected = |field: &str, value: &str| {
        (
            "default/sticky".to_string(),
            field.to_string(),
            value.to_string(),
        )
    };
    assert_eq!(
        reported,
        [
            expected("spec.ipFamilyPolicy", "RequireDualStack"),
            expected("spec.loadBalancerIP", "192.0.2.80"),
        ],
        "{status}"
    );
    let table = lab.cli(&["status"]);
    assert!(
        table.contains("spec.ipFamilyPolicy") && table.contains("Service default/sticky"),
        "{table}"
    );

    // The agent logs each field once it compiles the Service; the log is written by another
    // process, so allow it a moment to reach the file.
    let log_path = lab.lab.agent_log(&lab.node());
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        let named = |field: &str| {
            log.lines().any(|l| {
                l.contains("not implemented")
                    && l.contains("service default/sticky")
                    && l.contains(field)
            })
        };
        if (named("spec.loadBalancerIP") && named("spec.ipFamilyPolicy"))
            || Instant::now() > deadline
        {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for field in ["spec.loadBalancerIP", "spec.ipFamilyPolicy"] {
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains("not implemented")
                && l.contains("service default/sticky")
                && l.contains(field)),
            "agent log does not name {field}:\n{log}"
        );
    }

    // What is implemented is programmed: the ClusterIP answers from the nginx pods.
    let vip = SocketAddr::from((lab.cluster_ip("sticky"), 80));
    let answer = lab.in_pod("default/client", move || http_get(vip));
    assert!(
        answer
            .as_deref()
            .is_ok_and(|a| a.starts_with("nginx-deployment-")),
        "request through the ClusterIP of a LoadBalancer service: {answer:?}"
    );
}
