#!/usr/bin/env bash
# Coverage-guided fuzzing of the manifest reader and the compiler with AFL++ (issue 14,
# item 3), on stable Rust through cargo-afl: `cargo install cargo-afl` once (it builds
# AFL++ itself). Seeds are the compiler's table-test inputs and the example manifests; the
# run lasts SECONDS (default 600) and fails if AFL++ kept a crash. The harness is
# fuzz/afl (a workspace of its own, so the project's builds never compile AFL++).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
command -v cargo-afl >/dev/null || { echo "cargo-afl is missing: cargo install cargo-afl" >&2; exit 1; }

work="$(mktemp -d /tmp/sluice-afl.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/seeds"
for input in crates/compiler/testdata/*/input.yaml; do
    # The first document is the table test's own header.
    sed '1,/^---$/d' "$input" > "$work/seeds/$(basename "$(dirname "$input")").yaml"
done
for manifest in examples/*.yaml; do
    case "$(basename "$manifest")" in lab*) continue ;; esac
    cp "$manifest" "$work/seeds/example-$(basename "$manifest")"
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}/afl"
(cd fuzz/afl && cargo afl build --release)
# No system settings are changed: AFL++ is told to run without them.
AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
    cargo afl fuzz -i "$work/seeds" -o "$work/out" -V "$seconds" \
    "$CARGO_TARGET_DIR/release/sluice-afl" > "$work/afl.log" 2>&1 || {
    tail -20 "$work/afl.log" >&2
    exit 1
}
stats="$work/out/default/fuzzer_stats"
grep -E '^(run_time|execs_done|execs_per_sec|corpus_count|edges_found|total_edges|bitmap_cvg|stability|saved_crashes|saved_hangs) ' "$stats"
crashes="$(awk '$1 == "saved_crashes" {print $3}' "$stats")"
[ "$crashes" = 0 ] || { cp -r "$work/out/default/crashes" ./afl-crashes; echo "crashes kept in afl-crashes/" >&2; exit 1; }
