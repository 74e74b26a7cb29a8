//! Issue 16, items 2 and 7 through the real `sluice` binary against a live lab: `lab apply`
//! from stdin and directories, `--dry-run` changing nothing, `delete --ignore-not-found`,
//! `lab get -l/-n/-A/-o wide`; `observe --last` in time order, `--until`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failed step must fail the test loudly"
)]

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;
use sluice_integration::{
    ONE_NODE_LAB, TestLab,
    cli::{RemoveDir, WEB_AND_CLIENT},
    examples,
};

/// Every map the realizer writes (the desired state; not the runtime state traffic
/// changes: conntrack, counters, the event bucket), as bpftool dumps it from the node's
/// pins, and the store's files.
fn maps_and_store(lab: &TestLab) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let pins = lab.lab.pin_dir(&lab.node());
    for def in sluice_common::registry::realized() {
        let path = pins.join(def.name);
        if !path.exists() {
            continue;
        }
        let dump = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            dump.status.success(),
            "bpftool map dump {}: {dump:?}",
            path.display()
        );
        out.insert(
            def.name.to_string(),
            String::from_utf8_lossy(&dump.stdout).to_string(),
        );
    }
    assert!(out.len() > 5, "the node's maps: {:?}", out.keys());
    for file in [lab.lab.cluster_file(), state_file(lab)] {
        out.insert(
            file.display().to_string(),
            fs::read_to_string(&file).unwrap(),
        );
    }
    out
}

fn state_file(lab: &TestLab) -> PathBuf {
    lab.opts.state_root.join(&lab.name).join("lab.json")
}

fn json(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn apply_reads_stdin_and_directories_dry_runs_change_nothing_and_delete_names_what_is_missing() {
    let lab = TestLab::up("cliapply", ONE_NODE_LAB);
    let dir = std::env::temp_dir().join(format!("sluice-cliapply-{}", lab.name));
    fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDir(dir.clone());
    let nginx = fs::read_to_string(examples().join("nginx.yaml")).unwrap();
    fs::write(dir.join("nginx.yaml"), &nginx).unwrap();
    fs::copy(examples().join("client.yaml"), dir.join("client.yml")).unwrap();
    fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
    let d = dir.display().to_string();

    // A directory: every *.yaml / *.yml / *.json in it, nothing else.
    let report = lab.cli_json(&["lab", "apply", "-f", &d]);
    eprintln!("apply -f DIR: {report}");
    let changes = report["changes"].as_array().unwrap();
    let of = |kind: &str, action: &str| {
        changes
            .iter()
            .filter(|c| c["kind"] == kind && c["action"] == action)
            .count()
    };
    assert_eq!(
        (of("Deployment", "created"), of("Service", "created")),
        (1, 1)
    );
    assert_eq!(
        of("Pod", "created"),
        3,
        "client and the two replicas: {report}"
    );
    assert!(report["generation"].as_u64().unwrap() > 1);
    let agents = report["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["node"], "node-1");
    eprintln!(
        "realized in {} ms, on node-1 after {} ms",
        report["realized_ms"], agents[0]["realized_ms"]
    );

    // A dry run from stdin: what would change, and nothing changes.
    let scaled = nginx.replace("replicas: 2", "replicas: 3");
    let before = maps_and_store(&lab);
    let out = lab.cli_stdin(
        &["lab", "apply", "--dry-run", "-f", "-", "-o", "json"],
        &scaled,
    );
    let dry = json(&out);
    eprintln!("dry run: {dry}");
    assert_eq!(dry["dry_run"], true);
    let configured: Vec<&Value> = dry["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] == "configured")
        .collect();
    assert_eq!(configured.len(), 1, "{dry}");
    assert_eq!(configured[0]["name"], "nginx-deployment");
    assert_eq!(
        configured[0]["fields"],
        serde_json::json!(["spec.replicas"])
    );
    assert!(
        dry["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["kind"] == "Pod"
                && c["action"] == "created"
                && c["owner"] == "Deployment default/nginx-deployment"),
        "{dry}"
    );
    let table = lab.cli_stdin(&["lab", "apply", "--dry-run", "-f", "-"], &scaled);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("deployment.apps/nginx-deployment configured (dry run): spec.replicas"),
        "{table}"
    );
    let after = maps_and_store(&lab);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (name, dump) in &before {
        assert_eq!(Some(dump), after.get(name), "{name} changed by a dry run");
    }
    eprintln!(
        "dry run compared {} maps and files: unchanged",
        before.len()
    );
    // The CLI changes the lab behind `lab.lab`'s back: ask the CLI.
    let nginx_pods = lab.cli_json(&["lab", "get", "pods", "-l", "app=nginx"]);
    assert_eq!(nginx_pods.as_array().unwrap().len(), 2);

    // For real, from stdin.
    let out = lab.cli_stdin(&["lab", "apply", "-f", "-", "-o", "json"], &scaled);
    let real = json(&out);
    assert_eq!(real["dry_run"], false);
    let pods = lab.cli_json(&["lab", "get", "pods", "-l", "app=nginx"]);
    assert_eq!(pods.as_array().unwrap().len(), 3, "{pods}");

    // -n / -A / -l / -o wide.
    assert_eq!(
        lab.cli_json(&["lab", "get", "pods", "-n", "kube-system"]),
        serde_json::json!([])
    );
    assert_eq!(
        lab.cli_json(&["lab", "get", "pods", "-l", "app!=nginx"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let wide = lab.cli(&["lab", "get", "pods", "-A", "-o", "wide"]);
    assert!(
        wide.starts_with("NAMESPACE") && wide.contains("IDENTITY") && wide.contains("node-1"),
        "{wide}"
    );
    let identities: Vec<u64> = lab
        .cli_json(&["lab", "get", "pods"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["identity"].as_u64().expect("every pod's identity"))
        .collect();
    assert_eq!(identities.len(), 4);

    // Delete: what is missing is an error naming it, unless --ignore-not-found.
    let client = dir.join("client.yml").display().to_string();
    let dry = lab.cli_json(&["lab", "delete", "--dry-run", "-f", &client]);
    assert_eq!(
        (&dry["dry_run"], &dry["changes"][0]["action"]),
        (&Value::Bool(true), &Value::from("deleted"))
    );
    let clients = lab.cli_json(&["lab", "get", "pods", "-l", "app=client"]);
    assert_eq!(clients.as_array().unwrap().len(), 1, "a dry run deleted it");
    lab.cli(&["lab", "delete", "-f", &client]);
    let again = lab.cli_output(&["lab", "delete", "-f", &client]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(
        stderr.contains("Pod default/client") && stderr.contains("not found"),
        "{stderr}"
    );
    let ignored = lab.cli_output(&["lab", "delete", "-f", &client, "--ignore-not-found"]);
    assert!(ignored.status.success(), "{ignored:?}");
    let out = lab.cli_stdin(&["lab", "delete", "-f", "-", "-o", "json"], &scaled);
    let deleted = json(&out);
    assert!(
        deleted["changes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["action"] == "deleted"),
        "{deleted}"
    );
}

#[test]
fn observe_last_is_in_time_order_and_until_bounds_it() {
    let mut lab = TestLab::up("cliobs", ONE_NODE_LAB);
    lab.apply_yaml("app.yaml", WEB_AND_CLIENT);
    // Flows: several connections, allowed and refused.
    for port in [80, 81, 80, 81, 80] {
        lab.cli_output(&[
            "lab",
            "probe",
            "--from",
            "default/client",
            "--to",
            "default/web",
            "--port",
            &port.to_string(),
        ]);
    }
    // The agent's reader drains the ring every 100 ms: wait (bounded) for the 20 flows of
    // the five connections (SYN both ways, two closes).
    let deadline = Instant::now() + Duration::from_secs(10);
    let times = loop {
        let out = lab.cli_output(&["observe", "--last", "50", "-o", "json", "--protocol", "tcp"]);
        assert!(out.status.success(), "{out:?}");
        let times: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["time"].as_str().unwrap().to_string()
            })
            .collect();
        if times.len() >= 20 || Instant::now() > deadline {
            break times;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "{} flows:\n{}",
        times.len(),
        lab.cli(&["observe", "--last", "50"])
    );
    assert!(times.len() >= 20, "{times:?}");
    // RFC 3339 in UTC with nanoseconds: text order is time order.
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let last3 = lab.cli_output(&["observe", "--last", "3", "-o", "json"]);
    let last3: Vec<&str> = std::str::from_utf8(&last3.stdout)
        .unwrap()
        .lines()
        .collect();
    assert_eq!(last3.len(), 3);

    // --until the third flow's time: the flows up to it, in order.
    let until = &times[2];
    let out = lab.cli_output(&["observe", "--since", "1h", "--until", until, "-o", "json"]);
    let bounded: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["time"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        bounded.len() >= 3 && bounded.iter().all(|t| t <= until),
        "{bounded:?}"
    );
    assert!(bounded.windows(2).all(|w| w[0] <= w[1]));
    let follow_until = lab.cli_output(&["observe", "-f", "--until", "5m"]);
    assert_eq!(follow_until.status.code(), Some(2));
}

/// `sluice --lab <lab> <args>` run by `script`, on a terminal of its own: what the terminal
/// showed (stdout and stderr), and the time it took.
fn on_terminal(lab: &TestLab, args: &str, env: &[(&str, &str)]) -> (String, Duration) {
    let sluice = lab.cli_command(&[]);
    let command = format!(
        "{} --lab {} {args}",
        sluice.get_program().to_string_lossy(),
        lab.name
    );
    let started = Instant::now();
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("SLUICE_LAB_STATE", &lab.opts.state_root)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{command}: {text}");
    (text, elapsed)
}

fn many(name: &str, replicas: usize) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers: [{{name: web, image: nginx, ports: [{{containerPort: 80}}]}}]
"
    )
}

#[test]
fn a_terminal_gets_a_pod_count_and_colour_unless_no_color() {
    let lab = TestLab::up("clitty", ONE_NODE_LAB);
    let dir = std::env::temp_dir().join(format!("sluice-clitty-{}", lab.name));
    fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDir(dir.clone());
    let (tty_file, plain_file) = (dir.join("tty.yaml"), dir.join("plain.yaml"));
    fs::write(&tty_file, many("tty", 40)).unwrap();
    fs::write(&plain_file, many("plain", 40)).unwrap();

    // On a terminal the pods start in batches, counted on a bar.
    let (shown, on_tty) = on_terminal(&lab, &format!("lab apply -f {}", tty_file.display()), &[]);
    assert!(shown.contains("/40 pods"), "{shown}");
    assert!(shown.contains("deployment.apps/tty created"), "{shown}");
    // Off a terminal all at once, and nothing but the report.
    let started = Instant::now();
    let plain = lab.cli(&["lab", "apply", "-f", &plain_file.display().to_string()]);
    let off_tty = started.elapsed();
    assert!(
        !plain.contains("pods") && !plain.contains('\u{1b}'),
        "{plain}"
    );
    eprintln!(
        "40 pods: {:.0} ms on a terminal (batches of 16, a bar), {:.0} ms off one (all at once)",
        on_tty.as_secs_f64() * 1000.0,
        off_tty.as_secs_f64() * 1000.0
    );
    for app in ["tty", "plain"] {
        let pods = lab.cli_json(&["lab", "get", "pods", "-l", &format!("app={app}")]);
        let pods = pods.as_array().unwrap();
        assert_eq!(pods.len(), 40);
        assert!(
            pods.iter()
                .all(|p| p["ready"] == true && p["status"] == "Running")
        );
    }

    // Verdicts in colour on a terminal, never with NO_COLOR.
    let pods = lab.cli_json(&["lab", "get", "pods", "-l", "app=tty"]);
    let (from, to) = (
        format!("default/{}", pods[0]["name"].as_str().unwrap()),
        format!("default/{}", pods[1]["name"].as_str().unwrap()),
    );
    let probe = format!("lab probe --from {from} --to {to} --port 80");
    let (coloured, _) = on_terminal(&lab, &probe, &[]);
    assert!(coloured.contains("\u{1b}[32mallowed"), "{coloured:?}");
    let (plain, _) = on_terminal(&lab, &probe, &[("NO_COLOR", "1")]);
    assert!(
        plain.contains("allowed") && !plain.contains('\u{1b}'),
        "{plain:?}"
    );
}
