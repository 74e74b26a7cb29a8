//! The CNI plugin's stdin, mutated from valid network configurations (ADD's, CHECK's
//! with a `prevResult`, GC's with its attachment lists) and run through the plugin's own
//! entry point (`sluice_cni::run`, as `main` calls it) as ADD and VERSION. ADD names a
//! network namespace that does not exist, so no input ever reaches an agent or the
//! kernel: a configuration the plugin accepts stops at "container unknown". Every answer
//! must be the spec's JSON (an error object or VERSION's result), never a panic; a
//! refused configuration names what is wrong (its field, once the input is an object).
//!
//! `cni_stdin_smoke` runs 10,000 inputs in CI; `SLUICE_FUZZ_INPUTS=1000000 cargo test -p
//! sluice-fuzz --test cni_stdin -- --ignored --nocapture` is the long run.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Campaign, Tally, inputs_from_env, seed_from_env};
use serde_json::{Value, json};
use sluice_cni::spec::{ErrorCode, ErrorResult, SUPPORTED_VERSIONS};
use sluice_fuzz::Mutator;

/// Where ADD is told the pod's namespace is: never there.
const NO_NETNS: &str = "/nonexistent/sluice-fuzz/netns";

fn corpus() -> Vec<Value> {
    let base = json!({
        "cniVersion": "1.1.0",
        "name": "sluice",
        "type": "sluice-cni",
        "agentSocket": "/nonexistent/sluice-fuzz/agent.sock",
    });
    let mut check = base.clone();
    check["cniVersion"] = json!("1.0.0");
    check["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "lxc0123456789ab"},
            {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/var/run/netns/p"}
        ],
        "ips": [{"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
        "dns": {}
    });
    let mut gc = base.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "abc", "ifname": "eth0"}]);
    gc["cni.dev/attachments"] = json!([{"containerID": "abc", "ifname": "eth0"}]);
    // What a runtime passes besides: fields the plugin reads past.
    let mut extra = base.clone();
    extra["runtimeConfig"] = json!({"portMappings": [{"hostPort": 8080, "containerPort": 80}]});
    extra["ipam"] = json!({"type": "host-local"});
    extra["dns"] = json!({"nameservers": ["10.96.0.10"]});
    extra["args"] = json!({"cni": {"labels": [{"key": "app", "value": "web"}]}});
    vec![base, check, gc, extra]
}

fn var(command: &'static str) -> impl Fn(&str) -> Option<String> {
    move |name| {
        Some(match name {
            "CNI_COMMAND" => command.to_string(),
            "CNI_CONTAINERID" => "sluice-fuzz".to_string(),
            "CNI_NETNS" => NO_NETNS.to_string(),
            "CNI_IFNAME" => "eth0".to_string(),
            "CNI_ARGS" => "K8S_POD_NAMESPACE=default;K8S_POD_NAME=fuzz".to_string(),
            "CNI_PATH" => "/nonexistent".to_string(),
            _ => return None,
        })
    }
}

/// Runs one stdin as ADD and as VERSION; a failure description if an answer is wrong.
fn check(stdin: &[u8], is_object: bool, t: &mut Tally) -> Option<String> {
    let shown = String::from_utf8_lossy(stdin);
    let add = sluice_cni::run(var("ADD"), Ok(stdin.to_vec()));
    if add.success {
        return Some(format!("ADD succeeded without a namespace: {shown}"));
    }
    let Ok(error) = serde_json::from_str::<ErrorResult>(&add.stdout) else {
        return Some(format!("ADD's answer is no error object: {}", add.stdout));
    };
    if !SUPPORTED_VERSIONS.contains(&error.cni_version.as_str()) || error.msg.is_empty() {
        return Some(format!("ADD's error object is malformed: {}", add.stdout));
    }
    let code = error.code;
    t.count(match code {
        c if c == ErrorCode::ContainerUnknown as u32 => "ADD: configuration accepted",
        c if c == ErrorCode::DecodeFailure as u32 => "ADD: refused, decode failure",
        c if c == ErrorCode::InvalidNetworkConfig as u32 => "ADD: refused, invalid configuration",
        c if c == ErrorCode::IncompatibleVersion as u32 => "ADD: refused, incompatible version",
        _ => return Some(format!("ADD answered code {code}: {}", add.stdout)),
    });
    // Once the input is an object, a decode failure names the field: as a path before
    // the message, or in serde's own words ("missing field `name`", "duplicate field").
    if code == ErrorCode::DecodeFailure as u32 && is_object {
        let rest = error
            .msg
            .strip_prefix("network configuration on stdin: ")
            .unwrap_or(&error.msg);
        let named = rest.contains(" field `")
            || rest
                .split_once(": ")
                .is_some_and(|(field, _)| !field.is_empty() && !field.contains(' '));
        if !named {
            return Some(format!("decode failure names no field: {}", add.stdout));
        }
    }
    let version = sluice_cni::run(var("VERSION"), Ok(stdin.to_vec()));
    let answer: Value = match serde_json::from_str(&version.stdout) {
        Ok(answer) => answer,
        Err(e) => {
            return Some(format!(
                "VERSION's answer is no JSON ({e}): {}",
                version.stdout
            ));
        }
    };
    t.count(if version.success {
        "VERSION: answered"
    } else {
        "VERSION: refused"
    });
    answer
        .get("cniVersion")
        .is_none()
        .then(|| format!("VERSION's answer has no cniVersion: {}", version.stdout))
}

fn run(inputs: u64) {
    let corpus = corpus();
    let seed = seed_from_env();
    let mut mutator = Mutator::new(seed, &corpus);
    let campaign = Campaign::run("CNI stdin", seed, inputs, |t| {
        let mut doc = corpus[mutator.rng().usize(..corpus.len())].clone();
        if mutator.rng().u8(..10) == 0 {
            t.count("text bent");
            let text = mutator.mutate_text(&serde_json::to_string_pretty(&doc).unwrap());
            let is_object = serde_json::from_str::<Value>(&text).is_ok_and(|v| v.is_object());
            return check(text.as_bytes(), is_object, t);
        }
        for _ in 0..=mutator.rng().usize(..2) {
            mutator.mutate(&mut doc);
        }
        check(&serde_json::to_vec(&doc).unwrap(), doc.is_object(), t)
    });
    campaign.finish();
}

#[test]
fn cni_stdin_smoke() {
    run(10_000);
}

#[test]
#[ignore = "the long run: SLUICE_FUZZ_INPUTS inputs (default 1,000,000)"]
fn cni_stdin_long() {
    run(inputs_from_env());
}
