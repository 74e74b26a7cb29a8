//! The `sluice` command against a live lab: what a user types, through the real binary.

use std::process::Command;

use sluice_integration::{ONE_NODE_LAB, TestLab, examples};

fn sluice(lab: &TestLab, args: &[&str]) -> String {
    let bin = std::env::var_os("SLUICE_BIN").expect("SLUICE_BIN (scripts/test.sh sets it)");
    let out = Command::new(bin)
        .env("SLUICE_LAB_STATE", &lab.opts.state_root)
        .arg("--lab")
        .arg(&lab.name)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "sluice {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn json(lab: &TestLab, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    serde_json::from_str(&sluice(lab, &args)).unwrap()
}

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
    let applied = sluice(&lab, &apply);
    assert!(
        applied.contains("service/nginx-service created"),
        "{applied}"
    );

    let pods = json(&lab, &["lab", "get", "pods"]);
    assert_eq!(pods.as_array().unwrap().len(), 3);
    // The CLI changed the lab behind `lab.lab`'s back, so ask the CLI.
    let services = json(&lab, &["lab", "get", "services"]);
    let vip = services[0]["cluster_ip"].as_str().unwrap().to_string();
    let answer = sluice(
        &lab,
        &[
            "lab",
            "exec",
            "default/client",
            "--",
            "curl",
            "-s",
            "--max-time",
            "2",
            &format!("http://{vip}/"),
        ],
    );
    assert!(
        answer.starts_with("nginx-deployment-"),
        "curl through the VIP answered {answer:?}"
    );

    let services = json(&lab, &["service", "list"]);
    assert_eq!(services[0]["service"], "default/nginx-service");
    assert_eq!(services[0]["backends"].as_array().unwrap().len(), 2);
    let table = sluice(&lab, &["service", "list"]);
    assert!(
        table.contains(&format!("{vip}:80/TCP")) && table.contains("(active)"),
        "{table}"
    );

    let ct = json(&lab, &["ct", "list"]);
    assert!(
        ct.as_array()
            .unwrap()
            .iter()
            .any(|e| e["scope"] == "service" && e["destination"] == format!("{vip}:80"))
    );

    let status = json(&lab, &["status"]);
    assert_eq!(status["healthy"], true);
    assert_eq!(status["desired_generation"], status["realized_generation"]);
    assert!(
        status["maps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "lb4_services" && m["entries"] == 4)
    );

    assert!(sluice(&lab, &["verify"]).contains("every map matches"));
    let mut delete = vec!["lab", "delete"];
    delete.extend(args.iter().map(String::as_str));
    sluice(&lab, &delete);
    assert!(
        json(&lab, &["service", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}
