#!/usr/bin/env bash
# scripts/tools/install-system.sh: Debian packages the integration tests start as real servers:
# Prometheus + Pushgateway (+ promtool), etcd, and the Go toolchain that builds kube-apiserver;
# for the one-node cluster of the end-to-end tests, containerd with runc, the CNI plugins
# (loopback) and a C compiler with a static libc (the pause binary).
# Idempotent; needs root (CI runs as root). Nothing is started here: the tests start each
# server on 127.0.0.1 and stop it.
set -euo pipefail
pkgs=(prometheus prometheus-pushgateway etcd-server golang-go rsync make patch openssl curl
      containerd runc containernetworking-plugins gcc libc6-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
