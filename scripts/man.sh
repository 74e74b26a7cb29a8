#!/usr/bin/env bash
# Writes sluice's manual pages (one per command, from the clap definitions) into DIR
# (default target/man): bash scripts/man.sh [DIR]; then `man -l DIR/sluice-lab-apply.1`.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/man}
cargo build -q -p sluice-cli
target=${CARGO_TARGET_DIR:-target}
"$target/debug/sluice" man --dir "$dir"
