"""Training speed on one card: ``qlora run`` vs a bare Unsloth script vs plain HF QLoRA.

All three train the same randomly initialised Llama shape on the same rows (text rows of
exactly ``seq`` tokens, every token carrying loss), with the same LoRA (r 16, alpha 16, all
seven projections), the same optimizer (8-bit AdamW, lr 2e-4, linear schedule, no warm-up),
micro batch and accumulation, for the same number of optimizer steps, one after another on an
otherwise idle card:

* ``qlora``: the real CLI, ``python -m runner run --spec``, backend unsloth, metrics on. A
  scraper reads its ``/metrics`` port while it trains (one scrape is kept as a file).
* ``unsloth``: a bare script as in Unsloth's notebooks (``FastLanguageModel`` +
  ``get_peft_model(use_gradient_checkpointing="unsloth")`` + TRL ``SFTTrainer``).
* ``hf``: transformers + bitsandbytes nf4 (double quant, bf16 compute) + SDPA + peft + TRL
  ``SFTTrainer`` with non-reentrant gradient checkpointing.

Reported per run: tokens/s over the whole ``trainer.train()`` (compile warm-up included, the
same definition for all three) and in steady state (steps after ``--warm`` only), peak VRAM
(torch's ``max_memory_reserved``; for ``qlora`` the run's own peak gauge) and the card-level
peak seen by ``nvidia-smi``, and MFU = 4 x parameters x tokens/s / the bf16 matmul rate
measured in the same run.

Usage (GPU host): ``python3 bench/speed.py drive --out DIR --models DIR --shape llama-3.2-1b``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from vram_grid import OFFLINE_ENV, environment, load_model  # noqa: E402

METRICS_PORT = 9400


# ----------------------------------------------------------------------------- shared pieces


def param_count(cfg: dict[str, Any]) -> int:
    """Parameters of a Llama config (embeddings, lm_head unless tied, layers, norms)."""
    h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    v = cfg["vocab_size"]
    attn = h * heads * hd * 2 + h * kv * hd * 2
    per_layer = attn + 3 * h * f + 2 * h
    emb = v * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return int(emb + layers * per_layer + h)


def write_rows(path: Path, rows: int, seq: int, vocab_words: int = 256, seed: int = 0) -> None:
    """Text rows of ``seq - 1`` words; with the EOS the runner appends, ``seq`` tokens each."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(rows):
            words = " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(seq - 1))
            fh.write(json.dumps({"text": words}) + "\n")


def tokenized_rows(path: Path, tok: Any, seq: int) -> list[list[int]]:
    """The rows exactly as the runner trains them: text + EOS, truncated to ``seq``."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"] + tok.eos_token
        out.append(tok(text, add_special_tokens=True)["input_ids"][:seq])
    return out


class GpuPeak:
    """Polls ``nvidia-smi`` for the card's used memory (all processes) in a thread."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._interval = interval_s
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.check_output(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    text=True,
                    timeout=10,
                )
                self.peak_mib = max(self.peak_mib, int(out.split()[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                pass
            self._stop.wait(self._interval)

    def __enter__(self) -> GpuPeak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def start_profiler(pid: int, out: Path, seconds: int = 5) -> None:
    """Sample ``pid``'s Python stacks for a few seconds with py-spy, if it is installed.

    py-spy reads the process from outside (no pause with ``--nonblocking``) and writes
    collapsed stacks, one ``frame;frame;... count`` line each, with idle frames left out.
    """
    exe = shutil.which("py-spy")
    if exe is None:
        return
    subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200",
         "--format", "raw", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


# ----------------------------------------------------------------------------- bare scripts


def run_bare(ns: argparse.Namespace) -> int:
    """One bare run (``unsloth`` or ``hf``) on the rows in ``ns.data``; writes ``ns.result``."""
    if ns.backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers, trl, peft)
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    t0 = time.time()
    model, tok = load_model(ns.backend, ns.model_dir, ns.seq, 16)
    load_s = time.time() - t0
    ids = tokenized_rows(Path(ns.data), tok, ns.seq)
    data = Dataset.from_dict({"input_ids": ids})

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))
            if int(state.global_step) == ns.warm and ns.profile:
                start_profiler(os.getpid(), Path(ns.profile))

    timer = StepTimer()
    if ns.completion_mask:
        # As ``qlora run`` hands rows to TRL: a completion_mask column (all ones here).
        data = Dataset.from_dict(
            {"input_ids": ids, "completion_mask": [[1] * len(r) for r in ids]}
        )
    cfg: dict[str, Any] = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=ns.mb,
        gradient_accumulation_steps=ns.accum,
        max_steps=ns.steps,
        learning_rate=2e-4,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_8bit",
        weight_decay=0.01,
        max_grad_norm=1.0,
        bf16=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        max_length=ns.seq,
        packing=False,
        seed=3407,
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )
    if ns.backend == "hf":
        cfg["gradient_checkpointing"] = True
        cfg["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if ns.sft_gc:
        # What the runner's Unsloth backend passed until this comparison: Trainer then also
        # calls gradient_checkpointing_enable() on the Unsloth model.
        cfg["gradient_checkpointing"] = True
    if ns.completion_mask:
        cfg["completion_only_loss"] = True
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**cfg),
        train_dataset=data,
        processing_class=tok,
        callbacks=[timer],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    steady = _steady(timer.marks, ns.warm)
    times = [t for t, _ in timer.marks]
    result = {
        "step_times_s": [round(b - a, 4) for a, b in zip(times, times[1:], strict=False)],
        "load_s": load_s,
        "train_runtime_s": runtime,
        "train_tokens": tokens,
        "steps": int(trainer.state.global_step),
        "tokens_per_s": tokens / runtime,
        "steady_tokens_per_s": steady,
        "max_memory_reserved_bytes": torch.cuda.max_memory_reserved(),
        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }
    Path(ns.result).write_text(json.dumps(result))
    return 0


def _steady(marks: list[tuple[float, int]], warm: int) -> float | None:
    """Tokens/s between the end of step ``warm`` and the last step."""
    if len(marks) <= warm:
        return None
    (t0, k0), (t1, k1) = marks[warm - 1], marks[-1]
    return (k1 - k0) / (t1 - t0) if t1 > t0 else None


# ----------------------------------------------------------------------------- qlora run


def spec_text(name: str, model: Path, data: Path, store: Path, ns: argparse.Namespace,
              mb: int | str, accum: int | str, steps: int, gpu_class: str = "auto") -> str:
    return f"""apiVersion: qlora-runner.io/v1alpha1
kind: FineTuneJob
metadata:
  name: {name}
spec:
  model:
    source: {model}
  dataset:
    sources: [{data}]
    format: text
    train_on: all
  lora:
    r: 16
    alpha: 16
    dropout: 0.0
  quantization:
    mode: 4bit
    compute_dtype: {ns.dtype}
  training:
    backend: {ns.qlora_backend}
    max_steps: {steps}
    learning_rate: 0.0002
    lr_scheduler: linear
    warmup_ratio: 0.0
    micro_batch_size: {mb}
    gradient_accumulation_steps: {accum}
    target_effective_batch_size: 16
    max_seq_length: {ns.seq}
    optimizer: {ns.optimizer}
    gradient_checkpointing: true
    logging_steps: 1
  resources:
    gpu_class: {gpu_class}
  output:
    uri: file://{store}
  metrics:
    enabled: true
    port: {METRICS_PORT}
"""


_SAMPLE_RE = re.compile(r"^(qlora_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$")


def _scrape() -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return None


def _values(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE_RE.match(line)
        if m:
            out[m.group(1)] = max(out.get(m.group(1), float("-inf")), float(m.group(3)))
    return out


def run_qlora(ns: argparse.Namespace, name: str, model: Path, data: Path, work: Path,
              mb: int | str, accum: int | str, steps: int, plan: dict[str, Any] | None,
              scrape_file: Path | None, profile: Path | None = None) -> dict[str, Any]:
    """Run ``python -m runner run`` and watch its /metrics; return the numbers."""
    spec_dir = work / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    store = work / "store" / name
    gpu_class = plan["gpu_class"]["name"] if plan else "auto"
    text = spec_text(name, model, data, store, ns, mb, accum, steps, gpu_class)
    if getattr(ns, "drop_gc", False):  # checkpointing left to the planner (speed_data.py)
        text = text.replace("    gradient_checkpointing: true\n", "")
    (spec_dir / "job.yaml").write_text(text)
    if plan:
        (spec_dir / "plan.json").write_text(json.dumps(plan))
    env = os.environ | OFFLINE_ENV | {
        "QLORA_WORK_DIR": str(work / "qlora-work"),
        "QLORA_LOG_FORMAT": "json",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    log_path = work / f"{name}.log"
    series: list[tuple[float, float, float]] = []  # (time, step, tokens_total)
    peaks: dict[str, float] = {}
    kept = profiled = False
    with log_path.open("w") as log, GpuPeak() as gpu:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "run", "--spec", str(spec_dir / "job.yaml")],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        while proc.poll() is None:
            text = _scrape()
            if text:
                v = _values(text)
                for k in ("qlora_gpu_memory_peak_reserved_bytes",
                          "qlora_gpu_memory_peak_allocated_bytes"):
                    if k in v:
                        peaks[k] = max(peaks.get(k, 0.0), v[k])
                step = v.get("qlora_train_step", 0.0)
                series.append((time.perf_counter(), step, v.get("qlora_train_tokens_total", 0)))
                if scrape_file and not kept and step >= 3:
                    # What a user sees with curl while the job trains.
                    curl = subprocess.run(
                        ["curl", "-sS", f"http://127.0.0.1:{METRICS_PORT}/metrics"],
                        capture_output=True, text=True, timeout=10,
                    )
                    scrape_file.write_text(curl.stdout or curl.stderr)
                    kept = True
                if profile and not profiled and step >= ns.warm:
                    start_profiler(proc.pid, profile)
                    profiled = True
            time.sleep(ns.scrape_interval)
    result: dict[str, Any] = {"exit_code": proc.returncode, "gpu_peak_used_mib": gpu.peak_mib,
                              **peaks}
    manifest: dict[str, Any] | None = None
    try:
        latest = json.loads((store / "latest.json").read_text())
        manifest = json.loads((store / "runs" / latest["run_id"] / "manifest.json").read_text())
    except (OSError, ValueError, KeyError):
        # Not published (e.g. verification refused a barely trained adapter): the training
        # numbers still come from the run's log and its /metrics counter.
        result["log_tail"] = log_path.read_text()[-4000:]
    if manifest is None:
        done = re.search(r"training done: (\d+) steps, .* in ([0-9.]+)s", log_path.read_text())
        if done and series:
            tokens = max(k for _, _, k in series)
            runtime = float(done.group(2))
            result |= {"steps": int(done.group(1)), "train_runtime_s": runtime,
                       "train_tokens": tokens, "tokens_per_s": tokens / runtime}
        result["published"] = False
    else:
        tr = manifest["training"]
        result |= {
            "published": True,
            "train_runtime_s": tr["runtime_s"],
            "train_tokens": tr["train_tokens"],
            "steps": tr["steps"],
            "tokens_per_s": tr["train_tokens"] / tr["runtime_s"],
            "micro_batch_size": tr["micro_batch_size"],
            "gradient_accumulation_steps": tr["gradient_accumulation_steps"],
            "losses": tr.get("loss_curve"),
            "verification_reload_max_abs_logit_diff":
                manifest["verification"]["reload"]["max_abs_logit_diff"],
            "manifest_files": [f["path"] for f in manifest["files"]],
        }
    # Steady state from the run's own per-step log records (millisecond timestamps, written
    # by the progress callback at every logging step): end of step ``warm`` to the last step.
    marks = log_marks(log_path)
    if ns.warm in marks and steps in marks:
        (t0, k0), (t1, k1) = marks[ns.warm], marks[steps]
        result["steady_tokens_per_s"] = (k1 - k0) / (t1 - t0) if t1 > t0 else None
        result["steady_source"] = "log records (ms timestamps)"
        result["step_times_s"] = [
            round(marks[i + 1][0] - marks[i][0], 4) for i in sorted(marks) if i + 1 in marks
        ]
    result["scrapes"] = len(series)
    result["scrape_interval_s"] = ns.scrape_interval
    return result


def log_marks(log_path: Path) -> dict[int, tuple[float, int]]:
    """``{step: (epoch seconds, tokens seen)}`` from the JSON progress records of a run log."""
    from datetime import datetime

    marks: dict[int, tuple[float, int]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "step" in rec and "tokens_seen" in rec and "ts" in rec:
            when = datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
            marks[int(rec["step"])] = (when, int(rec["tokens_seen"]))
    return marks


# ----------------------------------------------------------------------------- driver


def bare_cmd(ns: argparse.Namespace, backend: str, model: Path, data: Path, steps: int,
             warm: int, result: Path) -> list[str]:
    """The command line of one bare run (``speed.py bare``) on the driver's batch shape."""
    return [sys.executable, str(Path(__file__).resolve()), "bare", "--backend", backend,
            "--model-dir", str(model), "--data", str(data), "--seq", str(ns.seq), "--mb",
            str(ns.mb), "--accum", str(ns.accum), "--steps", str(steps), "--warm", str(warm),
            "--result", str(result)]


def run_driver(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    models, work = Path(ns.models), Path(tempfile.mkdtemp(prefix="speed-"))
    env = environment(" ".join(["python3", *sys.argv]))
    tflops = env.get("bf16_matmul_tflops_8192")
    (out / "env.json").write_text(json.dumps(env, indent=2))
    deadline = time.time() + ns.budget_s
    results = out / "results.jsonl"
    for shape in [] if ns.planner_only else ns.shape:
        subprocess.run([sys.executable, str(HERE / "random_models.py"), str(models), shape],
                       check=True, env=os.environ | OFFLINE_ENV)
        mdir = models / shape
        cfg = json.loads((mdir / "config.json").read_text())
        n_params = param_count(cfg)
        steps = ns.steps_by_shape.get(shape, ns.steps)
        data = work / f"{shape}.jsonl"
        write_rows(data, steps * ns.mb * ns.accum + 8, ns.seq)
        if ns.prewarm:
            # Unsloth compiles its kernels (Triton, torch.compile) on first use and caches
            # them on disk; without this, whichever runner goes first pays for the others.
            t0 = time.time()
            subprocess.run(
                bare_cmd(ns, "unsloth", mdir, data, 3, 1, work / f"{shape}-prewarm.json"),
                cwd=work, env=os.environ | OFFLINE_ENV, capture_output=True, text=True,
                timeout=300,
            )
            print(f"prewarm {shape}: {time.time() - t0:.0f}s", flush=True)
        for rep, runner in enumerate(ns.runners):
            if time.time() > deadline - 30:
                break
            rec: dict[str, Any] = {"shape": shape, "runner": runner, "seq": ns.seq,
                                   "micro_batch": ns.mb, "accumulation": ns.accum,
                                   "steps": steps, "r": 16, "params": n_params,
                                   "card": env.get("card"), "bf16_matmul_tflops": tflops,
                                   "order": rep, "prewarmed": ns.prewarm}
            t0 = time.time()
            profile = out / f"pyspy-{shape}-{runner.replace('+', '-')}.txt" if ns.profile else None
            if runner == "qlora":
                scrape = out / f"metrics-scrape-{shape}.txt"
                # One job name (and store) per repetition: a rerun of the same spec would
                # resume from the first run's final checkpoint and train nothing.
                rec |= run_qlora(ns, f"speed-{shape.replace('.', '-')}-{rep}", mdir, data,
                                 work, ns.mb, ns.accum, steps, None, scrape, profile)
            else:
                backend, _, variant = runner.partition("+")
                res = work / f"{shape}-{runner}.json"
                cmd = bare_cmd(ns, backend, mdir, data, steps, ns.warm, res)
                cmd += [f"--{v}" for v in variant.split("+") if v]
                if profile:
                    cmd += ["--profile", str(profile)]
                with GpuPeak() as gpu:
                    try:
                        proc = subprocess.run(cmd, cwd=work, env=os.environ | OFFLINE_ENV,
                                              capture_output=True, text=True,
                                              timeout=max(30, deadline - time.time()))
                    except subprocess.TimeoutExpired as e:
                        print(f"{shape} {runner}: stopped at the budget ({e.timeout:.0f} s)",
                              flush=True)
                        break
                rec |= {"exit_code": proc.returncode, "gpu_peak_used_mib": gpu.peak_mib}
                if res.exists():
                    rec |= json.loads(res.read_text())
                else:
                    rec["log_tail"] = (proc.stdout + proc.stderr)[-4000:]
            rec["wall_s"] = time.time() - t0
            for key in ("tokens_per_s", "steady_tokens_per_s"):
                if rec.get(key) and tflops:
                    rec[key.replace("tokens_per_s", "mfu")] = (
                        4 * n_params * rec[key] / (tflops * 1e12)
                    )
            with results.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(json.dumps({k: v for k, v in rec.items() if k not in ("losses", "log_tail",
                                                                        "manifest_files")}),
                  flush=True)
            if rec.get("log_tail"):
                print(rec["log_tail"][-2500:], flush=True)
    if ns.planner_only or (ns.planner and deadline - time.time() > 200):
        ns.warm = ns.planner_warm
        run_planner_comparison(ns, models, work, env, results)
    return 0


def make_plan_json(ns: argparse.Namespace, spec_path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Plan the spec with the project's planner (pure code), as ``qlora plan --json`` would."""
    sys.path.insert(0, str(REPO))
    from runner.plan import make_plan
    from runner.settings import load_settings
    from runner.spec import load_spec

    plan = make_plan(load_spec(str(spec_path)), load_settings(), model_config=cfg)
    return dict(json.loads(plan.to_json()))


def run_planner_comparison(ns: argparse.Namespace, models: Path, work: Path,
                           env: dict[str, Any], results: Path) -> None:
    """The 8B shape in the 24GB class: the planner's micro batch vs the seed's 2 x 8."""
    shape = ns.planner_shape
    subprocess.run([sys.executable, str(HERE / "random_models.py"), str(models), shape],
                   check=True, env=os.environ | OFFLINE_ENV)
    mdir = models / shape
    cfg = json.loads((mdir / "config.json").read_text())
    n_params, tflops = param_count(cfg), env.get("bf16_matmul_tflops_8192")
    probe = work / "plan-probe"
    probe.mkdir(parents=True, exist_ok=True)
    data = work / f"{shape}-plan.jsonl"
    write_rows(data, ns.planner_steps * 16 + 8, ns.seq)
    (probe / "job.yaml").write_text(spec_text("plan-probe", mdir, data, work / "store" / "p",
                                              ns, "auto", "auto", ns.planner_steps, "24GB"))
    plan = make_plan_json(ns, probe / "job.yaml", cfg)
    print("plan:", json.dumps({k: plan[k] for k in plan if k != "vram_terms"}), flush=True)
    for label, mb, accum, use_plan in (("seed-2x8", 2, 8, None),
                                       ("planner-auto", "auto", "auto", plan)):
        rec: dict[str, Any] = {"shape": shape, "runner": "qlora", "variant": label,
                               "seq": ns.seq, "gpu_class": "24GB", "params": n_params,
                               "card": env.get("card"), "bf16_matmul_tflops": tflops,
                               "plan_micro_batch": plan.get("micro_batch_size"),
                               "plan_accumulation": plan.get("gradient_accumulation_steps"),
                               "plan_vram_estimate_bytes": plan.get("vram_estimate_bytes")}
        t0 = time.time()
        rec |= run_qlora(ns, f"plan-{label}", mdir, data, work, mb, accum, ns.planner_steps,
                         use_plan, None)
        rec["wall_s"] = time.time() - t0
        for key in ("tokens_per_s", "steady_tokens_per_s"):
            if rec.get(key) and tflops:
                rec[key.replace("tokens_per_s", "mfu")] = 4 * n_params * rec[key] / (tflops * 1e12)
        with results.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k not in ("losses", "log_tail",
                                                                    "manifest_files")}),
              flush=True)
        if rec.get("log_tail"):
            print(rec["log_tail"][-2500:], flush=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    b = sub.add_parser("bare")
    b.add_argument("--backend", choices=["unsloth", "hf"], required=True)
    b.add_argument("--model-dir", required=True)
    b.add_argument("--data", required=True)
    b.add_argument("--seq", type=int, default=2048)
    b.add_argument("--mb", type=int, default=4)
    b.add_argument("--accum", type=int, default=1)
    b.add_argument("--steps", type=int, default=30)
    b.add_argument("--warm", type=int, default=5)
    b.add_argument("--result", required=True)
    b.add_argument("--sft-gc", action="store_true",
                   help="also gradient_checkpointing=True in SFTConfig (unsloth)")
    b.add_argument("--completion-mask", action="store_true",
                   help="rows carry a completion_mask column; completion_only_loss on")
    b.add_argument("--profile", default="", help="py-spy collapsed stacks to this file")
    d = sub.add_parser("drive")
    d.add_argument("--out", required=True)
    d.add_argument("--models", required=True)
    d.add_argument("--shape", action="append", default=[])
    d.add_argument("--runners", default="unsloth,qlora,hf")
    d.add_argument("--seq", type=int, default=2048)
    d.add_argument("--mb", type=int, default=4)
    d.add_argument("--accum", type=int, default=1)
    d.add_argument("--steps", type=int, default=30)
    d.add_argument("--steps-by-shape", default="", help="shape=N,shape=N")
    d.add_argument("--warm", type=int, default=5)
    d.add_argument("--budget-s", type=float, default=540)
    d.add_argument("--qlora-backend", default="unsloth")
    d.add_argument("--dtype", default="bfloat16")
    d.add_argument("--optimizer", default="adamw_8bit")
    d.add_argument("--planner", action="store_true", help="also the 24GB-class comparison")
    d.add_argument("--planner-only", action="store_true", help="only the 24GB-class comparison")
    d.add_argument("--profile", action="store_true", help="py-spy each run in steady state")
    d.add_argument("--prewarm", action="store_true",
                   help="a discarded 3-step Unsloth run per shape first (fills the kernel caches)")
    d.add_argument("--scrape-interval", type=float, default=1.0,
                   help="seconds between /metrics scrapes of qlora run")
    d.add_argument("--planner-shape", default="llama-3.1-8b")
    d.add_argument("--planner-steps", type=int, default=8)
    d.add_argument("--planner-warm", type=int, default=2,
                   help="steady state of the planner comparison starts after this step")
    ns = p.parse_args(argv)
    if ns.cmd == "bare":
        return run_bare(ns)
    if ns.cmd == "drive":
        ns.runners = ns.runners.split(",")
        ns.steps_by_shape = {
            k: int(v) for k, v in (x.split("=") for x in ns.steps_by_shape.split(",") if x)
        }
        return run_driver(ns)
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
