"""Several ``qlora`` commands in one child interpreter: the cost of importing torch and
transformers is paid once, not once per hostile case.

``python -m tests.qlora_batch PLAN.json`` reads a list of cases (``argv``, ``env``, ``stdout``
and ``stderr`` file paths) and runs each through :func:`runner.cli.main`, exactly the entry
point ``python -m runner`` calls, with file descriptors 1 and 2 pointed at that case's files
(so C-level output lands there too) and its own environment overlay. It writes
``PLAN.json.out`` with each case's exit code and wall/CPU seconds, and the process's peak RSS.

Used by :func:`tests.qlora_child.run_qlora_batch`; a case that hangs is caught by that
function's wall-clock limit, which kills the whole batch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _run_case(case: dict[str, Any]) -> dict[str, object]:
    from runner.cli import main

    saved_env = dict(os.environ)
    os.environ.update({str(k): str(v) for k, v in dict(case.get("env") or {}).items()})
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = os.open(str(case["stdout"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(str(case["stderr"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    wall, cpu = time.monotonic(), time.process_time()
    try:
        try:
            rc = main([str(a) for a in case["argv"]])
        except SystemExit as e:  # argparse, or a command that exits itself
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException as e:
            print(f"Traceback (batch child): {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, out, err):
            os.close(fd)
        os.environ.clear()
        os.environ.update(saved_env)
    return {"rc": rc, "wall_s": time.monotonic() - wall, "cpu_s": time.process_time() - cpu}


def main(plan_path: str) -> int:
    """Run every case of ``plan_path``; write the results beside it."""
    cases = json.loads(Path(plan_path).read_text(encoding="utf-8"))
    results = [_run_case(case) for case in cases]
    # VmHWM starts afresh at exec; getrusage would include the forked parent's pages.
    with open("/proc/self/status", encoding="ascii") as f:
        peak = 1024 * int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    Path(plan_path + ".out").write_text(
        json.dumps({"results": results, "max_rss_bytes": peak}), encoding="utf-8"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
