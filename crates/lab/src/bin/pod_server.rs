//! `sluice-lab-pod-server lab pod-server --netns <ns> --name <pod> [--tcp 80,81] [--udp 53]
//! --ready-file <path>`: the same arguments `sluice lab pod-server` takes, so the lab's tests
//! and benchmarks can run pods without the CLI.

use std::{path::PathBuf, process::ExitCode};

fn ports(value: &str) -> Result<Vec<u16>, String> {
    value
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().map_err(|_| format!("bad port {p:?}")))
        .collect()
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    if (args.next().as_deref(), args.next().as_deref()) != (Some("lab"), Some("pod-server")) {
        return Err("usage: sluice-lab-pod-server lab pod-server --netns <ns> --name <pod> [--tcp ports] [--udp ports] --ready-file <path>".into());
    }
    let (mut netns, mut name, mut ready_file) = (None, None, None);
    let (mut tcp, mut udp) = (Vec::new(), Vec::new());
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--netns" => netns = Some(value),
            "--name" => name = Some(value),
            "--tcp" => tcp = ports(&value)?,
            "--udp" => udp = ports(&value)?,
            "--ready-file" => ready_file = Some(PathBuf::from(value)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let netns = netns.ok_or("--netns is required")?;
    let name = name.ok_or("--name is required")?;
    let ready_file = ready_file.ok_or("--ready-file is required")?;
    sluice_lab::serve_pod(&netns, &name, &tcp, &udp, &ready_file).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pod server: {e}");
            ExitCode::FAILURE
        }
    }
}
