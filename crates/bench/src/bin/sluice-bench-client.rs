//! `sluice-bench-client`: the benchmark's client as a pod's process, started by
//! `sluice-bench` in the client's namespace and cgroup (see `sluice_bench::pod_client`);
//! prints one line with what it measured.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("{}", sluice_bench::pod_client::client_main(&args)?);
    Ok(())
}
