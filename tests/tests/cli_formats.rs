//! Issue 16, items 1, 2 and 7 through the real `sluice` binary against a live lab: every
//! command of the clap tree prints one JSON (and YAML) document with `-o`, and keeps the
//! exit codes; `lab apply` from stdin and directories, `--dry-run` changing nothing,
//! `delete --ignore-not-found`, `lab get -l/-n/-A/-o wide`; `observe --last` in time order.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failed step must fail the test loudly"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;
use sluice_integration::{
    ONE_NODE_LAB, TestLab, examples,
    multinode::{Mode, lab_yaml},
};

/// Leaves whose output is not sluice's own, and why.
const NOT_A_DOCUMENT: &[(&str, &str)] = &[
    (
        "completion",
        "prints a shell script for the shell to source",
    ),
    (
        "lab exec",
        "replaces itself with the command, whose output it is",
    ),
];

/// Every visible leaf of the command tree, as `lab node add`.
fn leaves(command: &clap::Command, prefix: &str, out: &mut Vec<String>) {
    let subcommands: Vec<_> = command
        .get_subcommands()
        .filter(|c| !c.is_hide_set() && c.get_name() != "help")
        .collect();
    if subcommands.is_empty() {
        out.push(prefix.trim().to_string());
    }
    for sub in subcommands {
        leaves(sub, &format!("{prefix} {}", sub.get_name()), out);
    }
}

/// One run of the walk: the leaf it stands for, its arguments, the format and the exit
/// status the command must keep.
struct Run {
    leaf: &'static str,
    args: Vec<String>,
    output: &'static str,
    exit: i32,
}

fn run(leaf: &'static str, args: &[&str], output: &'static str, exit: i32) -> Run {
    Run {
        leaf,
        args: args.iter().map(|a| a.to_string()).collect(),
        output,
        exit,
    }
}

/// The same command in JSON, then in YAML.
fn both(leaf: &'static str, args: &[&str], exit: i32) -> [Run; 2] {
    [run(leaf, args, "json", exit), run(leaf, args, "yaml", exit)]
}

/// The documents of `stdout` in `format`: at least one, each parsed.
fn documents(format: &str, stdout: &str) -> Result<Vec<Value>, String> {
    let docs: Vec<Value> = match format {
        "json" => serde_json::Deserializer::from_str(stdout)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?,
        _ => serde_saphyr::from_multiple(stdout).map_err(|e| e.to_string())?,
    };
    if docs.is_empty() {
        return Err("no document".into());
    }
    Ok(docs)
}

const APP: &str = "apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  containers: [{name: web, image: nginx, ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  containers: [{name: client, image: curl}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, protocol: TCP}]
";

#[test]
fn every_command_prints_json_and_yaml_and_keeps_its_exit_code() {
    // One node with an underlay, so that `lab node add` has somewhere to put a second.
    let lab_file_text = lab_yaml(Mode::Tunnel, 1, 1500);
    let lab = TestLab::up("clijson", &lab_file_text);
    let dir = std::env::temp_dir().join(format!("sluice-clijson-{}", lab.name));
    let manifests = dir.join("manifests");
    fs::create_dir_all(&manifests).unwrap();
    let _cleanup = RemoveDir(dir.clone());
    fs::write(manifests.join("app.yaml"), APP).unwrap();
    let lab_file = dir.join("lab.yaml");
    fs::write(&lab_file, &lab_file_text).unwrap();
    let (lab_file, manifests, man) = (
        lab_file.display().to_string(),
        manifests.display().to_string(),
        dir.join("man").display().to_string(),
    );

    lab.cli(&["lab", "apply", "-f", &manifests]);
    let identity = lab.cli_json(&["endpoint", "get", "default/web"])["identity"].to_string();

    let mut runs: Vec<Run> = Vec::new();
    runs.extend(both("lab list", &["lab", "list"], 0));
    runs.extend(both("lab up", &["lab", "up", "-f", &lab_file], 0));
    runs.extend(both("lab apply", &["lab", "apply", "-f", &manifests], 0));
    for what in ["pods", "services", "endpoints", "world"] {
        runs.extend(both("lab get", &["lab", "get", what], 0));
    }
    runs.extend(both("status", &["status"], 0));
    runs.extend(both("service list", &["service", "list"], 0));
    runs.extend(both("ct list", &["ct", "list"], 0));
    runs.extend(both("verify", &["verify"], 0));
    runs.extend(both("endpoint list", &["endpoint", "list"], 0));
    runs.extend(both("endpoint get", &["endpoint", "get", "default/web"], 0));
    runs.extend(both("identity list", &["identity", "list"], 0));
    runs.extend(both("identity get", &["identity", "get", &identity], 0));
    runs.extend(both("policy get", &["policy", "get", "default/web"], 0));
    runs.extend(both("lab probe", &["lab", "probe", "--port", "80"], 0));
    let probe = [
        "lab",
        "probe",
        "--from",
        "default/client",
        "--to",
        "default/web",
    ];
    runs.extend(both(
        "lab probe",
        &[&probe[..], &["--port", "80"]].concat(),
        0,
    ));
    // Nothing listens on 81: a denied probe exits 1, its document printed all the same.
    runs.extend(both(
        "lab probe",
        &[&probe[..], &["--port", "81"]].concat(),
        1,
    ));
    runs.extend(both("observe", &["observe", "--last", "10"], 0));
    runs.extend(both("man", &["man", "--dir", &man], 0));
    let add = [
        "lab",
        "node",
        "add",
        "node-2",
        "--pod-cidr",
        "10.244.2.0/24",
    ];
    let remove = ["lab", "node", "remove", "node-2"];
    for output in ["json", "yaml"] {
        runs.push(run("lab node add", &add, output, 0));
        runs.push(run("lab node remove", &remove, output, 0));
    }
    runs.push(run(
        "lab delete",
        &["lab", "delete", "-f", &manifests],
        "json",
        0,
    ));
    // Deleting what is not there is an error (2): no document, the object named on stderr.
    runs.push(run(
        "lab delete",
        &["lab", "delete", "-f", &manifests],
        "json",
        2,
    ));
    runs.push(run(
        "lab apply",
        &["lab", "apply", "-f", &manifests],
        "json",
        0,
    ));
    runs.push(run(
        "lab delete",
        &["lab", "delete", "-f", &manifests],
        "yaml",
        0,
    ));
    runs.extend(both("lab down", &["lab", "down"], 0));

    // Every leaf is run in JSON, or said to print no document of its own.
    let mut all = Vec::new();
    leaves(&sluice_cli::command(), "", &mut all);
    let exempt: BTreeSet<&str> = NOT_A_DOCUMENT.iter().map(|(leaf, _)| *leaf).collect();
    let in_json: BTreeSet<&str> = runs
        .iter()
        .filter(|r| r.output == "json")
        .map(|r| r.leaf)
        .collect();
    let missing: Vec<&String> = all
        .iter()
        .filter(|l| !exempt.contains(l.as_str()) && !in_json.contains(l.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "commands without a `-o json` run here: {missing:?} (add one, or say in \
         NOT_A_DOCUMENT why it prints no document)"
    );
    eprintln!("{} leaves, {} exempt", all.len(), exempt.len());

    let mut failures = Vec::new();
    for r in &runs {
        let mut args: Vec<&str> = r.args.iter().map(String::as_str).collect();
        args.extend(["-o", r.output]);
        let started = Instant::now();
        let out = lab.cli_output(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let code = out.status.code().unwrap_or(-1);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let parsed = if r.exit == 2 {
            // An error prints no document, and says what is wrong.
            match (
                stdout.trim().is_empty(),
                stderr.contains("Pod default/web: metadata.name: not found"),
            ) {
                (true, true) => Ok(Vec::new()),
                _ => Err("an error should print nothing on stdout and name the object".into()),
            }
        } else {
            documents(r.output, &stdout)
        };
        eprintln!(
            "sluice {} ({:.0} ms): exit {code}, {} document(s)",
            args.join(" "),
            started.elapsed().as_secs_f64() * 1000.0,
            parsed.as_ref().map_or(0, Vec::len)
        );
        // Spinners draw only on a terminal: a script's stderr stays clean.
        let quiet = r.exit != 0 || stderr.trim().is_empty();
        if code != r.exit || parsed.is_err() || !quiet {
            failures.push(format!(
                "sluice {}: exit {code} (want {}), {parsed:?}\nstdout: {stdout}\nstderr: {stderr}",
                args.join(" "),
                r.exit,
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(Path::new(&man).join("sluice-lab-apply.1").exists());
}

/// Removes a directory the test made, also when it fails.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

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

/// `sluice <args>` with `input` on stdin.
fn cli_stdin(lab: &TestLab, args: &[&str], input: &str) -> std::process::Output {
    let mut child = lab
        .cli_command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
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
    let out = cli_stdin(
        &lab,
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
    let table = cli_stdin(&lab, &["lab", "apply", "--dry-run", "-f", "-"], &scaled);
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
    let out = cli_stdin(&lab, &["lab", "apply", "-f", "-", "-o", "json"], &scaled);
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
    let out = cli_stdin(&lab, &["lab", "delete", "-f", "-", "-o", "json"], &scaled);
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
    lab.apply_yaml("app.yaml", APP);
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

#[test]
fn completions_parse_and_every_command_has_a_manual_page() {
    let sluice = std::env::var_os("SLUICE_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sluice"),
        PathBuf::from,
    );
    let script = std::process::Command::new(&sluice)
        .args(["completion", "bash"])
        .output()
        .unwrap();
    assert!(script.status.success(), "{script:?}");
    let text = String::from_utf8_lossy(&script.stdout);
    assert!(text.contains("_sluice") && text.contains("ignore-not-found"));
    // bash reads it without a syntax error.
    let mut bash = std::process::Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    bash.stdin
        .take()
        .unwrap()
        .write_all(&script.stdout)
        .unwrap();
    assert!(bash.wait().unwrap().success());
    for shell in ["zsh", "fish"] {
        let out = std::process::Command::new(&sluice)
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stdout.len() > 1000,
            "{shell}: {out:?}"
        );
    }
    let bogus = std::process::Command::new(&sluice)
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(bogus.status.code(), Some(2), "a usage error exits 2");

    let dir = std::env::temp_dir().join(format!("sluice-man-{}", std::process::id()));
    let _cleanup = RemoveDir(dir.clone());
    let out = std::process::Command::new(&sluice)
        .args(["man", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut all = Vec::new();
    leaves(&sluice_cli::command(), "", &mut all);
    for leaf in &all {
        let page = dir.join(format!("sluice-{}.1", leaf.replace(' ', "-")));
        let text = fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{}",
            page.display()
        );
    }
    eprintln!("{} manual pages", fs::read_dir(&dir).unwrap().count());
}
