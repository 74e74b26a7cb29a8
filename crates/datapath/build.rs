//! Compiles every `bpf/*.c` into `$OUT_DIR/<name>.o` with clang-19, and once more with the
//! previous map layout (`-DSLUICE_LAYOUT_V1`) into `$OUT_DIR/layout-v1/<name>.o`, the
//! objects the upgrade test runs as the previous agent's datapath.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, exit},
};

const CLANG: &str = "clang-19";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let bpf_dir = manifest_dir.join("../../bpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    // A directory makes cargo rerun when anything under it changes, headers included.
    println!("cargo:rerun-if-changed={}", bpf_dir.display());

    let sources = match c_sources(&bpf_dir) {
        Ok(sources) => sources,
        Err(err) => fail(&format!("reading {}: {err}", bpf_dir.display())),
    };
    if sources.is_empty() {
        fail(&format!("no C sources in {}", bpf_dir.display()));
    }
    let v1_dir = out_dir.join("layout-v1");
    if let Err(err) = fs::create_dir_all(&v1_dir) {
        fail(&format!("creating {}: {err}", v1_dir.display()));
    }
    for source in sources {
        compile(&bpf_dir, &source, &out_dir, &[]);
        compile(&bpf_dir, &source, &v1_dir, &["-DSLUICE_LAYOUT_V1"]);
    }
}

fn c_sources(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut sources = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "c") {
            sources.push(path);
        }
    }
    sources.sort();
    Ok(sources)
}

fn compile(bpf_dir: &Path, source: &Path, out_dir: &Path, defines: &[&str]) {
    let stem = source.file_stem().unwrap_or_default();
    let object = out_dir.join(stem).with_extension("o");
    let output = Command::new(CLANG)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-mcpu=v3",
            "-D__TARGET_ARCH_x86",
        ])
        .args(["-Wall", "-Werror"])
        .args(defines)
        // Debian keeps asm/types.h under the multiarch directory.
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg("-I")
        .arg(bpf_dir)
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(&object)
        .output();
    match output {
        Ok(output) if output.status.success() => {}
        Ok(output) => fail(&format!(
            "{CLANG} failed on {} ({}):\n{}",
            source.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )),
        Err(err) => fail(&format!(
            "running {CLANG} (apt-get install clang-19 libbpf-dev): {err}"
        )),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    exit(1);
}
