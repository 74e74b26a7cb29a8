//! What the lab's tests share: a lab torn down on drop, the binaries, and a fake agent.
// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use sluice_lab::{Lab, LabBinaries, LabOptions};
use sluice_netns::NetNs;
use sluice_store::Snapshot;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// Short (node namespace names join the lab's name with the node's), unique per test.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}-{n}", std::process::id())
}

/// The `sluice` binary, whose `lab pod-server` runs pods and world hosts.
pub fn sluice_bin() -> PathBuf {
    let path = std::env::var_os("SLUICE_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/sluice"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} not found: run `cargo build --bins` first (or set SLUICE_BIN)",
        path.display()
    );
    path
}

/// The real agent, built like the `sluice` binary.
pub fn agent_bin() -> PathBuf {
    let path = std::env::var_os("SLUICE_AGENT_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/sluice-agent"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} not found: run `cargo build --bins` first (or set SLUICE_AGENT_BIN)",
        path.display()
    );
    path
}

/// What runs on every node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Agent {
    /// No agent at all: bare routing.
    None,
    /// [`FAKE_AGENT`].
    Fake,
    /// The real sluice-agent.
    Real,
}

/// Writes an executable script.
pub fn script(path: &Path, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}

/// A lab with a unique name and state root, torn down on drop (also when the test fails).
pub struct TestLab {
    pub lab: Lab,
    pub name: String,
    pub opts: LabOptions,
    pub tmp: PathBuf,
}

impl TestLab {
    /// `lab up` of `text` with `agent` on every node.
    pub fn up(name: &str, text: &str, agent: Agent) -> Self {
        let tmp = std::env::temp_dir().join(format!("sluice-lab-test-{name}"));
        fs::create_dir_all(&tmp).unwrap();
        let mut opts = LabOptions {
            binaries: LabBinaries {
                sluice: sluice_bin(),
                agent: None,
            },
            state_root: tmp.join("state"),
        };
        if agent == Agent::Real {
            opts.binaries.agent = Some(agent_bin());
        }
        if agent == Agent::Fake {
            let handler = script(&tmp.join("handler.sh"), FAKE_AGENT_HANDLER);
            let agent = FAKE_AGENT.replace("HANDLER", &handler.display().to_string());
            opts.binaries.agent = Some(script(&tmp.join("agent.sh"), &agent));
        }
        let file = tmp.join("lab.yaml");
        fs::write(&file, text).unwrap();
        let lab = match Lab::up(name, &file, &opts) {
            Ok(lab) => lab,
            Err(e) => {
                let _ = Lab::down(name, &opts);
                let _ = fs::remove_dir_all(&tmp);
                panic!("lab up {name}: {e}");
            }
        };
        Self {
            lab,
            name: name.to_string(),
            opts,
            tmp,
        }
    }

    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.tmp.join(file);
        fs::write(&path, text).unwrap();
        path
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot::read_file(&self.lab.cluster_file()).unwrap()
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(e) = Lab::down(&self.name, &self.opts) {
            eprintln!("lab down {}: {e}", self.name);
        }
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

pub fn netns_of(lab: &str) -> BTreeSet<String> {
    let prefix = format!("sluice-{lab}-");
    NetNs::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// A stand-in for sluice-agent with the same arguments, which it logs: it serves `status`
/// on the API socket from inside the node's network namespace through socat and
/// [`FAKE_AGENT_HANDLER`].
pub const FAKE_AGENT: &str = r#"#!/bin/sh
echo "fake agent: $*"
while [ $# -gt 1 ]; do
  case "$1" in
    --netns) netns=$2 ;;
    --cluster-file) cluster=$2 ;;
    --api-socket) sock=$2 ;;
  esac
  shift 2
done
record_dir=$(dirname "$sock")
export cluster record_dir
exec socat UNIX-LISTEN:"$sock",fork EXEC:HANDLER
"#;

/// Answers one status request: the revision in cluster.json counts as realized at once.
/// The first time it reports a generation it keeps that snapshot (`gen-N.json`).
pub const FAKE_AGENT_HANDLER: &str = r#"#!/bin/sh
cr=$(printf '\r')
while IFS= read -r line && [ "${line%"$cr"}" != "" ]; do :; done
copy="$record_dir/now.$$"
cp "$cluster" "$copy"
gen=$(sed -n 's/^  "revision": \([0-9]*\),$/\1/p' "$copy")
if [ -e "$record_dir/gen-$gen.json" ]; then
  rm -f "$copy"
else
  mv "$copy" "$record_dir/gen-$gen.json"
fi
body=$(printf '{"node":"fake","version":"0","healthy":true,"desired_generation":%s,"realized_generation":%s,"desired_revision":%s,"realized_revision":%s,"last_error":null,"reconciles":0,"endpoints":0,"maps":[]}' "$gen" "$gen" "$gen" "$gen")
printf 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#body}" "$body"
"#;
