//! AFL++ target: bytes read as `sluice lab apply` reads a manifest file
//! (`sluice_sources::parse_str`), and what it accepts compiled for a node. Any panic is a
//! crash AFL++ keeps. Run with `bash scripts/fuzz-afl.sh [SECONDS]` (see
//! bench/results/fuzz/report.md).

use std::path::Path;

use sluice_compiler::{NodeContext, compile};
use sluice_sources::{Object, parse_str};
use sluice_store::Snapshot;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let Ok(manifests) = parse_str(Path::new("afl.yaml"), text) else {
            return;
        };
        let mut snapshot = Snapshot::default();
        for manifest in manifests {
            match manifest.object {
                Object::Namespace(o) => snapshot.namespaces.push(o),
                Object::Pod(o) => snapshot.pods.push(o),
                Object::Service(o) => snapshot.services.push(o),
                Object::EndpointSlice(o) => snapshot.endpoint_slices.push(o),
                Object::NetworkPolicy(o) => snapshot.network_policies.push(o),
                Object::Deployment(_) => {}
            }
        }
        let node = NodeContext {
            node: "node-a".into(),
            ..NodeContext::default()
        };
        let _ = compile(&snapshot, &node);
    });
}
