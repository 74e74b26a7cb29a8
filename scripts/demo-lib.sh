# Sourced by the demos: installs what they need, builds the release binaries, and defines
# `sl` (sluice on this demo's lab, taken down on exit) and `step` (a heading).
# Usage: demo_init <lab name prefix>
demo_init() {
  bash scripts/setup.sh
  cargo build --release --bins
  export PATH="$PWD/target/release:$PATH"
  export SLUICE_LAB_STATE="${SLUICE_LAB_STATE:-/run/sluice/labs}"
  lab="$1-$$"
  trap 'sl lab down >/dev/null 2>&1 || true' EXIT
}
sl() { sluice --lab "$lab" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
