#!/usr/bin/env bash
# scripts/tools/build-kube.sh: a real Kubernetes control plane for the integration tests.
#
# No registry we can reach ships kube-apiserver, so we build kube-apiserver, kube-scheduler,
# kube-controller-manager and kubectl (v1.20.2) from Debian bookworm's `kubernetes` source
# package, and for the one-node cluster of the end-to-end tests the kubelet from the same tree
# and the pod sandbox's pause binary (build/pause/linux/pause.c, `gcc -Os -static`; the test
# fixture wraps it in a FROM scratch image). The binaries are cached OUTSIDE the repository, in
#   ${XDG_CACHE_HOME:-$HOME/.cache}/qlora-runner/kubernetes-1.20.2/bin
# and only rebuilt when one is missing. Progress goes to stderr; the bin directory is printed on
# stdout, so callers do: QLORA_KUBE_BIN_DIR="$(bash scripts/tools/build-kube.sh)".
#
# Needs golang-go, rsync, make, patch, gcc (scripts/tools/install-system.sh) and network access to the
# Debian archive. The deb-src entry lives in a private apt directory: the system's apt sources
# are left untouched. A clean build takes about 10-17 minutes (the kubelet ~6.5 of them) and 2 GB of
# scratch space (removed afterwards); the cache holds ~460 MB.
set -euo pipefail

version="1.20.2"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/qlora-runner/kubernetes-${version}"
bin="$cache/bin"
targets=(kube-apiserver kube-scheduler kube-controller-manager kubectl)
# Bump when the recipe changes, so cached binaries of an older recipe are rebuilt.
# 2: reflect2 1.0.2 + json-iterator 1.1.12 from Debian replace the vendored copies, whose map
#    iteration crashes (SIGSEGV in mapiterinit) when built with Go >= 1.18.
recipe="2"
# The node's binaries (kubelet, pause) have their own recipe, so that adding them kept the
# control plane of a recipe-2 cache; only what is missing or stale is built.
# 1: kubelet from the same tree and flags; pause.c with gcc -Os -static.
node_targets=(kubelet pause)
node_recipe="1"

log() { echo "build-kube: $*" >&2; }

# The targets still to build: those of a stale recipe, and the missing ones.
missing_targets() {
  local t cp_ok="" node_ok=""
  [ "$(cat "$bin/.recipe" 2>/dev/null)" = "$recipe" ] && cp_ok=1
  [ -n "$cp_ok" ] && [ "$(cat "$bin/.node-recipe" 2>/dev/null)" = "$node_recipe" ] && node_ok=1
  for t in "${targets[@]}"; do
    if [ -z "$cp_ok" ] || [ ! -x "$bin/$t" ]; then echo "$t"; fi
  done
  for t in "${node_targets[@]}"; do
    if [ -z "$node_ok" ] || [ ! -x "$bin/$t" ]; then echo "$t"; fi
  done
}

have_all() { [ -z "$(missing_targets)" ]; }

if have_all; then
  echo "$bin"
  exit 0
fi

for tool in go rsync make patch apt-get tar dpkg-deb flock gcc; do
  command -v "$tool" >/dev/null || { log "missing '$tool' (run scripts/tools/install-system.sh)"; exit 10; }
done

# Serialise concurrent builds (two test runs starting at once) on one lock in the cache dir.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if have_all; then
  echo "$bin"
  exit 0
fi

work="$cache/build"
rm -rf "$work"
mkdir -p "$work/apt/lists/partial" "$work/apt/sources" "$work/home"
trap 'rm -rf "$work"' EXIT

# Reuse the machine's Debian mirror (deb822 or one-line format), defaulting to deb.debian.org.
mirror=""
if [ -r /etc/apt/sources.list.d/debian.sources ]; then
  mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources | grep -v security | head -1)"
fi
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
  mirror="$(awk '$1 == "deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
printf 'Types: deb deb-src\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: %s\n' \
  "$mirror" /usr/share/keyrings/debian-archive-keyring.gpg >"$work/apt/sources/kube-src.sources"
apt_private=(
  -o "Dir::Etc::SourceList=/dev/null"
  -o "Dir::Etc::SourceParts=$work/apt/sources"
  -o "Dir::State::Lists=$work/apt/lists"
  -o "Dir::Cache=$work/apt/cache"
  -o "APT::Sandbox::User=root"
)

log "fetching Debian's kubernetes source package from $mirror"
apt-get "${apt_private[@]}" update -qq >&2
(cd "$work" && apt-get "${apt_private[@]}" source --download-only kubernetes >&2)
# Go >= 1.18 needs reflect2 >= 1.0.2; take it (and the json-iterator that goes with it) from
# Debian's Go library packages.
go_libs=(golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)
(cd "$work" && apt-get "${apt_private[@]}" download "${go_libs[@]}" >&2)

orig="$(ls "$work"/kubernetes_*"really${version}".orig.tar.gz 2>/dev/null | head -1 || true)"
debian_tar="$(ls "$work"/kubernetes_*really"${version}"-*.debian.tar.xz 2>/dev/null | head -1 || true)"
if [ -z "$orig" ] || [ -z "$debian_tar" ]; then
  log "the source package is not kubernetes ${version}; found: $(ls "$work")"
  exit 1
fi

log "unpacking $(basename "$orig") and applying Debian's patches"
tar -C "$work" -xzf "$orig"
tar -C "$work" -xJf "$debian_tar"
src="$work/kubernetes-${version}"
[ -d "$src" ] || { log "expected $src after unpacking"; exit 1; }
while read -r p; do
  case "$p" in ''|'#'*) continue ;; esac
  patch -d "$src" -p1 -s <"$work/debian/patches/$p"
done <"$work/debian/patches/series"

for deb in "$work"/golang-github-*.deb; do
  dpkg-deb -x "$deb" "$work/golibs"
done
for lib in modern-go/reflect2 json-iterator/go; do
  from="$work/golibs/usr/share/gocode/src/github.com/$lib"
  [ -d "$from" ] || { log "no $lib in the Debian Go library packages"; exit 1; }
  rm -rf "$src/vendor/github.com/$lib"
  mkdir -p "$src/vendor/github.com/$lib"
  cp "$from"/*.go "$src/vendor/github.com/$lib/"
  rm -f "$src/vendor/github.com/$lib"/*_test.go
done
sed -i -e 's|^# github.com/modern-go/reflect2 v.*|# github.com/modern-go/reflect2 v1.0.2|' \
  -e 's|^# github.com/json-iterator/go v.*|# github.com/json-iterator/go v1.1.12|' "$src/vendor/modules.txt"

# Kubernetes 1.20 builds in GOPATH mode, through its Makefile (which generates the openapi code).
mkdir -p "$src/.go/src/k8s.io"
ln -sfn ../../.. "$src/.go/src/k8s.io/kubernetes"
mapfile -t todo < <(missing_targets)
whats=()
for t in "${todo[@]}"; do [ "$t" = pause ] || whats+=("cmd/$t"); done
rm -rf "$bin.tmp"
mkdir -p "$bin.tmp"
if [ "${#whats[@]}" -gt 0 ]; then
  log "make WHAT='${whats[*]}' (GOPROXY=off; several minutes)"
  (
    cd "$src"
    env GOPATH="$src/.go" GOCACHE="$work/gocache" CGO_ENABLED=0 GOPROXY=off GOFLAGS= \
      KUBE_GIT_VERSION="v${version}" KUBE_GIT_TREE_STATE=clean HOME="$work/home" \
      nice -n 10 make WHAT="${whats[*]}" >&2
  )
fi
# The pod sandbox's pause process, statically linked so that a FROM scratch image can run it.
gcc -Os -static -Wall -DVERSION="v${version}-qlora" -o "$bin.tmp/pause" \
  "$src/build/pause/linux/pause.c"
for t in "${targets[@]}" kubelet; do
  if [ -f "$src/_output/bin/$t" ]; then
    cp "$src/_output/bin/$t" "$bin.tmp/$t"
  else
    cp "$bin/$t" "$bin.tmp/$t"
  fi
done
chmod 0755 "$bin.tmp"/*
echo "$recipe" >"$bin.tmp/.recipe"
echo "$node_recipe" >"$bin.tmp/.node-recipe"
# One rename per file: a test starting a binary from the cache meanwhile finds the old or the new.
mkdir -p "$bin"
for f in "${targets[@]}" "${node_targets[@]}" .recipe .node-recipe; do mv -f "$bin.tmp/$f" "$bin/$f"; done
rm -rf "$bin.tmp"
log "$("$bin/kube-apiserver" --version) built into $bin"
echo "$bin"
