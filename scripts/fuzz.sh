#!/usr/bin/env bash
# The long fuzz runs (issue 14, item 3): a million frames through from_container and
# to_container and a million through from_netdev (BPF_PROG_TEST_RUN; root, like the
# tests), then a million inputs each to the
# manifest, lab file and CNI stdin readers (release build). Each prints its figures; all
# of them also go to bench/results/fuzz/latest.txt. SLUICE_FUZZ_PACKETS and
# SLUICE_FUZZ_INPUTS change the counts, SLUICE_FUZZ_SEED (hex) the seed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the packet fuzzer loads eBPF programs: run as root" >&2; exit 1; }

export SLUICE_FUZZ_PACKETS="${SLUICE_FUZZ_PACKETS:-1000000}"
export SLUICE_FUZZ_INPUTS="${SLUICE_FUZZ_INPUTS:-1000000}"
out=bench/results/fuzz/latest.txt
mkdir -p "$(dirname "$out")"
{
    cargo test -p sluice-datapath --test fuzz_packets -- --ignored --nocapture fuzz_long
    cargo test -p sluice-datapath --test fuzz_packets -- --ignored --nocapture fuzz_netdev_long
    for campaign in manifests lab_file cni_stdin; do
        cargo test --release -p sluice-fuzz --test "$campaign" -- --ignored --nocapture "${campaign}_long"
    done
} 2>&1 | grep --line-buffered -v -E '^ +(Compiling|Finished|Running)|^running|^$' | tee "$out"
