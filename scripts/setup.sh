#!/usr/bin/env bash
# Installs everything sluice needs to build, run the lab and run the tests on Debian bookworm as root.
# Idempotent: a second run installs nothing and only re-checks.
set -euo pipefail

PACKAGES=(clang-19 llvm-19 libbpf-dev libelf-dev zlib1g-dev linux-libc-dev bpftool iproute2 ethtool curl
          procps psmisc util-linux iputils-ping tcpdump socat jq iptables nftables fonts-dejavu-core
          python3 python3-venv
          # The containerd tests: a private containerd driven through its CRI (protoc builds the
          # client), the reference CNI plugins, and a static pause program for the sandbox image.
          containerd runc containernetworking-plugins protobuf-compiler gcc libc6-dev)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# bpffs holds the pinned maps; a fresh VM may not have it mounted.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpffs /sys/fs/bpf
fi

# kubernetes-validate checks deploy/'s manifests against the Kubernetes API schemas
# (crates/agent/tests/deploy.rs); in a venv of its own, at a fixed path the test knows.
KUBERNETES_VALIDATE_VENV=/opt/sluice/venv
KUBERNETES_VALIDATE_VERSION=1.34.1
if [ "$("$KUBERNETES_VALIDATE_VENV/bin/kubernetes-validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  echo "setup: installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION in $KUBERNETES_VALIDATE_VENV"
  /usr/bin/python3 -m venv "$KUBERNETES_VALIDATE_VENV"
  "$KUBERNETES_VALIDATE_VENV/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

command -v cargo >/dev/null || { echo "setup: cargo not found (install Rust 1.95 with rustup)" >&2; exit 1; }
command -v clang-19 >/dev/null || { echo "setup: clang-19 missing after install" >&2; exit 1; }
