//! The sandbox image, made offline: one uncompressed layer holding the static pause program
//! built by `tests/build.rs`, in an OCI image layout tarball that `ctr images import` reads.

use std::{fs, io, path::Path};

use serde_json::json;
use sha2::{Digest, Sha256};

/// The name the sandbox image is imported under and containerd's `sandbox_image`.
pub const PAUSE_IMAGE: &str = "sluice.test/pause:1";

const PAUSE_BINARY: &str = env!("SLUICE_TEST_PAUSE");
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// A content-addressed blob of the layout: `sha256:<hex>` and its bytes.
struct Blob {
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
        Self { digest, bytes }
    }

    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// A tar archive of `files` (path, mode, content), with fixed owners and times so the
/// same input gives the same digest.
fn tar_of(files: &[(&str, u32, &[u8])]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, mode, content) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(*mode);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, *content)?;
    }
    builder.into_inner()
}

/// Writes the pause image's OCI layout tarball to `path`.
pub fn write_pause_image(path: &Path) -> io::Result<()> {
    let pause = fs::read(PAUSE_BINARY)?;
    let layer = Blob::new(tar_of(&[("pause", 0o755, &pause)])?);
    // An uncompressed layer's diff ID is its own digest.
    let config = Blob::new(serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
    }))?);
    let manifest = Blob::new(serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": config.descriptor(CONFIG_TYPE),
        "layers": [layer.descriptor(LAYER_TYPE)],
    }))?);
    let mut descriptor = manifest.descriptor(MANIFEST_TYPE);
    descriptor["annotations"] = json!({
        "io.containerd.image.name": PAUSE_IMAGE,
        "org.opencontainers.image.ref.name": PAUSE_IMAGE,
    });
    let index = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [descriptor]}))?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;

    let blob_path = |blob: &Blob| {
        let hex = blob.digest.trim_start_matches("sha256:");
        format!("blobs/sha256/{hex}")
    };
    let (layer_path, config_path, manifest_path) =
        (blob_path(&layer), blob_path(&config), blob_path(&manifest));
    let archive = tar_of(&[
        ("oci-layout", 0o644, layout),
        ("index.json", 0o644, &index),
        (&layer_path, 0o644, &layer.bytes),
        (&config_path, 0o644, &config.bytes),
        (&manifest_path, 0o644, &manifest.bytes),
    ])?;
    fs::write(path, archive)
}
