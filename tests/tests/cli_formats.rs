//! Issue 16, items 1 and 8 through the real `sluice` binary: every command of the clap
//! tree prints one JSON (and YAML) document with `-o` against a live lab and keeps the exit
//! codes; completions and manual pages come from the same tree.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failed step must fail the test loudly"
)]

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use serde_json::Value;
use sluice_integration::{
    TestLab,
    cli::{RemoveDir, WEB_AND_CLIENT},
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

#[test]
fn every_command_prints_json_and_yaml_and_keeps_its_exit_code() {
    // One node with an underlay, so that `lab node add` has somewhere to put a second.
    let lab_file_text = lab_yaml(Mode::Tunnel, 1, 1500);
    let lab = TestLab::up("clijson", &lab_file_text);
    let dir = std::env::temp_dir().join(format!("sluice-clijson-{}", lab.name));
    let manifests = dir.join("manifests");
    fs::create_dir_all(&manifests).unwrap();
    let _cleanup = RemoveDir(dir.clone());
    fs::write(manifests.join("app.yaml"), WEB_AND_CLIENT).unwrap();
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
    runs.extend(both(
        "policy explain",
        &[
            "policy",
            "explain",
            "--from",
            "default/client",
            "--to",
            "default/web",
            "--port",
            "80",
        ],
        0,
    ));
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
        "lab node restart-agent",
        &["lab", "node", "restart-agent", "node-1"],
        "json",
        0,
    ));
    runs.push(run(
        "lab node restart-agent",
        &["lab", "node", "restart-agent", "node-1", "--kill"],
        "yaml",
        0,
    ));
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
