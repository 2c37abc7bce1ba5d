"""Data parallelism on the CPU: ``qlora run`` under torchrun with two gloo ranks, for real.

Each test starts ``python -m runner run`` in a subprocess, as a pod does; the spec asks for
``resources.gpus_per_node: 2``, so the runner re-executes itself under ``torchrun`` with two
ranks. What is asserted is what would go wrong silently: both ranks really formed one group
(world size 2 logged by each; without it accelerate runs two independent trainings), their
LoRA weights are identical, one adapter and one checkpoint reach the store, the adapter
matches a one-process run of the same effective batch, a killed rank fails the group at once,
and SIGTERM gives one committed checkpoint that a one-process run resumes from.

Kept tiny (a handful of steps of the tiny model) because CI has two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.deadline import POD_NAME_ENV
from tests.conftest import REPO, STRICT

try:
    import safetensors.torch
    import torch
except ImportError:
    if STRICT:
        raise
    pytest.skip("the train extra is not installed", allow_module_level=True)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

DATA = REPO / "examples" / "data" / "antonyms-chat.jsonl"
ADAPTER_TOLERANCE = 0.05
"""Largest relative difference (Frobenius norm of the difference over the norm of the
one-process weights, all lora_B tensors together; lora_B starts at zero, so this is the
trained update) between the adapter two ranks trained and the one a single process trained on
the same samples. Not bitwise: gloo's all-reduce and the per-rank loss normalisation sum in
another order, and Adam turns float noise in near-zero gradients into full-size steps for a
few elements. Different samples give a difference of the order of the update itself."""


def write_spec(
    tmp: Path,
    model: Path,
    store: Path,
    *,
    gpus: int,
    micro: int,
    steps: int,
    name: str = "j",
    nodes: int = 1,
) -> Path:
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8"))
    body = doc["spec"]
    body["model"]["source"] = str(model)
    body["dataset"]["sources"] = [str(DATA)]
    body["dataset"]["eval_fraction"] = 0.0
    body["training"].update(
        max_steps=steps,
        micro_batch_size=micro,
        gradient_accumulation_steps=1,
        target_effective_batch_size=8,
        logging_steps=1,
        checkpoint_every_minutes=None,
    )
    body["output"]["uri"] = f"file://{store}"
    body["resources"] = {"gpus_per_node": gpus, "nodes": nodes}
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def start(spec: Path, work: Path, **env: str) -> subprocess.Popen[str]:
    full = {
        **os.environ,
        "QLORA_WORK_DIR": str(work),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "QLORA_DDP_TIMEOUT_S": "60",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "runner", "--log-format", "json", "run", "--spec", str(spec)],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(work.parent),
    )


def records(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def by_message(recs: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [r for r in recs if str(r.get("msg", "")).startswith(prefix)]


def adapter(store: Path) -> dict[str, torch.Tensor]:
    (manifest,) = store.glob("runs/*/manifest.json")
    return safetensors.torch.load_file(str(manifest.parent / "adapter_model.safetensors"))


def wait_for(proc: subprocess.Popen[str], log: Path, needle: str, timeout_s: float) -> None:
    """Wait until ``needle`` appears in the process's stderr copy (tee'd by a thread)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in log.read_text(encoding="utf-8", errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before {needle!r}")
        time.sleep(0.5)
    pytest.fail(f"{needle!r} not seen in {timeout_s} s")


def start_logged(spec: Path, work: Path, log: Path) -> subprocess.Popen[str]:
    full = {
        **os.environ,
        "QLORA_WORK_DIR": str(work),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "QLORA_DDP_TIMEOUT_S": "60",
        POD_NAME_ENV: "ddp-0",  # as in a pod: a SIGTERM is preemption (exit 7), not a stop
    }
    with log.open("w", encoding="utf-8") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "runner", "--log-format", "json", "run", "--spec", str(spec)],
            env=full,
            stdout=subprocess.DEVNULL,
            stderr=fh,
            text=True,
            cwd=str(work.parent),
        )


def worker_pids(parent: int) -> list[int]:
    """The training ranks: grandchildren of ``qlora run`` (children of torchrun)."""

    def children(pid: int) -> list[int]:
        out: list[int] = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                out += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        return out

    return [w for t in children(parent) for w in children(t)]


def test_two_ranks_train_one_adapter_like_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    ddp_store, one_store = tmp_path / "ddp-store", tmp_path / "one-store"
    ddp = start(
        write_spec(tmp_path, tiny_model_dir, ddp_store, gpus=2, micro=4, steps=4, name="ddp"),
        tmp_path / "work-ddp",
    )
    out, err = ddp.communicate(timeout=400)
    assert ddp.returncode == 0, err[-4000:]
    recs = records(err)
    done = by_message(recs, "training done")
    # Both ranks trained in one group of two: each saw world size 2, and their LoRA weights
    # (hashed at the end of training) are identical.
    assert sorted(r["rank"] for r in done) == [0, 1], done
    assert {r["world_size"] for r in done} == {2}
    assert len({r["lora_sha256"] for r in done}) == 1
    # Only rank 0 wrote to the store: one checkpoint commit, one published run.
    assert len(by_message(recs, "checkpoint step 4 committed")) == 1
    assert len(by_message(recs, "published file://")) == 1
    assert len(list(ddp_store.glob("runs/*/manifest.json"))) == 1
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 4

    # The same 4 x 8 samples in one process (micro batch 8 = 2 ranks x 4).
    one = start(
        write_spec(tmp_path, tiny_model_dir, one_store, gpus=1, micro=8, steps=4, name="one"),
        tmp_path / "work-one",
    )
    _, err1 = one.communicate(timeout=300)
    assert one.returncode == 0, err1[-4000:]
    a, b = adapter(ddp_store), adapter(one_store)
    assert a.keys() == b.keys() and len(a) == 28
    keys = [k for k in a if "lora_B" in k]
    diff = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in keys) ** 0.5
    size = sum(float(b[k].float().norm() ** 2) for k in keys) ** 0.5
    assert size > 0, "lora_B did not train: the comparison means nothing"
    print(f"DDP vs one process: relative lora_B difference {diff / size:.4g}")
    assert diff / size <= ADAPTER_TOLERANCE, f"adapters differ by {diff / size:.3g} (relative)"


def test_sigterm_commits_once_and_world_size_1_resumes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    steps = 24  # ~1.5 s a step here: the SIGTERM at the first step lands well before the end
    store = tmp_path / "store"
    log = tmp_path / "ddp.log"
    ddp = start_logged(
        write_spec(tmp_path, tiny_model_dir, store, gpus=2, micro=4, steps=steps, name="ddp"),
        tmp_path / "work-ddp",
        log,
    )
    wait_for(ddp, log, '"msg": "step ', 300)
    ddp.send_signal(signal.SIGTERM)  # what the kubelet does to the pod's main process
    rc = ddp.wait(timeout=120)
    recs = records(log.read_text(encoding="utf-8"))
    assert rc == 7, log.read_text()[-4000:]
    commits = [r for r in recs if "committed to file://" in str(r.get("msg", ""))]
    assert len(commits) == 1, commits
    step = int(commits[0]["checkpoint_step"])
    assert 0 < step < steps

    # One process with the same effective batch (micro batch 8 = 2 ranks x 4) and the same
    # schedule resumes from that checkpoint and carries the step count on. (Before the fix,
    # resources.gpus_per_node was part of the checkpoints' training hash, so this run looked
    # in another folder and trained from step 0: resumed_from_step came back None.)
    one = start(
        write_spec(tmp_path, tiny_model_dir, store, gpus=1, micro=8, steps=steps, name="one"),
        tmp_path / "work-one",
    )
    out, err = one.communicate(timeout=300)
    assert one.returncode == 0, err[-4000:]
    assert by_message(records(err), f"resuming from checkpoint step {step} "), err[-4000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == steps
    manifest = json.loads(Path(summary["manifest_uri"].removeprefix("file://")).read_text())
    assert manifest["checkpoints"]["resumed_from_step"] == step


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_on_one_machine_train_one_job_together(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two ``qlora run`` launches, each with the environment the rendered Indexed Job gives its
    pods (completion index, master address and port; 127.0.0.1 stands for index 0's stable
    hostname ``<job>-0.<job>.<ns>.svc``), form one group of two and train one job."""
    store = tmp_path / "store"
    spec = write_spec(tmp_path, tiny_model_dir, store, gpus=1, nodes=2, micro=4, steps=2)
    port = str(free_port())
    nodes = [
        start(
            spec,
            tmp_path / f"work-{index}",
            JOB_COMPLETION_INDEX=str(index),
            QLORA_MASTER_ADDR="127.0.0.1",
            QLORA_MASTER_PORT=port,
            HOSTNAME=f"j-{index}",
        )
        for index in (0, 1)
    ]
    with ThreadPoolExecutor(2) as pool:  # drain both pipes at once: neither may block
        outs = list(pool.map(lambda p: p.communicate(timeout=400), nodes))
    for p, (_, err) in zip(nodes, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    recs = [records(err) for _, err in outs]
    started = [by_message(r, "world size 2: starting") for r in recs]
    assert all(started), "each launch re-executed itself under torchrun"
    assert "--node-rank 0" in started[0][0]["msg"] and "--node-rank 1" in started[1][0]["msg"]
    done = [d for r in recs for d in by_message(r, "training done")]
    assert sorted(d["rank"] for d in done) == [0, 1]
    assert {d["world_size"] for d in done} == {2}
    assert len({d["lora_sha256"] for d in done}) == 1
    assert by_message(recs[0], "published file://") and not by_message(recs[1], "published")
    assert len(list(store.glob("runs/*/manifest.json"))) == 1
    assert json.loads(outs[0][0].strip().splitlines()[-1])["steps"] == 2
    assert outs[1][0].strip() == ""  # rank 1 prints no summary


def test_a_killed_rank_fails_the_group_promptly(tiny_model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "ddp.log"
    ddp = start_logged(
        write_spec(tmp_path, tiny_model_dir, tmp_path / "s", gpus=2, micro=4, steps=200),
        tmp_path / "work",
        log,
    )
    wait_for(ddp, log, '"msg": "step ', 300)
    ranks = worker_pids(ddp.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    killed = time.monotonic()
    rc = ddp.wait(timeout=90)
    assert rc != 0
    assert time.monotonic() - killed < 60, "the group hung after a rank died"
