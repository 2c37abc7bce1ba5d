"""The accuracy grid on the real model: SmolLM2-135M-Instruct on QuaRTz (and a second task).

Every training configuration is a job spec run by :func:`runner.recipe.run` (``qlora run``'s
own code: load, train, verify, evaluate, publish), so each row of the results is exactly what
the runner's evaluation phase measured: base and adapter on the same held-out questions, loss
per answer token and accuracy (log-likelihood of each listed option) with Wilson intervals.
A failed quality gate still leaves the numbers (``evaluation.json`` in the job's work
directory); the row records the verdict.

Besides the training rows, ``ppl`` rows give the *base* model's perplexity under each
quantization on the held-out rows' whole text (every token of the chat-formatted question and
answer, not only the answer), which is what quantization error shows up in.

    python3 bench/quality/quality.py data OUT                # quartz/ and logic/ splits
    python3 bench/quality/quality.py drive --gguf FILE --data OUT --out RES [options]
    python3 bench/quality/summarize_quality.py RES/results.jsonl --plot PNG

``drive`` runs the grid on a pool of worker processes (on one GPU, several small jobs at
once use it far better than one), in priority order: every configuration of seed 1 first,
then seed 2, ...; a job is not started when the time budget would not cover it, and every
finished row is appended to ``results.jsonl`` at once (so a killed drive keeps its rows).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> (quantization.mode, dataset.train_on, lora.target_modules)
CONFIGS: dict[str, tuple[str, str, list[str]]] = {
    "lora-16bit": ("16bit", "completions", ALL_SEVEN),
    "qlora-nf4": ("4bit", "completions", ALL_SEVEN),
    "qlora-nf4-whole-seq": ("4bit", "all", ALL_SEVEN),
    "qlora-nf4-attn-only": ("4bit", "completions", ATTENTION),
}
DYNAMIC_PREFIX = "qlora-dyn4-"  # + the 16-bit budget in MiB, e.g. qlora-dyn4-24
TASKS = {
    # name -> (data sub-folder, choices): both two-option tasks scored by log-likelihood
    "quartz": "quartz",
    "logic": "logic",
}
PREPARE = Path(__file__).resolve().parents[2] / "examples" / "quartz" / "prepare.py"


# -- data ---------------------------------------------------------------------------------------


def _example_prepare() -> Any:
    """``examples/quartz/prepare.py``, whose QuaRTz rows, package lookup and split seed the
    grid reuses (loaded by path: only the local ``data`` step needs it, not the GPU host)."""
    spec = importlib.util.spec_from_file_location("quartz_prepare", PREPARE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_split(
    rows: list[dict[str, Any]], out: Path, test_rows: int, train_rows: int, seed: int
) -> str:
    random.Random(seed).shuffle(rows)
    test, train = rows[:test_rows], rows[test_rows : test_rows + train_rows]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    first = test[0]["choices"][0]
    share = sum(r["messages"][-1]["content"] == first for r in test) / len(test)
    return f"{out}: {len(train)} train, {len(test)} test rows ({100 * share:.1f}% answer {first})"


def prepare_data(args: argparse.Namespace) -> int:
    """QuaRTz (AllenAI, CC-BY-4.0) and formal_logic (MIT), both from OpenAI's evals package.

    QuaRTz: the split of ``examples/quartz/prepare.py`` (seed 14, 900 test, 2,960 train).
    formal_logic: true/false evaluation of nested boolean expressions, balanced; the same
    seeded shuffle, 900 test and 3,000 train rows of its 214,866.
    """
    prepare = _example_prepare()
    evals = prepare.package_dir("evals", args.site)
    data = evals / "registry" / "data"
    seed = prepare.SPLIT_SEED
    print(_write_split(prepare.quartz_rows(evals), args.out / "quartz", 900, 2960, seed))
    logic = []
    path = data / "formal_logic" / "formal_logic_expressions.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        s = json.loads(line)
        messages = [*s["input"], {"role": "assistant", "content": str(s["ideal"]).strip()}]
        logic.append({"messages": messages, "choices": ["true", "false"]})
    print(_write_split(logic, args.out / "logic", 900, 3000, seed))
    return 0


# -- specs --------------------------------------------------------------------------------------


def config_of(name: str) -> tuple[str, str, list[str], int | None]:
    """(mode, train_on, targets, dynamic budget MiB) of a configuration name."""
    if name.startswith(DYNAMIC_PREFIX):
        return "dynamic-4bit", "completions", ALL_SEVEN, int(name.removeprefix(DYNAMIC_PREFIX))
    if name not in CONFIGS:
        raise SystemExit(f"quality: unknown configuration {name!r}")
    return (*CONFIGS[name], None)


def spec_for(task: str, name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    mode, train_on, targets, budget = config_of(name)
    data = args.data / TASKS[task]
    quant: dict[str, Any] = {"mode": mode, "compute_dtype": args.dtype}
    if budget is not None:
        quant["dynamic_budget_mib"] = budget
    return {
        "apiVersion": "qlora-runner.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"{task}-{name}-s{seed}"},
        "spec": {
            "model": {"source": str(args.gguf)},
            "dataset": {
                "sources": [str(data / "train.jsonl")],
                "format": "messages",
                "train_on": train_on,
            },
            "evaluation": {
                "sources": [str(data / "test.jsonl")],
                "max_rows": args.eval_rows,
                "scoring": "choices",
            },
            "lora": {"r": 16, "alpha": 32, "target_modules": targets},
            "quantization": quant,
            "training": {
                "backend": "transformers",
                "max_steps": args.steps,
                "learning_rate": args.lr,
                "warmup_ratio": 0.05,
                "micro_batch_size": args.micro_batch,
                "gradient_accumulation_steps": 1,
                "max_seq_length": args.max_len,
                "gradient_checkpointing": False,
                "optimizer": "adamw_torch",
                "logging_steps": 10,
                "seed": seed,
                "checkpoint_every_minutes": None,
            },
            "output": {"uri": f"file://{args.store}/{task}-{name}-s{seed}"},
            "metrics": {"enabled": False},
        },
    }


def dynamic_supported() -> bool:
    """Whether this checkout's spec has ``quantization.dynamic_budget_mib`` (branch dyn4)."""
    from runner.spec.model import QuantizationSpec

    return "dynamic_budget_mib" in QuantizationSpec.model_fields


def jobs_for(args: argparse.Namespace) -> list[tuple[Any, ...]]:
    """The grid in priority order: ppl rows, then (seed, task, config)."""
    jobs: list[tuple[Any, ...]] = []
    if args.jobs:  # an explicit list, in that order (a later call adding seeds to a grid)
        for item in args.jobs:
            task, name, seed = [*item.split(":"), "", "", ""][:3]
            if task not in TASKS or not seed.isdigit() or item.count(":") != 2:
                raise SystemExit(f"quality: --jobs {item!r}: want TASK:CONFIG:SEED, TASK one of "
                                 f"{', '.join(TASKS)}, SEED a whole number")
            config_of(name)  # exits on an unknown configuration
            jobs.append(("run", task, name, int(seed)))
        return jobs
    configs = list(args.configs)
    dyn = [f"{DYNAMIC_PREFIX}{b}" for b in args.dyn_budgets]
    if dyn and not dynamic_supported():
        print("drive: no quantization.dynamic_budget_mib in this checkout: no dynamic rows")
        dyn = []
    if args.ppl:
        # dynamic 4-bit's base perplexity comes with each of its runs (its own skip list)
        jobs += [("ppl", task, mode, 0) for task in args.tasks for mode in ("16bit", "4bit")]
    for seed in args.seeds:
        for task in args.tasks:
            for name in configs + dyn:
                if task != args.tasks[0] and name in args.main_only:
                    continue
                jobs.append(("run", task, name, seed))
    return jobs


# -- workers ------------------------------------------------------------------------------------


def _append(path: Path, row: dict[str, Any]) -> None:
    line = json.dumps(row) + "\n"
    with path.open("a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line)
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


def run_job(args: argparse.Namespace, task: str, name: str, seed: int) -> dict[str, Any]:
    from runner import recipe
    from runner.errors import RunnerError

    doc = spec_for(task, name, seed, args)
    path = Path(os.environ["QLORA_WORK_DIR"]) / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    row: dict[str, Any] = {"kind": "run", "task": task, "config": name, "seed": seed}
    captured: dict[str, Any] = {}
    restore = _spy_on_selection(captured) if name.startswith(DYNAMIC_PREFIX) else None
    try:
        result = recipe.run(str(path))
        row["published"] = True
        t = result.metadata["training"]
        row["training"] = {
            k: t.get(k)
            for k in ("steps", "first_loss", "last_loss", "runtime_s", "precision", "notes")
        }
        row["training"]["dynamic"] = {
            k: v for k, v in t.items() if "dynamic" in k or "kept" in k or "skip" in k
        }
    except RunnerError as e:
        row["published"] = False
        row["error"] = e.message[:800]
    finally:
        if restore is not None:
            restore()
    selection = captured.get("selection")
    if selection is not None:  # what the sensitivity ranking kept, gate passed or not
        row["dynamic_4bit"] = selection.as_dict()
        from runner.train.backend import Precision

        precision = Precision(
            quant_mode="dynamic-4bit",
            compute_dtype=args.dtype,
            skip_modules=tuple(selection.skip_modules),
        )
        row["base_text"] = base_text_ppl(args, task, precision)
    report = path.parent / doc["metadata"]["name"] / recipe.EVAL_REPORT
    if report.is_file():
        row["evaluation"] = json.loads(report.read_text(encoding="utf-8"))
    return row


def _spy_on_selection(captured: dict[str, Any]) -> Any:
    """Record the Selection the recipe's dynamic 4-bit step makes; returns the undo."""
    from runner.train import sensitivity

    original = sensitivity.choose_kept_modules

    def spy(*a: Any, **k: Any) -> Any:
        captured["selection"] = original(*a, **k)
        return captured["selection"]

    sensitivity.choose_kept_modules = spy

    def undo() -> None:
        sensitivity.choose_kept_modules = original

    return undo


def ppl_job(args: argparse.Namespace, task: str, mode: str) -> dict[str, Any]:
    """The base model's perplexity on every token of the held-out rows, in one precision."""
    from runner.train.backend import Precision

    precision = Precision(quant_mode=mode, compute_dtype=args.dtype)
    return {"kind": "ppl", "task": task, "mode": mode, **base_text_ppl(args, task, precision)}


def base_text_ppl(args: argparse.Namespace, task: str, precision: Any) -> dict[str, Any]:
    """Loss and perplexity of the base model (no adapter) in ``precision`` on every token."""
    import dataclasses
    import math

    from runner.spec.model import DatasetSpec
    from runner.train import select_backend
    from runner.train.dataset import load_rows
    from runner.train.evaluate import score_examples
    from runner.train.formatting import format_rows, resolve_chat_template
    from runner.train.gguf_convert import converted_dir
    from runner.train.model_files import load_tokenizer
    from runner.train.preflight import tokenize_rows

    model_dir, _ = converted_dir(args.gguf)
    backend = select_backend("transformers", world_size=1, unsloth_ddp=False)
    t0 = time.monotonic()
    model = backend._load_base(model_dir, precision, False)
    tokenizer = load_tokenizer(model_dir, False)
    spec = DatasetSpec.model_validate(
        {
            "sources": [str(args.data / TASKS[task] / "test.jsonl")],
            "format": "messages",
            "train_on": "all",
        }
    )
    rows = load_rows(spec, lambda uri, sub: Path(uri), seed=0).train[: args.eval_rows]
    template = resolve_chat_template(spec, tokenizer, model_dir)
    examples, _ = tokenize_rows(format_rows(rows, spec, tokenizer, template), tokenizer, 512)
    # Every token after the first is scored, whatever the completion mask says.
    examples = [
        dataclasses.replace(e, completion_mask=[0] + [1] * (len(e.input_ids) - 1)) for e in examples
    ]
    model.eval()
    scores = score_examples(model, examples, int(tokenizer.pad_token_id or 0), 32)
    nll, tokens = sum(s.nll for s in scores), sum(s.tokens for s in scores)
    per_row = [s.nll / max(1, s.tokens) for s in scores]
    del model
    return {
        "rows": len(scores),
        "tokens": tokens,
        "loss": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "row_loss": [round(x, 5) for x in per_row],
        "wall_s": round(time.monotonic() - t0, 1),
    }


_ARGS: argparse.Namespace | None = None


def _init(args: argparse.Namespace) -> None:
    global _ARGS
    _ARGS = args
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import logging

    logging.basicConfig(
        level=logging.INFO, format=f"{os.getpid()} %(asctime)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import peft  # noqa: F401  (imported once per worker, while the parent converts)
    import trl  # noqa: F401

    from runner import recipe  # noqa: F401
    from runner.train import transformers_backend  # noqa: F401


def work(job: tuple[Any, ...]) -> str:
    args = _ARGS
    assert args is not None
    kind, task, name, seed = job
    left = args.deadline - time.time()
    if left < (args.ppl_estimate_s if kind == "ppl" else args.run_estimate_s):
        return f"skip {job}: {left:.0f}s left"
    t0 = time.monotonic()
    try:
        row = ppl_job(args, task, name) if kind == "ppl" else run_job(args, task, name, seed)
    except Exception as e:  # a row that failed is a finding too; the grid goes on
        row = {"kind": kind, "task": task, "config": name, "seed": seed, "crash": repr(e)[:800]}
        traceback.print_exc()
    row["wall_s"] = round(time.monotonic() - t0, 1)
    row["worker"] = os.getpid()
    _append(args.out / "results.jsonl", row)
    ev = row.get("evaluation", {})
    what = ev.get("summary") or row.get("perplexity") or row.get("error") or row.get("crash")
    return f"{kind} {task} {name} seed {seed}: {what} [{row['wall_s']:.0f}s]"


def drive(args: argparse.Namespace) -> int:
    import multiprocessing

    started = time.time()
    args.deadline = started + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("QLORA_WORK_DIR", str(args.out.parent / "qwork"))
    Path(os.environ["QLORA_WORK_DIR"]).mkdir(parents=True, exist_ok=True)
    jobs = jobs_for(args)
    (args.out / "grid.json").write_text(
        json.dumps(
            {
                "argv": sys.argv,
                "jobs": jobs,
                "specs": [spec_for(t, n, s, args) for k, t, n, s in jobs if k == "run"][:1],
            },
            indent=1,
            default=str,
        ),
        encoding="utf-8",
    )
    print(f"drive: {len(jobs)} jobs on {args.workers} workers, budget {args.budget_s:.0f}s")
    ctx = multiprocessing.get_context("spawn")
    # The workers import the training stack while this process converts the GGUF, once,
    # before any job wants it (no CUDA in this process).
    with ctx.Pool(args.workers, initializer=_init, initargs=(args,)) as pool:
        from runner.train.gguf_convert import converted_dir

        t0 = time.monotonic()
        model_dir, sha = converted_dir(args.gguf)
        print(f"drive: model {model_dir} (sha256 {sha[:12]}) in {time.monotonic() - t0:.0f}s")
        for line in pool.imap_unordered(work, jobs, chunksize=1):
            print(f"[{time.time() - started:5.0f}s] {line}", flush=True)
    print(f"drive: done in {time.time() - started:.0f}s")
    return 0


def _csv(kind: type) -> Any:
    return lambda s: [kind(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the fixed splits of both tasks")
    d.add_argument("out", type=Path)
    d.add_argument(
        "--site",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "qlora-runner/real-model/site",
    )
    g = sub.add_parser("drive", help="run the grid")
    g.add_argument("--gguf", type=Path, required=True)
    g.add_argument("--data", type=Path, required=True, help="the folder `data` wrote")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--store", type=Path, default=Path("/tmp/qstore"))
    g.add_argument("--tasks", type=_csv(str), default=["quartz", "logic"])
    g.add_argument("--configs", type=_csv(str), default=list(CONFIGS))
    g.add_argument("--main-only", type=_csv(str), default=[], help="configs run on task 1 only")
    g.add_argument("--dyn-budgets", type=_csv(int), default=[], help="MiB kept in 16 bit")
    g.add_argument("--seeds", type=_csv(int), default=[1, 2, 3])
    g.add_argument("--ppl", action="store_true", help="base perplexity per quantization first")
    g.add_argument(
        "--jobs", type=_csv(str), default=[],
        help="TASK:CONFIG:SEED,... run exactly these, in this order (instead of the grid)",
    )
    g.add_argument("--steps", type=int, default=90)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--micro-batch", type=int, default=32)
    g.add_argument("--max-len", type=int, default=160)
    g.add_argument("--eval-rows", type=int, default=900)
    g.add_argument("--dtype", default="bfloat16")
    g.add_argument("--workers", type=int, default=6)
    g.add_argument("--budget-s", type=float, default=300)
    g.add_argument("--run-estimate-s", type=float, default=60, help="no run starts with less left")
    g.add_argument("--ppl-estimate-s", type=float, default=20)
    args = p.parse_args(argv)
    if args.cmd == "data":
        return prepare_data(args)
    return drive(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
