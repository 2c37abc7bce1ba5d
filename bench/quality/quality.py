"""The accuracy grid on the real model: SmolLM2-135M-Instruct on QuaRTz, through ``qlora run``.

Every configuration is a job spec run in this one process by :func:`runner.recipe.run` (the
training stack is imported once), so each row of the results is exactly what the runner's
own evaluation phase measured: base and adapter on the same held-out questions, loss per
answer token and accuracy (log-likelihood of "A" vs "B") with Wilson intervals. A failed
quality gate still leaves the numbers (``evaluation.json`` in the job's work directory); the
row records the gate's verdict.

    python3 bench/quality/quality.py drive --gguf FILE --data DIR --out OUT [--budget-s S]
    python3 bench/quality/quality.py summarize OUT/results.jsonl   # table + plot

The grid runs in priority order and stops launching runs when the time budget would be
exceeded; each (configuration, seed) pair is one row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> (quantization.mode, dataset.train_on, lora.target_modules)
CONFIGS: dict[str, tuple[str, str, list[str]]] = {
    "qlora-nf4": ("4bit", "completions", ALL_SEVEN),
    "lora-16bit": ("16bit", "completions", ALL_SEVEN),
    "qlora-nf4-whole-seq": ("4bit", "all", ALL_SEVEN),
    "qlora-nf4-attn-only": ("4bit", "completions", ATTENTION),
}
ORDER = [(c, s) for s in (1, 2, 3) for c in CONFIGS]


def spec_for(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    mode, train_on, targets = CONFIGS[name]
    return {
        "apiVersion": "qlora-runner.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"{name}-s{seed}"},
        "spec": {
            "model": {"source": str(args.gguf)},
            "dataset": {
                "sources": [str(args.data / "train.jsonl")],
                "format": "messages",
                "train_on": train_on,
            },
            "evaluation": {
                "sources": [str(args.data / "test.jsonl")],
                "max_rows": args.eval_rows,
                "scoring": "choices",
            },
            "lora": {"r": 16, "alpha": 32, "target_modules": targets},
            "quantization": {"mode": mode, "compute_dtype": args.dtype},
            "training": {
                "backend": "transformers",
                "max_steps": args.steps,
                "learning_rate": args.lr,
                "warmup_ratio": 0.05,
                "micro_batch_size": args.micro_batch,
                "gradient_accumulation_steps": 1,
                "max_seq_length": 160,
                "gradient_checkpointing": False,
                "optimizer": "adamw_torch",
                "logging_steps": 10,
                "seed": seed,
                "checkpoint_every_minutes": None,
            },
            "output": {"uri": f"file://{args.store}/{name}-s{seed}"},
            "metrics": {"enabled": False},
        },
    }


def drive(args: argparse.Namespace) -> int:
    from runner import recipe
    from runner.errors import RunnerError

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.setdefault("QLORA_WORK_DIR", str(args.out.parent / "qwork")))
    results = args.out / "results.jsonl"
    started = time.monotonic()
    last = 0.0
    for name, seed in ORDER:
        spent = time.monotonic() - started
        if spent + max(last, 20.0) > args.budget_s:
            print(f"budget: stop before {name} seed {seed} ({spent:.0f}s spent)", flush=True)
            break
        doc = spec_for(name, seed, args)
        path = args.out / f"{name}-s{seed}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        t0 = time.monotonic()
        row: dict[str, Any] = {"config": name, "seed": seed}
        try:
            result = recipe.run(str(path))
            row["published"] = True
            row["training"] = {
                k: result.metadata["training"][k]
                for k in ("steps", "first_loss", "last_loss", "runtime_s", "precision")
            }
        except RunnerError as e:
            row["published"] = False
            row["error"] = e.message[:500]
        report = work / doc["metadata"]["name"] / recipe.EVAL_REPORT
        if report.is_file():
            row["evaluation"] = json.loads(report.read_text(encoding="utf-8"))
        last = time.monotonic() - t0
        row["wall_s"] = round(last, 1)
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        ev = row.get("evaluation", {})
        print(
            f"{name} seed {seed}: {ev.get('summary', row.get('error'))} [{last:.0f}s]", flush=True
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drive")
    d.add_argument("--gguf", type=Path, required=True)
    d.add_argument("--data", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--store", type=Path, default=Path("/tmp/qstore"))
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--micro-batch", type=int, default=16)
    d.add_argument("--eval-rows", type=int, default=900)
    d.add_argument("--dtype", default="bfloat16")
    d.add_argument("--budget-s", type=float, default=300)
    s = sub.add_parser("summarize")
    s.add_argument("results", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "drive":
        return drive(args)
    from summarize_quality import summarize  # type: ignore[import-not-found]

    return int(summarize(args.results))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
