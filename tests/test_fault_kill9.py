"""kill -9 at 20 seeded points of real ``qlora run`` processes, each followed by a restart.

Kill points are drawn from a seeded RNG (``QLORA_FAULT_SEED``, default 20261128) and spread
over what a run does: a training step (some of them checkpoint steps, so the kill can land in
the middle of a checkpoint upload), just after a checkpoint commit, verification, and
publishing (kills within the first 0.4 s of the publish phase land before, between and after
the adapter files, the manifest and ``latest.json``). After every kill the store is checked:
every ``manifest.json`` (published runs and checkpoints) lists only present files with the
right size and sha256, and each run prefix holds either a verified manifest or none. The next
run on the same output is the restart (on a fresh work dir, as a new pod would get); once an
output holds a published adapter, the campaign moves to a new output. Every output ends with
a run that completes and passes ``qlora verify``.

Each kill, its outcome and the store's state are printed and written as JSON lines to
``$QLORA_FAULT_REPORT`` when set (the README's reliability figures come from such a run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from runner.errors import ExitCode
from runner.publish import verify_in_store
from runner.storage.s3 import S3Store
from tests.fixtures.qlora_process import (
    QloraProcess,
    run_env,
    started,
    storage_invariants,
    tiny_spec,
)
from tests.fixtures.s3 import S3Bucket

pytestmark = [
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
]

KILLS = 20
STEPS = 8
EVERY = 2
WAIT_S = 240.0
SEED = int(os.environ.get("QLORA_FAULT_SEED", "20261128"))


@dataclass(frozen=True)
class KillPoint:
    """Where to kill: after the first log record matching ``trigger``/``value``, + delay."""

    trigger: str  # "step" | "checkpoint" | "verifying" | "publishing"
    value: int
    delay_s: float

    def matches(self, record: dict[str, Any]) -> bool:
        if self.trigger == "step":
            return "loss" in record and int(record.get("step", -1)) >= self.value
        if self.trigger == "checkpoint":
            return int(record.get("checkpoint_step", -1)) >= self.value and "committed" in str(
                record.get("msg")
            )
        return record.get("phase") == self.trigger


def kill_points(seed: int, n: int) -> list[KillPoint]:
    """``n`` kill points: 8 in training steps, 3 after checkpoint commits, 3 in verification,
    6 in publishing (in a seeded random order)."""
    rng = random.Random(seed)
    kinds = ["step"] * 8 + ["checkpoint"] * 3 + ["verifying"] * 3 + ["publishing"] * 6
    kinds = (kinds * (n // len(kinds) + 1))[:n]
    rng.shuffle(kinds)
    points = []
    for kind in kinds:
        if kind == "step":
            points.append(KillPoint(kind, rng.randint(1, STEPS), round(rng.uniform(0, 0.3), 3)))
        elif kind == "checkpoint":
            step = rng.choice(range(EVERY, STEPS, EVERY))
            points.append(KillPoint(kind, step, round(rng.uniform(0, 0.05), 3)))
        elif kind == "verifying":
            points.append(KillPoint(kind, 0, round(rng.uniform(0, 1.0), 3)))
        else:
            points.append(KillPoint(kind, 0, round(rng.uniform(0, 0.4), 3)))
    return points


def test_kill_9_at_20_points_never_leaves_a_bad_manifest(
    tiny_model_dir: Path,
    tmp_path: Path,
    s3_bucket: S3Bucket,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = s3_bucket.server
    store = S3Store(s3_bucket.name, server.settings())
    records: list[dict[str, Any]] = []
    output, outputs, attempt = 0, [0], 0

    def launch(out: int) -> QloraProcess:
        nonlocal attempt
        attempt += 1
        spec = tiny_spec(tmp_path / f"job-{out}.yaml", tiny_model_dir, f"{s3_bucket.uri}/o{out}")
        env = run_env(server.subprocess_env(), tmp_path / f"work-{attempt}", tmp_path / "term")
        return QloraProcess.start(spec, env, tmp_path)

    for i, point in enumerate(kill_points(SEED, KILLS)):
        run = launch(output)
        try:
            fired = run.wait_for(point.matches, WAIT_S)
            if fired is not None:
                time.sleep(point.delay_s)
                run.signal(signal.SIGKILL)
            rc = run.finish(120)
        finally:
            run.close()
        state = storage_invariants(store, f"o{output}")
        published = store.head(f"o{output}/latest.json") is not None
        if published:
            verify_in_store(store, f"o{output}")  # latest.json -> a verified run
        outcome = "killed" if rc == -signal.SIGKILL else ("completed" if rc == 0 else f"exit {rc}")
        assert rc in (-signal.SIGKILL, 0), run.text[-3000:]
        record = {"kill": i + 1, "output": f"o{output}", **asdict(point), "outcome": outcome}
        record.update(state)
        records.append(record)
        if published:  # a finished output: later kills go to a fresh one
            output += 1
            outputs.append(output)

    for out in outputs:  # every output ends complete and verified
        if store.head(f"o{out}/latest.json") is None:
            with started(
                tiny_spec(tmp_path / "final.yaml", tiny_model_dir, f"{s3_bucket.uri}/o{out}"),
                run_env(server.subprocess_env(), tmp_path / "work-final", tmp_path / "term"),
                tmp_path,
            ) as final:
                rc = final.finish(WAIT_S)
            assert rc == ExitCode.OK, final.text[-3000:]
            assert final.summary()["steps"] == STEPS
        report = verify_in_store(store, f"o{out}")
        assert report.manifest["training"]["steps"] == STEPS

    killed = sum(r["outcome"] == "killed" for r in records)
    summary = {
        "seed": SEED,
        "kills_planned": KILLS,
        "killed": killed,
        "finished_before_the_kill": KILLS - killed,
        "outputs": len(outputs),
        "bad_manifests": 0,
        "by_trigger": {
            t: sum(r["trigger"] == t and r["outcome"] == "killed" for r in records)
            for t in ("step", "checkpoint", "verifying", "publishing")
        },
        "uncommitted_prefixes_seen": sum(r["uncommitted"] > 0 for r in records),
    }
    with capsys.disabled():
        for r in records:
            print(json.dumps(r))
        print(json.dumps(summary))
    target = os.environ.get("QLORA_FAULT_REPORT")
    if target:
        with open(target, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.write(json.dumps({"summary": summary}) + "\n")
    assert killed >= KILLS // 2, summary  # most kill points must really interrupt a run
