#!/usr/bin/env python3
"""Hand this machine's pip configuration to an image build without leaving it in the image.

pip on a build machine is often configured to reach the package index through a proxy with its
own CA, with local wheel folders (``find-links``, ``file://`` indexes) and constraint files. A
``RUN pip install`` step inside the build needs the same settings, but none of them belongs in
the image: a CA bundle or an index URL with a token would be a credential in a layer, and a
``-v`` volume leaves an empty mount point behind. So this script reads pip's merged
configuration (``pip config list``: files, then ``PIP_*`` variables, later ones winning) and
translates it into ``podman build`` arguments:

* the settings, rewritten to the paths they have inside the build, become a pip config file
  passed as the build secret ``pip-conf`` (a secret, not ``--build-arg``s: build args are
  recorded in the image history, and an index URL may carry credentials);
* the CA bundle (``cert``) is the build secret ``pip-ca``;
* each local package folder is a named build context ``pip-local-N``, which the Dockerfile
  mounts with ``RUN --mount=type=bind,from=pip-local-N`` at ``/tmp/pip-local-N``; a ``file://``
  index is mounted from its parent folder, since simple indexes link to files beside them
  (``../../files/...``);
* small local files (constraints, requirements) are copied into one generated context
  ``pip-files`` (mounted at ``/tmp/pip-files``).

Unused slots are given an empty folder, so the Dockerfile's mounts always resolve. The
arguments are printed NUL-separated for ``read -d ''``. Exit 2 with a ``key: message`` line when
the configuration cannot be passed (more local folders than the Dockerfile has slots, a setting
naming a file that does not exist).
"""

from __future__ import annotations

import argparse
import configparser
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

# Must match the pip-local-N stages and mounts in the Dockerfile.
LOCAL_SLOTS = 4
IN_BUILD_LOCAL = "/tmp/pip-local-{n}"
IN_BUILD_FILES = "/tmp/pip-files"
IN_BUILD_CA = "/tmp/pip-ca"
# Settings naming local folders or URLs (several values separated by whitespace).
LOCATION_KEYS = {"find-links", "index-url", "extra-index-url"}
# Settings naming local files copied into the pip-files context.
FILE_KEYS = {"constraint", "requirement", "build-constraint"}
# Settings that would break or change the build's own pip if passed on.
DROPPED_KEYS = {"target", "prefix", "root", "user", "src", "cache-dir", "log", "config-file"}


class ConfigError(Exception):
    """A pip setting that cannot be carried into the build."""


def read_pip_config(pip: list[str]) -> dict[str, str]:
    """pip's merged settings, ``install`` overriding ``global``, environment last."""
    try:
        out = subprocess.run(
            [*pip, "config", "list"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"pip configuration: none read ({' '.join(pip)} config list: {e})", file=sys.stderr)
        return {}
    merged: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, raw = line.partition("=")
        if not sep:
            continue
        section, _, key = name.rpartition(".")
        if section not in {"global", "install", ":env:"}:
            continue
        value = raw.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        merged[key.strip()] = value
    return merged


class Translator:
    """Rewrites settings to in-build paths and records what the build must be given."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.folders: list[Path] = []
        self.files_dir = out_dir / "files"
        self.ca: Path | None = None

    def folder(self, key: str, path: Path) -> str:
        if not path.is_dir():
            raise ConfigError(f"{key}: {path} is not a folder on this machine")
        path = path.resolve()
        if path not in self.folders:
            if len(self.folders) == LOCAL_SLOTS:
                raise ConfigError(
                    f"{key}: pip's configuration names more than {LOCAL_SLOTS} local folders; "
                    "the Dockerfile mounts at most that many (add pip-local slots)"
                )
            self.folders.append(path)
        return IN_BUILD_LOCAL.format(n=self.folders.index(path))

    def location(self, key: str, value: str) -> str:
        url = urlparse(value)
        if url.scheme not in {"", "file"}:
            return value  # a remote index: passed on as it is
        path = Path(unquote(url.path) if url.scheme == "file" else value)
        if not path.is_absolute():
            raise ConfigError(
                f"{key}: {value!r} is a relative path; pip's settings need absolute ones"
            )
        if key == "find-links" and path.is_dir():
            return self.folder(key, path)
        # A simple index (or a single file): mount its parent so relative links resolve.
        inside = self.folder(key, path.parent)
        return (
            "file://" + inside + "/" + path.name
            if url.scheme == "file"
            else inside + "/" + path.name
        )

    def file(self, key: str, value: str) -> str:
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{key}: {value} is not a file on this machine")
        self.files_dir.mkdir(parents=True, exist_ok=True)
        n = len(list(self.files_dir.iterdir()))
        target = self.files_dir / f"{n}-{path.name}"
        shutil.copyfile(path, target)
        return f"{IN_BUILD_FILES}/{target.name}"

    def translate(self, settings: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in settings.items():
            if key in DROPPED_KEYS:
                continue
            if key == "cert":
                path = Path(value)
                if not path.is_file():
                    raise ConfigError(f"cert: {value} is not a file on this machine")
                self.ca = path
                out[key] = IN_BUILD_CA
            elif key == "client-cert":
                raise ConfigError("client-cert: client certificates are not passed into builds")
            elif key in LOCATION_KEYS:
                out[key] = " ".join(self.location(key, v) for v in value.split())
            elif key in FILE_KEYS:
                out[key] = " ".join(self.file(key, v) for v in value.split())
            else:
                out[key] = value
        return out


def build_args(out_dir: Path, settings: dict[str, str]) -> list[str]:
    """The ``podman build`` arguments that carry ``settings`` in; files go under ``out_dir``."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "empty").mkdir(parents=True)
    tr = Translator(out_dir)
    conf = tr.translate(settings)
    tr.files_dir.mkdir(exist_ok=True)
    parser = configparser.ConfigParser(interpolation=None)
    parser["global"] = conf
    conf_file = out_dir / "pip.conf"
    with conf_file.open("w", encoding="utf-8") as f:
        parser.write(f)
    conf_file.chmod(0o600)
    args = [f"--secret=id=pip-conf,src={conf_file}"]
    if tr.ca is not None:
        args.append(f"--secret=id=pip-ca,src={tr.ca}")
    for n in range(LOCAL_SLOTS):
        src = tr.folders[n] if n < len(tr.folders) else out_dir / "empty"
        args.append(f"--build-context=pip-local-{n}={src}")
    args.append(f"--build-context=pip-files={tr.files_dir}")
    return args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="scratch folder for generated files")
    ap.add_argument(
        "--pip", default=f"{sys.executable} -m pip", help="the pip whose config to read"
    )
    ns = ap.parse_args(argv)
    try:
        args = build_args(ns.out, read_pip_config(ns.pip.split()))
    except ConfigError as e:
        print(f"pip configuration: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(a + "\0" for a in args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
