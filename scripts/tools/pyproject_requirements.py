#!/usr/bin/env python3
"""Print the requirements of pyproject.toml's dependencies plus the given extras, one a line.

The image build installs these in their own layer before it copies the source, so a change to
runner/ rebuilds only the small last layer, not the 1-5 GB of dependencies. Extras that name
the project itself (``qlora-runner[train]``) are expanded. Standard library only: it runs on
the base image's bare Python.

Usage: pyproject_requirements.py PYPROJECT EXTRAS   (EXTRAS: comma-separated, may be empty)
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(project: dict[str, object], extras: list[str]) -> list[str]:
    name = str(project["name"])
    optional = project.get("optional-dependencies", {})
    assert isinstance(optional, dict)
    out: list[str] = [str(d) for d in project.get("dependencies", [])]  # type: ignore[attr-defined]
    seen: set[str] = set()
    todo = [e for e in extras if e]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"EXTRAS: {extra!r} is not an extra of {name} ({', '.join(optional)})")
        seen.add(extra)
        for req in optional[extra]:
            self_ref = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", req.replace(" ", ""))
            if self_ref:
                todo.extend(self_ref.group(1).split(","))
            else:
                out.append(req)
    return list(dict.fromkeys(out))


def main() -> None:
    with open(sys.argv[1], "rb") as f:
        project = tomllib.load(f)["project"]
    extras = [e.strip() for e in sys.argv[2].split(",")] if len(sys.argv) > 2 else []
    print("\n".join(requirements(project, extras)))


if __name__ == "__main__":
    main()
