//! Names the lab makes up: pods of a Deployment, interfaces, network namespaces, slices.

use k8s_openapi::api::core::v1::PodTemplateSpec;

use crate::LabError;

/// Kubernetes' alphabet for generated names (`k8s.io/apimachinery/pkg/util/rand`): no vowels,
/// so no words, and no characters that look alike.
const SAFE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Lab and node names end up in socket paths (at most 108 bytes), so they are kept short.
pub const MAX_LAB_NAME: usize = 32;
pub const MAX_NODE_NAME: usize = 32;

/// Prefix of every network namespace the lab creates.
const NETNS_PREFIX: &str = "sluice";

pub fn fnv32a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5_u32, |hash, b| {
        (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Maps every character through the safe alphabet, like `rand.SafeEncodeString`.
fn safe_encode(text: &str) -> String {
    text.bytes()
        .map(|b| char::from(SAFE_ALPHABET[usize::from(b) % SAFE_ALPHABET.len()]))
        .collect()
}

/// The `pod-template-hash` of a Deployment's pod template: FNV-32a of its JSON, the decimal
/// digits (zero-padded to 10) encoded like Kubernetes encodes its template hashes.
pub fn template_hash(template: &PodTemplateSpec) -> Result<String, LabError> {
    let json = serde_json::to_vec(template).map_err(|source| LabError::Encode {
        what: "pod template",
        source,
    })?;
    Ok(safe_encode(&format!("{:010}", fnv32a(&json))))
}

/// Five random characters, like the suffix of a ReplicaSet's pod names.
pub fn random_suffix() -> String {
    (0..5)
        .map(|_| char::from(SAFE_ALPHABET[fastrand::usize(..SAFE_ALPHABET.len())]))
        .collect()
}

/// Five characters derived from `data`, for stable generated names.
pub fn short_hash(data: &[u8]) -> String {
    let mut hash = fnv32a(data);
    let base = SAFE_ALPHABET.len() as u32;
    (0..5)
        .map(|_| {
            let c = SAFE_ALPHABET[(hash % base) as usize];
            hash /= base;
            char::from(c)
        })
        .collect()
}

/// Host-side veth of a pod: `lxc` and 8 hex digits (11 characters, under IFNAMSIZ), with a
/// salt to step around the rare collision.
pub fn interface_name(namespace: &str, pod: &str, salt: u32) -> String {
    let key = if salt == 0 {
        format!("{namespace}/{pod}")
    } else {
        format!("{namespace}/{pod}#{salt}")
    };
    format!("lxc{:08x}", fnv32a(key.as_bytes()))
}

pub fn node_netns(lab: &str, node: &str) -> String {
    format!("{NETNS_PREFIX}-{lab}-{node}")
}

pub fn pod_netns(lab: &str, namespace: &str, pod: &str) -> String {
    format!("{NETNS_PREFIX}-{lab}-{namespace}-{pod}")
}

/// A world host's namespace. `world` cannot be a node name's prefix here (the lab file
/// refuses node `world-<host>`), but a pod in namespace `world` could meet it: plan checks.
pub fn world_netns(lab: &str, host: &str) -> String {
    format!("{NETNS_PREFIX}-{lab}-world-{host}")
}

/// The namespace of the lab's underlay: a node cannot be named `underlay` (the lab file
/// refuses it), and a pod's namespace name always has a '-' after the lab's prefix.
pub fn underlay_netns(lab: &str) -> String {
    format!("{NETNS_PREFIX}-{lab}-underlay")
}

/// The namespace of the router in front of the nodes: no node may be named `router` (the
/// lab file refuses it).
pub fn router_netns(lab: &str) -> String {
    format!("{NETNS_PREFIX}-{lab}-router")
}

/// The bridge port of a node's underlay link, in the underlay namespace.
pub fn underlay_port(node: &str) -> String {
    format!("und{:08x}", fnv32a(node.as_bytes()))
}

/// Node-side veth of a world host: `wld` and 8 hex digits, like the pods' `lxc` names.
pub fn world_interface(host: &str) -> String {
    format!("wld{:08x}", fnv32a(host.as_bytes()))
}

/// Every netns of lab `lab` starts with this; other labs' may too (`demo` vs `demo-2`).
pub fn netns_prefix(lab: &str) -> String {
    format!("{NETNS_PREFIX}-{lab}-")
}

/// Checks an RFC 1123 label (what Kubernetes requires of namespace and node names).
pub fn check_dns_label(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > max {
        return Err(format!("{name:?} is longer than {max} characters"));
    }
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "{name:?} must consist of lower case letters, digits and '-', and start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// The longest label value Kubernetes accepts.
pub const MAX_LABEL_VALUE: usize = 63;

/// Checks a Kubernetes label value that must not be empty (a node's zone): alphanumerics,
/// '-', '_' and '.', starting and ending alphanumeric.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > MAX_LABEL_VALUE {
        return Err(format!(
            "{value:?} is longer than {MAX_LABEL_VALUE} characters"
        ));
    }
    let valid_chars = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let alnum_ends = value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid_chars || !alnum_ends {
        return Err(format!(
            "{value:?} must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit"
        ));
    }
    Ok(())
}

pub fn check_lab_name(name: &str) -> Result<(), LabError> {
    check_dns_label(name, MAX_LAB_NAME).map_err(|message| LabError::LabName {
        name: name.to_string(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::{Container, PodSpec},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    #[test]
    fn fnv32a_matches_the_reference_vectors() {
        assert_eq!(fnv32a(b""), 0x811c_9dc5);
        assert_eq!(fnv32a(b"a"), 0xe40c_292c);
        assert_eq!(fnv32a(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn template_hash_is_ten_safe_chars_and_tracks_the_template() {
        let template = |image: &str| PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some([("app".to_string(), "nginx".to_string())].into()),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "nginx".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        };
        let a = template_hash(&template("nginx:latest")).unwrap();
        assert_eq!(a.len(), 10);
        // Decimal digits go through the alphabet, so only these characters appear, as in real
        // Kubernetes hashes such as 7c5ddbdf54.
        assert!(a.chars().all(|c| "456789bcdf".contains(c)), "{a}");
        assert_eq!(a, template_hash(&template("nginx:latest")).unwrap());
        assert_ne!(a, template_hash(&template("nginx:1.27")).unwrap());
        // The digits of the hash, one alphabet character each.
        let digits = format!(
            "{:010}",
            fnv32a(&serde_json::to_vec(&template("nginx:latest")).unwrap())
        );
        let expect: String = digits
            .chars()
            .map(|d| "456789bcdf".as_bytes()[d.to_digit(10).unwrap() as usize] as char)
            .collect();
        assert_eq!(a, expect);
    }

    #[test]
    fn random_suffixes_use_the_safe_alphabet() {
        for _ in 0..100 {
            let s = random_suffix();
            assert_eq!(s.len(), 5);
            assert!(s.bytes().all(|b| SAFE_ALPHABET.contains(&b)), "{s}");
        }
    }

    #[test]
    fn interface_names_fit_ifnamsiz_and_differ_per_pod() {
        let a = interface_name("default", "client", 0);
        assert_eq!(a.len(), 11);
        assert!(a.starts_with("lxc"));
        assert_eq!(a, interface_name("default", "client", 0));
        assert_ne!(a, interface_name("other", "client", 0));
        assert_ne!(a, interface_name("default", "client", 1));
    }

    #[test]
    fn names_are_checked_like_dns_labels() {
        assert!(check_dns_label("node-1", 32).is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(33)] {
            assert!(check_dns_label(bad, 32).is_err(), "{bad:?}");
        }
    }
}
