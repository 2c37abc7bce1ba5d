#!/usr/bin/env bash
# scripts/build-image.sh [--variant cpu|gpu] [--tag REF] [--containers-conf]
#
# Builds the project's Dockerfile with podman on a machine that can reach nothing but Debian's
# archive and a Python package index, which is what CI is:
#   1. installs podman, buildah, runc and debootstrap from Debian if missing (idempotent; root);
#   2. makes a Debian bookworm base (debootstrap minbase + python3, python3-venv,
#      ca-certificates) once, cached OUTSIDE the repository in
#        ${XDG_CACHE_HOME:-$HOME/.cache}/qlora-runner/image/
#      and imports it into podman as localhost/qlora-base:bookworm;
#   3. writes a private containers.conf there (runc, cgroupfs, ulimits no higher than this
#      host's hard limits: a VM without CAP_SYS_RESOURCE cannot raise them);
#   4. passes pip's own configuration of this machine into the build without leaving any of
#      it in the image (scripts/tools/pip_build_context.py): the CA bundle and the settings as
#      build secrets, local package folders as named build contexts;
#   5. builds (`--pull=never --network host --runtime runc`) and prints the image reference on
#      stdout. Progress goes to stderr.
#
# Variants: cpu (default; the CI image: extras train,k8s and the CPU torch 2.13.0 wheel) and
# gpu (extras gpu,k8s, i.e. Unsloth and PyPI's CUDA torch, plus gcc and Python headers for
# Triton). --containers-conf only writes the containers.conf and prints its path, for callers
# that run the image: CONTAINERS_CONF="$(bash scripts/build-image.sh --containers-conf)".
set -euo pipefail
cd "$(dirname "$0")/.."

variant=cpu
tag=""
conf_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --containers-conf) conf_only=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$variant" in
  cpu) extras="train,k8s"; torch="torch==2.13.0" ;;
  gpu) extras="gpu,k8s"; torch="" ;;
  *) echo "build-image.sh: --variant: '$variant' is not cpu or gpu" >&2; exit 2 ;;
esac
version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
tag="${tag:-localhost/qlora-runner:${version}-${variant}}"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/qlora-runner/image"
base_ref="localhost/qlora-base:bookworm"
# Bump when the base recipe changes, so a cached base of an older recipe is rebuilt.
base_recipe="1"
log() { echo "build-image: $*" >&2; }
mkdir -p "$cache"

# --- 3. a private containers.conf -------------------------------------------------------------
write_conf() {
  local nofile nproc
  nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"
  [ "$nofile" = unlimited ] && nofile=1048576
  # conmon runs the container with nproc capped at 32768 on these VMs; never ask for more.
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
  cat >"$cache/containers.conf.tmp" <<CONF
# Written by scripts/build-image.sh; used through CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
  mv "$cache/containers.conf.tmp" "$cache/containers.conf"
}
write_conf
export CONTAINERS_CONF="$cache/containers.conf"
if [ "$conf_only" = 1 ]; then
  echo "$CONTAINERS_CONF"
  exit 0
fi

# Serialise concurrent builds (two test runs at once) on one lock in the cache dir.
exec 9>"$cache/.lock"
flock 9

# --- 1. system packages ------------------------------------------------------------------------
pkgs=(podman buildah runc debootstrap containernetworking-plugins conmon uidmap)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- 2. the Debian base ------------------------------------------------------------------------
mirror=""
if [ -r /etc/apt/sources.list.d/debian.sources ]; then
  mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources | grep -v security | head -1)"
fi
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
  mirror="$(awk '$1 == "deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
tarball="$cache/debian-bookworm-${base_recipe}.tar"
if [ ! -s "$tarball" ]; then
  log "debootstrap bookworm from $mirror (about a minute)"
  root="$cache/rootfs.tmp"
  rm -rf "$root"
  t0=$SECONDS
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { log "debootstrap failed; see $cache/debootstrap.log"; tail -5 "$cache/debootstrap.log" >&2; exit 1; }
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log
  # Images have no host resolver or hostname of their own; the runtime provides both.
  : >"$root/etc/resolv.conf"; : >"$root/etc/hostname"
  tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf "$root"
  log "base made in $((SECONDS - t0)) s: $(du -h "$tarball" | cut -f1)"
fi
want_base="$(sha256sum "$tarball" | cut -c1-16)"
have_base="$(podman image inspect --format '{{index .Labels "org.qlora-runner.base.sha256"}}' "$base_ref" 2>/dev/null || true)"
if [ "$have_base" != "$want_base" ]; then
  log "importing the base as $base_ref"
  podman import --change "LABEL org.qlora-runner.base.sha256=${want_base}" \
    --change 'CMD ["/bin/bash"]' "$tarball" "$base_ref" >/dev/null
fi

# --- 4./5. pip's configuration and the build -------------------------------------------------
ctx_args=()
while IFS= read -r -d '' a; do ctx_args+=("$a"); done < <(python3 scripts/tools/pip_build_context.py --out "$cache/pip")

log "podman build $tag (variant $variant, extras $extras)"
t0=$SECONDS
podman build --format docker --runtime runc --pull=never --network host \
  --build-arg BASE_IMAGE="$base_ref" \
  --build-arg EXTRAS="$extras" \
  --build-arg TORCH="$torch" \
  --build-arg VERSION="$version" \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  "${ctx_args[@]}" \
  -t "$tag" . >&2
log "built $tag in $((SECONDS - t0)) s ($(podman image inspect --format '{{.Size}}' "$tag") bytes)"
echo "$tag"
