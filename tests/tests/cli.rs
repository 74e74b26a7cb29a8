//! The `sluice` command against a live lab: what a user types, through the real binary.

use sluice_integration::{ONE_NODE_LAB, TestLab, examples};

#[test]
fn the_cli_inspects_the_agent_and_drives_the_lab() {
    let lab = TestLab::up("cli", ONE_NODE_LAB);
    let files = [
        examples().join("nginx.yaml"),
        examples().join("client.yaml"),
    ];
    let args: Vec<String> = files
        .iter()
        .flat_map(|f| ["-f".to_string(), f.display().to_string()])
        .collect();
    let mut apply = vec!["lab", "apply"];
    apply.extend(args.iter().map(String::as_str));
    let applied = lab.cli(&apply);
    assert!(
        applied.contains("service/nginx-service created"),
        "{applied}"
    );

    let pods = lab.cli_json(&["lab", "get", "pods"]);
    assert_eq!(pods.as_array().unwrap().len(), 3);
    // The CLI changed the lab behind `lab.lab`'s back, so ask the CLI.
    let services = lab.cli_json(&["lab", "get", "services"]);
    let vip = services[0]["cluster_ip"].as_str().unwrap().to_string();
    let answer = lab.cli(&[
        "lab",
        "exec",
        "default/client",
        "--",
        "curl",
        "-s",
        "--max-time",
        "2",
        &format!("http://{vip}/"),
    ]);
    assert!(
        answer.starts_with("nginx-deployment-"),
        "curl through the VIP answered {answer:?}"
    );

    let services = lab.cli_json(&["service", "list"]);
    assert_eq!(services[0]["service"], "default/nginx-service");
    assert_eq!(services[0]["backends"].as_array().unwrap().len(), 2);
    let table = lab.cli(&["service", "list"]);
    assert!(
        table.contains(&format!("{vip}:80/TCP")) && table.contains("(active)"),
        "{table}"
    );

    // `lab exec` runs curl in the pod's cgroup: socket LB sent its connection straight to
    // the backend that answered, with no service entry. curl's connection closed cleanly,
    // so its entries are gone already (README, Conntrack); its flows show the path.
    let ct = lab.cli_json(&["ct", "list"]);
    let ip_of = |name: &str| {
        pods.as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["ip"].as_str())
            .unwrap()
            .to_owned()
    };
    let (backend, client) = (ip_of(answer.trim()), ip_of("client"));
    let entries = ct.as_array().unwrap();
    assert!(!entries.iter().any(|e| e["scope"] == "service"), "{ct}");
    // The agent drains the flow events every 100 ms.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let flows = lab.cli(&["observe", "--last", "100", "-o", "json"]);
        let straight = flows
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|line| line["flow"].clone())
            .any(|f| {
                f["IP"]["source"] == client.as_str()
                    && f["IP"]["destination"] == backend.as_str()
                    && f["l4"]["TCP"]["destination_port"] == 80
                    && f.get("destination_service").is_none()
            });
        if straight {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no flow from {client} straight to {backend}:80:\n{flows}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // curl's connection is closed: its entries have the closing lifetime (10 s) left at most.
    for e in ct.as_array().unwrap() {
        let closing = e["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "closing");
        if e["protocol"] == "TCP" && closing {
            assert!(e["expires_seconds"].as_u64().unwrap() <= 10, "{e}");
        }
    }
    assert!(lab.cli(&["ct", "list"]).contains("EXPIRES"));

    let status = lab.cli_json(&["status"]);
    assert_eq!(status["healthy"], true);
    assert_eq!(status["desired_generation"], status["realized_generation"]);
    assert_eq!(status["conntrack"]["tcp_established_s"], 21_600);
    assert!(lab.cli(&["status"]).contains("established 21600s"));
    assert!(
        status["maps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "lb4_services" && m["entries"] == 4)
    );

    assert!(lab.cli(&["verify"]).contains("every map matches"));
    let mut delete = vec!["lab", "delete"];
    delete.extend(args.iter().map(String::as_str));
    lab.cli(&delete);
    assert!(
        lab.cli_json(&["service", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}
