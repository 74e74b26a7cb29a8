#!/usr/bin/env bash
# The benchmark matrix: sluice, kube-proxy's iptables and nftables rules and the bare path,
# side by side in namespaces it creates (needs root), the cross-node variants (bare
# routing, sluice tunnel, sluice native between two node namespaces) and the NodePort and
# LoadBalancer variants (a world host through node-a to a pod on node-b). Writes
# bench/results/latest/report.md and its charts. `--quick`: N = 1 and 1k, one repetition, short runs (under 2 minutes).
# `--cluster [--cluster-scale F] [--churn-seconds S]`: the simulated cluster (one agent fed
# by the fake API server with 7,500 nodes, 200,000 pods, 10,000 Services...), written to
# bench/results/cluster/report.md.
# Other arguments go to sluice-bench (see `sluice-bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
[ "$(id -u)" = 0 ] || { echo "the benchmark creates network namespaces and loads eBPF: run as root" >&2; exit 1; }

cargo build --release -p sluice-bench -p sluice-agent
target="${CARGO_TARGET_DIR:-$PWD/target}"
export SLUICE_AGENT_BIN="$target/release/sluice-agent"
out=bench/results/latest
[ "${1:-}" = --quick ] && out=bench/results/quick
# `--agent-idle 1,1000,10000,100000`: only the idle agent's CPU and RSS at each N (about 4 min).
[ "${1:-}" = --agent-idle ] && out=bench/results/agent-idle
# --cluster: the simulated cluster at GKE's limits instead of the matrix (about 20 minutes).
[ "${1:-}" = --cluster ] && out=bench/results/cluster
# An --out of the caller's wins over the default.
for arg in "$@"; do [ "$arg" = --out ] && exec "$target/release/sluice-bench" "$@"; done
exec "$target/release/sluice-bench" --out "$out" "$@"
