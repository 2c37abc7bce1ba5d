"""``qlora run`` as a real child process, measured: exit code, output, wall and CPU time, peak RSS.

The hostile-input tests start the real entrypoint the way a pod does and read the kernel's own
accounting of the child (``os.wait4``), so "bounded time and memory" is measured, not assumed.
A child that outlives its limit is killed with its whole process group.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from tests.conftest import REPO

DATA = REPO / "examples" / "data" / "antonyms-chat.jsonl"


@dataclass(frozen=True)
class ChildResult:
    """What one ``qlora run`` did."""

    rc: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    max_rss_bytes: int

    def assert_user_error(self, *fragments: str, wall_s: float = 150.0) -> None:
        """Exit 2 with each fragment on stderr, no traceback, no internal error, bounded."""
        text = self.stdout + self.stderr
        assert self.rc == 2, f"exit {self.rc}, expected 2:\n{self.stderr[-3000:]}"
        assert "Traceback" not in text and "internal error" not in text, text[-3000:]
        for fragment in fragments:
            assert fragment in self.stderr, f"{fragment!r} not in:\n{self.stderr[-3000:]}"
        assert "phase training" not in self.stderr, "it must stop before training"
        assert self.wall_s < wall_s, f"took {self.wall_s:.0f} s"
        assert self.max_rss_bytes < 3 * 1024**3, f"peak RSS {self.max_rss_bytes / 1024**3:.1f} GiB"


def tiny_job(
    tmp: Path,
    model: Path,
    *,
    data: Path = DATA,
    dataset: dict[str, Any] | None = None,
    model_fields: dict[str, Any] | None = None,
    steps: int = 2,
) -> Path:
    """The shipped tiny CPU example with this test's model, data and dataset fields."""
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8"))
    body = doc["spec"]
    body["model"] = {"source": str(model), **(model_fields or {})}
    body["dataset"] = {"sources": [str(data)], "format": "messages", **(dataset or {})}
    body["dataset"].pop("eval_fraction", None)
    body["training"].update(max_steps=steps, logging_steps=1)
    body["output"]["uri"] = f"file://{tmp / 'store'}/out"
    body["metrics"] = {"enabled": False}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _drop_file_capabilities() -> None:
    """In the child, before exec: root loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so
    file modes apply to it as to any user (a ``chmod 000`` file is unreadable)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def file_modes_bind_children() -> bool:
    """Whether a child started with ``modes_apply=True`` is refused a ``chmod 000`` file (as
    root that needs CAP_SETPCAP to drop the DAC capabilities; some containers lack it)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        locked = Path(tmp) / "locked"
        locked.write_text("x")
        locked.chmod(0)
        try:
            done = subprocess.run(
                [sys.executable, "-c", f"open({str(locked)!r}).read()"],
                preexec_fn=_preexec(True),
                capture_output=True,
                check=False,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return done.returncode != 0


def _preexec(modes_apply: bool) -> Any:
    return _drop_file_capabilities if modes_apply and os.geteuid() == 0 else None


def run_qlora(
    spec: Path,
    work: Path,
    *,
    limit_s: float = 300.0,
    modes_apply: bool = False,
    env: dict[str, str | None] | None = None,
) -> ChildResult:
    """Run ``python -m runner run --spec SPEC`` to the end (killed after ``limit_s``).

    ``modes_apply``: file permission bits bind the child even when the tests run as root.
    ``env``: variables to set in the child (None removes one).
    """
    child = {
        **os.environ,
        "QLORA_WORK_DIR": str(work),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for name, value in (env or {}).items():
        if value is None:
            child.pop(name, None)
        else:
            child[name] = value
    work.mkdir(parents=True, exist_ok=True)
    out_path, err_path = work / "stdout.txt", work / "stderr.txt"
    started = time.monotonic()
    with out_path.open("w") as out, err_path.open("w") as err:
        rc, _, usage = _spawn_bounded(
            [sys.executable, "-m", "runner", "run", "--spec", str(spec)],
            child, out, err, limit_s, modes_apply)
    return ChildResult(
        rc=rc,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        wall_s=time.monotonic() - started,
        cpu_s=usage.ru_utime + usage.ru_stime,
        max_rss_bytes=usage.ru_maxrss * 1024,
    )


def _spawn_bounded(
    argv: list[str], env: dict[str, str], out: IO[str], err: IO[str], limit_s: float,
    modes_apply: bool,
) -> tuple[int, int, Any]:
    """Run ``argv`` in its own session, SIGKILL its group after ``limit_s``, and reap it with
    ``wait4`` (for its resource usage); returns (exit code, raw status, rusage)."""
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        start_new_session=True,
        preexec_fn=_preexec(modes_apply),
    )
    timer = threading.Timer(limit_s, os.killpg, (proc.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return proc.returncode, status, usage


def run_qlora_batch(
    cases: list[tuple[list[str], Path]],
    *,
    limit_s: float = 600.0,
    modes_apply: bool = False,
) -> list[ChildResult]:
    """Run each ``(qlora ARGV, work dir)`` in one child interpreter (``tests.qlora_batch``).

    Each case gets its own stdout/stderr, exit code, wall and CPU time and ``QLORA_WORK_DIR``;
    ``max_rss_bytes`` is the batch's peak, so a bound on it bounds every case. A hang kills the
    whole batch after ``limit_s`` (every case then fails).
    """
    assert cases
    first_work = cases[0][1]
    first_work.mkdir(parents=True, exist_ok=True)
    plan: list[dict[str, Any]] = []
    for argv, work in cases:
        work.mkdir(parents=True, exist_ok=True)
        plan.append(
            {
                "argv": argv,
                "env": {"QLORA_WORK_DIR": str(work)},
                "stdout": str(work / "stdout.txt"),
                "stderr": str(work / "stderr.txt"),
            }
        )
    plan_path = first_work / "batch.json"
    plan_path.write_text(json.dumps(plan), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with (first_work / "batch-stderr.txt").open("w") as err:
        rc, status, _ = _spawn_bounded(
            [sys.executable, "-m", "tests.qlora_batch", str(plan_path)],
            env, err, err, limit_s, modes_apply)
    out_file = Path(str(plan_path) + ".out")
    if rc != 0 or not out_file.is_file():
        tail = (first_work / "batch-stderr.txt").read_text(errors="replace")[-3000:]
        raise AssertionError(f"the batch child failed ({status}):\n{tail}")
    done = json.loads(out_file.read_text(encoding="utf-8"))
    return [
        ChildResult(
            rc=r["rc"],
            stdout=Path(p["stdout"]).read_text(errors="replace"),
            stderr=Path(p["stderr"]).read_text(errors="replace"),
            wall_s=r["wall_s"],
            cpu_s=r["cpu_s"],
            max_rss_bytes=done["max_rss_bytes"],
        )
        for r, p in zip(done["results"], plan, strict=True)
    ]
