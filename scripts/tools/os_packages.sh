#!/bin/sh
# scripts/tools/os_packages.sh EXTRAS: the OS packages the image needs on top of BASE_IMAGE,
# run inside the image build (bind-mounted, so it stays out of the image). Any Debian or Ubuntu
# base works: Python 3 and venv are installed only when the base lacks them; a GPU image
# (EXTRAS containing gpu) also gets a C compiler and the headers of the Python it runs, which
# Triton compiles a small launcher against the first time a kernel runs. Versions come from the
# base's own release; nothing is installed when the base already has everything (the CI base).
set -eu
extras="${1:-}"
install() {
  echo "os_packages: apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2068
  apt-get install -y -qq --no-install-recommends $@
  apt-get clean
  rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/* /var/log/apt /var/log/dpkg.log
}
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  install python3 python3-venv
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "os_packages: BASE_IMAGE has Python $(python3 -V 2>&1); qlora-runner needs Python >= 3.11" >&2
  exit 1
}
case ",$extras," in
  *,gpu,*)
    pkgs=""
    command -v cc >/dev/null 2>&1 || pkgs="gcc libc6-dev"
    python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
      || pkgs="$pkgs python3-dev"
    if [ -n "$pkgs" ]; then install $pkgs; fi
    ;;
esac
