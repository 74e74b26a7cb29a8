#!/usr/bin/env bash
# Every test: unit, compiler table tests, datapath (BPF_PROG_TEST_RUN), and lab integration
# tests with real packets between network namespaces. Needs root, like CI.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
[ "$(id -u)" = 0 ] || { echo "tests load eBPF programs and create network namespaces: run as root" >&2; exit 1; }

cargo fmt --all -- --check
# The lints the workspace declares (unwrap_used, dbg_macro, ...) hold only if something runs them.
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
# The lab integration tests start these binaries as agents and pod servers.
export SLUICE_BIN="$PWD/target/debug/sluice"
export SLUICE_AGENT_BIN="$PWD/target/debug/sluice-agent"
# The containerd test installs this as the node's CNI plugin.
export SLUICE_CNI_BIN="$PWD/target/debug/sluice-cni"
cargo test --workspace --all-targets --no-fail-fast -- "$@"
