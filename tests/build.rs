//! The containerd tests' CRI client (from `cri/cri.proto`) and the pause program of their
//! sandbox image (from `cri/pause.c`, static, so the image needs no other file).

use std::{env, path::PathBuf, process::Command};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=cri/cri.proto");
    println!("cargo:rerun-if-changed=cri/pause.c");
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_protos(&["cri/cri.proto"], &["cri"])?;

    let out = PathBuf::from(env::var("OUT_DIR")?).join("pause");
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-s", "-o"])
        .arg(&out)
        .arg("cri/pause.c")
        .status()
        .map_err(|e| format!("gcc: {e} (scripts/setup.sh installs it)"))?;
    if !status.success() {
        return Err(format!("gcc -static cri/pause.c: {status}").into());
    }
    println!("cargo:rustc-env=SLUICE_TEST_PAUSE={}", out.display());
    Ok(())
}
