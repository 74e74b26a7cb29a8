//! `sluice-cni`: the CNI plugin a container runtime calls to attach a pod to sluice.
//!
//! It runs in the node's network namespace. ADD asks the agent for an address (the agent
//! owns IPAM: it knows the node's `spec.podCIDR`), wires the pod as the lab wires its pods
//! (`sluice_netns::wire_guest`: a veth, the pod's /32, routes via the node's router address),
//! then tells the agent, which answers once the endpoint's policy is realized and its
//! programs attached: the pod's first packet is already policed. DEL removes the veth and
//! the agent's record, and succeeds whatever is already gone. CHECK compares the kernel and
//! the agent with what ADD made; STATUS asks the agent whether it can take pods; GC removes
//! every attachment the runtime's list of valid ones lacks.

mod commands;
mod error;
mod runtime;
pub mod spec;

use sha2::{Digest, Sha256};

pub use error::CniError;
pub use runtime::{Command, PodRef, Runtime};
use spec::{ErrorResult, LATEST_VERSION};

/// The host-side veth of one attachment: `lxc` and the first 12 hex digits of the SHA-256
/// of the container id and interface name, so it is the same on every call (DEL finds it
/// without asking anyone), differs between containers, and fits the kernel's 15 bytes.
pub fn host_interface(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::new()
        .chain_update(container_id.as_bytes())
        .chain_update([0])
        .chain_update(ifname.as_bytes())
        .finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("lxc{hex}")
}

/// What one invocation prints on stdout, and whether it succeeded.
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
}

/// Runs one invocation: the `CNI_*` variables through `var`, the configuration read from
/// stdin. A failure is printed as the spec's error object.
pub fn run(var: impl Fn(&str) -> Option<String>, stdin: std::io::Result<Vec<u8>>) -> Outcome {
    let stdin = stdin.map_err(CniError::Stdin);
    // The version an error answers in: the request's, if it could be read.
    let version = stdin
        .as_ref()
        .ok()
        .and_then(|s| serde_json::from_slice::<spec::VersionRequest>(s).ok())
        .map(|r| r.cni_version)
        .filter(|v| spec::supported(v))
        .unwrap_or_else(|| LATEST_VERSION.to_string());
    let done = Runtime::from_vars(var).and_then(|runtime| commands::dispatch(&runtime, &stdin?));
    match done {
        Ok(stdout) => Outcome {
            stdout,
            success: true,
        },
        Err(error) => {
            let result = ErrorResult {
                cni_version: version,
                code: error.code() as u32,
                msg: error.to_string(),
                details: std::error::Error::source(&error)
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            };
            Outcome {
                stdout: serde_json::to_string(&result).unwrap_or_else(|e| {
                    format!(
                        r#"{{"code":{},"msg":"encoding an error: {e}"}}"#,
                        result.code
                    )
                }),
                success: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by sluice-fuzz's CNI campaign: serde_json alone says only "at line 1 column 60".
    #[test]
    fn a_value_of_the_wrong_shape_is_refused_naming_its_field() {
        let var = |name: &str| (name == "CNI_COMMAND").then(|| "ADD".to_string());
        let stdin = br#"{"cniVersion":"1.1.0","name":"n","type":"sluice-cni",
            "cni.dev/valid-attachments":[{"containerID":5,"ifname":"eth0"}]}"#;
        let out = run(var, Ok(stdin.to_vec()));
        assert!(!out.success);
        let error: ErrorResult = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(error.code, spec::ErrorCode::DecodeFailure as u32);
        assert!(
            error.msg.starts_with(
                "network configuration on stdin: cni.dev/valid-attachments[0].containerID: \
                 invalid type: integer `5`"
            ),
            "{}",
            error.msg
        );
    }

    #[test]
    fn host_interfaces_are_short_stable_and_distinct() {
        let a = host_interface("0123456789abcdef", "eth0");
        assert_eq!(a.len(), 15);
        assert_eq!(a, host_interface("0123456789abcdef", "eth0"));
        assert_ne!(a, host_interface("0123456789abcdee", "eth0"));
        assert_ne!(a, host_interface("0123456789abcdef", "eth1"));
        assert!(a.starts_with("lxc"));
    }
}
