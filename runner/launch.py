"""``qlora run`` over several GPUs: re-execute under ``torchrun``, and be the group's parent.

When the plan (``plan.json`` beside the spec) or the spec asks for more than one rank and the
process was not started by torchrun, ``qlora run`` starts
``python -m torch.distributed.run ... -m runner run --spec FILE`` and waits for it:

* one node: ``--standalone --nproc-per-node N`` (a local c10d rendezvous on a free port);
* several nodes (an Indexed Job's pods): a static rendezvous, ``--nnodes M --node-rank I``
  with ``I`` from ``JOB_COMPLETION_INDEX`` and the master at ``QLORA_MASTER_ADDR`` /
  ``QLORA_MASTER_PORT`` (index 0's stable hostname in the rendered Job or JobSet); in a
  Kubeflow Trainer pod from ``PET_NODE_RANK`` / ``PET_MASTER_ADDR`` / ``PET_MASTER_PORT``.

The parent stays the pod's main process. torchrun's own SIGTERM handling would kill the
workers 30 s later, too soon for a checkpoint, so the parent forwards SIGTERM straight to
the workers (each writes its pid into the run directory); they agree on a step, rank 0
commits one checkpoint, and every rank exits 7. The group's exit code is rank 0's, else the
first failing rank's (each rank writes its code there too), else torchrun's. A rank that
dies makes torchrun stop the others at once, so the group fails promptly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from runner.errors import ExitCode, SpecError

log = logging.getLogger(__name__)

RANK_DIR_ENV = "QLORA_RANK_DIR"
"""Where each rank writes ``rank-<r>.pid`` and ``rank-<r>.exit`` for the parent."""
MASTER_ADDR_ENV = "QLORA_MASTER_ADDR"
MASTER_PORT_ENV = "QLORA_MASTER_PORT"
NODE_RANK_ENV = "JOB_COMPLETION_INDEX"
"""Set by Kubernetes on every pod of an Indexed Job (and by JobSet / Trainer pods)."""
DEFAULT_MASTER_PORT = 29500
TRAINER_ENV = {
    NODE_RANK_ENV: "PET_NODE_RANK",
    MASTER_ADDR_ENV: "PET_MASTER_ADDR",
    MASTER_PORT_ENV: "PET_MASTER_PORT",
}
"""What a Kubeflow Trainer torch runtime sets instead (torchrun's own ``PET_*`` defaults)."""


def rendezvous_env(env: dict[str, str]) -> dict[str, str]:
    """The node rank, master address and port: ours (Indexed Job, JobSet), else a Kubeflow
    Trainer pod's ``PET_*`` equivalents."""
    out = {}
    for ours, trainer in TRAINER_ENV.items():
        value = env.get(ours) or env.get(trainer)
        if value:
            out[ours] = value
    return out


@dataclass(frozen=True)
class Layout:
    """GPUs per node and nodes of this run (from ``plan.json``, else the spec)."""

    gpus_per_node: int = 1
    nodes: int = 1

    @property
    def world_size(self) -> int:
        """Ranks in all."""
        return self.gpus_per_node * self.nodes


def layout_for(spec_path: str) -> Layout:
    """The layout ``plan.json`` beside the spec fixes, else the spec's integers ('auto' = 1).

    Only reads the two files: the spec is validated properly by the run itself.
    """
    path = Path(spec_path)
    plan = path.parent / "plan.json"
    try:
        found = plan.is_file()
    except OSError:  # the run itself reports a directory it may not read
        return Layout()
    if found:
        try:
            d = json.loads(plan.read_text(encoding="utf-8"))
            return Layout(int(d.get("gpus_per_node", 1)), int(d.get("nodes", 1)))
        except (OSError, ValueError, TypeError, AttributeError, RecursionError):
            return Layout()  # the run reports a broken plan.json with its own message
    try:
        from runner.spec import load_spec

        res = load_spec(str(path)).spec.resources
    except Exception:  # the run itself reports an unreadable spec
        return Layout()
    g = res.gpus_per_node if isinstance(res.gpus_per_node, int) else 1
    n = res.nodes if isinstance(res.nodes, int) else 1
    return Layout(g, n)


def torchrun_command(layout: Layout, spec_path: str, env: dict[str, str]) -> list[str]:
    """The ``torchrun`` command line for ``layout`` (see the module docstring).

    Raises:
        SpecError: several nodes, but the Indexed Job environment is missing.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
           str(layout.gpus_per_node), "--max-restarts", "0"]
    if layout.nodes == 1:
        cmd += ["--standalone"]
    else:
        env = rendezvous_env(env)
        missing = [k for k in (NODE_RANK_ENV, MASTER_ADDR_ENV) if not env.get(k)]
        if missing:
            raise SpecError(
                f"resources.nodes {layout.nodes}: {', '.join(missing)} not set; a run over "
                "several nodes is started by the rendered Indexed Job (or with that "
                "environment by hand)"
            )
        cmd += [
            "--nnodes", str(layout.nodes),
            "--node-rank", env[NODE_RANK_ENV],
            "--rdzv-backend", "static",
            "--master-addr", env[MASTER_ADDR_ENV],
            "--master-port", env.get(MASTER_PORT_ENV) or str(DEFAULT_MASTER_PORT),
        ]  # fmt: skip
    return [*cmd, "-m", "runner", "run", "--spec", spec_path]


def run_group(layout: Layout, spec_path: str, log_args: list[str]) -> int:
    """Start the ranks under torchrun, forward SIGTERM to them, return the group's exit code."""
    env = dict(os.environ)
    cmd = torchrun_command(layout, spec_path, env)
    if log_args:
        cmd[cmd.index("runner") + 1 : cmd.index("runner") + 1] = log_args
    with tempfile.TemporaryDirectory(prefix="qlora-ranks-") as rank_dir:
        env[RANK_DIR_ENV] = rank_dir
        log.info(
            "world size %d: starting %s",
            layout.world_size,
            " ".join(cmd[1:]),
            extra={"world_size": layout.world_size},
        )
        proc = subprocess.Popen(cmd, env=env)  # our own interpreter and module

        def forward(signum: int, frame: FrameType | None) -> None:
            pids = _rank_pids(Path(rank_dir))
            log.warning("SIGTERM: forwarding to %d rank(s)", len(pids))
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            rc = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        return group_exit_code(Path(rank_dir), rc)


def _rank_pids(rank_dir: Path) -> list[int]:
    pids = []
    for f in sorted(rank_dir.glob("rank-*.pid")):
        try:
            pids.append(int(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return pids


def group_exit_code(rank_dir: Path, torchrun_rc: int) -> int:
    """Rank 0's exit code if it recorded a failure or success, else the first failing rank's,
    else torchrun's (a rank killed before it could record anything)."""
    codes: dict[int, int] = {}
    for f in rank_dir.glob("rank-*.exit"):
        try:
            codes[int(f.stem.split("-")[1])] = int(f.read_text(encoding="utf-8"))
        except (OSError, ValueError, IndexError):
            continue
    if torchrun_rc == 0:
        return 0
    if codes.get(0):
        return codes[0]
    failing = [c for _, c in sorted(codes.items()) if c]
    if failing:
        return failing[0]
    return torchrun_rc if torchrun_rc > 0 else int(ExitCode.INTERNAL)


def record_pid(rank: int) -> None:
    """Called by each rank at start: the parent forwards SIGTERM to this pid."""
    rank_dir = os.environ.get(RANK_DIR_ENV)
    if rank_dir:
        Path(rank_dir, f"rank-{rank}.pid").write_text(str(os.getpid()), encoding="utf-8")


def record_exit(rank: int, code: int) -> None:
    """Called by each rank at its end: its exit code, for :func:`group_exit_code`."""
    rank_dir = os.environ.get(RANK_DIR_ENV)
    if rank_dir:
        Path(rank_dir, f"rank-{rank}.exit").write_text(str(code), encoding="utf-8")
