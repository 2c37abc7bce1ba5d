"""Speed on realistic-length rows: ``qlora run`` (data-aware plan) vs bare Unsloth vs plain HF.

The rows (:func:`write_realistic`): 2,000 text rows whose token counts are drawn from a
lognormal distribution (mu 5.967, sigma 0.850: mean ~560, p90 ~1,160 tokens), cut at the
2,048-token ``max_seq_length`` (about 2.6 % of rows reach it), with ``random.Random(0)``. Each
row is random words of the benchmark tokenizer (one token each), so a row of n words trains as
n + 2 tokens (BOS, EOS). Every runner gets the same file; every token carries loss.

Runners (one after another on the same card, in this order):

* ``unsloth-2x8``: bare Unsloth script, the seed recipe's micro batch 2 x accumulation 8;
* ``qlora-24gb``: ``qlora run`` with the plan ``make_plan`` gives for the 24GB class from the
  data's lengths (the pod re-plans at preflight from the real token ids);
* ``hf-2x8``: plain transformers + peft + bitsandbytes + TRL defaults, 2 x 8;
* ``qlora-today``: ``qlora run`` as before this change: the 24GB plan made without lengths
  (16 x 1, every layer checkpointed), the varlen attention patch off;
* ``qlora-today-80gb``: the same as ``qlora-today`` in the 80GB class (the plan made without
  lengths, every layer checkpointed as the spec asks, no varlen patch, default allocator);
* ``qlora-80gb``: ``qlora run`` with the 80GB-class plan from the data's lengths;
* ``qlora-1b``: the 1B shape, 24GB-class plan from the lengths.

Usage (GPU host): ``python3 bench/speed_data.py --out DIR --models DIR --budget-s 520``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

LOGNORMAL_MU = 5.967
LOGNORMAL_SIGMA = 0.850


def realistic_lengths(rows: int, cap: int, seed: int = 0) -> list[int]:
    """Token counts of the realistic rows (BOS and EOS included), capped at ``cap``."""
    rng = random.Random(seed)
    return [
        min(cap, max(8, int(rng.lognormvariate(LOGNORMAL_MU, LOGNORMAL_SIGMA))))
        for _ in range(rows)
    ]


def write_realistic(path: Path, rows: int, cap: int, seed: int = 0, vocab_words: int = 256) -> None:
    """The realistic rows as ``{"text": ...}`` JSON Lines (n - 2 words for n tokens)."""
    rng = random.Random(seed + 1)
    with path.open("w", encoding="utf-8") as fh:
        for n in realistic_lengths(rows, cap, seed):
            words = " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(n - 2))
            fh.write(json.dumps({"text": words}) + "\n")


def plan_for(spec_path: Path, cfg: dict[str, Any], gpu_class: str, data: Path | None) -> dict:
    """The planner's plan for the spec in ``gpu_class`` (from the data's lengths if given)."""
    from runner.plan import make_plan
    from runner.plan.data_lengths import lengths_for_plan
    from runner.settings import load_settings
    from runner.spec import load_spec

    spec = load_spec(str(spec_path))
    lengths = lengths_for_plan(spec, str(data)) if data else None
    plan = make_plan(spec, load_settings(), model_config=cfg, lengths=lengths)
    out = dict(json.loads(plan.to_json()))
    assert out["gpu_class"]["name"] == gpu_class, (out["gpu_class"]["name"], gpu_class)
    return out


def varlen_check() -> dict[str, Any]:
    """The patched varlen attention against Unsloth's per-segment SDPA path (fresh inputs)."""
    import torch
    import unsloth  # noqa: F401
    from unsloth.utils import attention_dispatch as ad

    from runner.train.speedups import enable_varlen_attention

    lengths = [300, 17, 911, 512, 64, 1200]
    total, h, hkv, d = sum(lengths), 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, h, total, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, hkv, total, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, hkv, total, d, device="cuda", dtype=torch.bfloat16, generator=g)
    ref_parts = []
    start = 0
    for n in lengths:  # float32 reference, one causal segment at a time
        qs = q[:, :, start : start + n].float()
        ks = k[:, :, start : start + n].float().repeat_interleave(h // hkv, dim=1)
        vs = v[:, :, start : start + n].float().repeat_interleave(h // hkv, dim=1)
        ref_parts.append(
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        )
        start += n
    ref = torch.cat(ref_parts, dim=2).transpose(1, 2)  # (1, T, H, D)
    what = enable_varlen_attention(ad)
    cu = torch.tensor([0, *itertools_accumulate(lengths)], device="cuda", dtype=torch.int32)
    qv = q.clone().requires_grad_(True)
    out = ad._LeanFlashVarlen.apply(
        qv.squeeze(0).transpose(0, 1).contiguous(),
        k.squeeze(0).transpose(0, 1).contiguous(),
        v.squeeze(0).transpose(0, 1).contiguous(),
        cu,
        max(lengths),
        True,
        None,
        -1,
        0,
    )
    err = float((out.float() - ref[0]).norm() / ref[0].norm())
    out.float().sum().backward()
    return {
        "patch": what,
        "rel_err_vs_fp32_segments": err,
        "grad_finite": bool(torch.isfinite(qv.grad).all()),
    }


def itertools_accumulate(xs: list[int]) -> list[int]:
    out, s = [], 0
    for x in xs:
        s += x
        out.append(s)
    return out


def _shape(runner: str, tiny: bool) -> str:
    if tiny:
        return "tiny"
    return "llama-3.2-1b" if "1b" in runner.split("-") else "llama-3.1-8b"


def pack_logs(logs: Path, out: Path) -> None:
    """All run logs as one ``logs.tgz`` in ``out`` (the device tool returns few files)."""
    import tarfile

    tmp = out / "logs.tgz.part"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(logs, arcname="logs")
    tmp.replace(out / "logs.tgz")


def start_grid(
    grid: str, models: Path, out: Path, tiny: bool, logs: Path
) -> list[tuple[str, Any, Any]]:
    """Fixed-length VRAM points (``SHAPE:SEQxMB,SEQxMB;SHAPE:...``): one ``vram_grid.py
    worker`` per shape, all at once (each process reads its own allocator peaks), started
    before the timed runs. Returns ``(shape, process, log file)``."""
    from vram_grid import OFFLINE_ENV

    specs = [g.split(":", 1) for g in grid.split(";") if g.strip()]
    shapes = [s for s, _ in specs]
    subprocess.run(
        [sys.executable, str(HERE / "random_models.py"), str(models), *shapes],
        check=True,
        env=os.environ | OFFLINE_ENV,
    )
    procs = []
    for shape, points in specs:
        log = (logs / f"grid-{shape}.log").open("w")
        cmd = [
            sys.executable, str(HERE / "vram_grid.py"), "worker", "--shape", shape,
            "--backend", "unsloth" if not tiny else "hf", "--model-dir", str(models / shape),
            "--points", points, "--results", str(out / "vram-results.jsonl"), "--steps", "3",
            "--concurrent",
        ]
        procs.append((shape, subprocess.Popen(cmd, env=os.environ | OFFLINE_ENV, stdout=log,
                                              stderr=subprocess.STDOUT), log))
    return procs


def main(argv: list[str]) -> int:
    import speed
    from vram_grid import OFFLINE_ENV, environment

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--budget-s", type=float, default=520)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warm", type=int, default=4)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument(
        "--runners", default="unsloth-2x8,qlora-24gb,hf-2x8,qlora-today,qlora-80gb,qlora-1b"
    )
    p.add_argument("--grid", default="", help="SHAPE:SEQxMB,...;SHAPE:... fixed-length points")
    p.add_argument("--grid-wait-s", type=float, default=150)
    p.add_argument("--no-varlen-check", action="store_true")
    p.add_argument(
        "--profile", default="qlora-1b,qlora-24gb",
        help="runners whose steps 6-7 run under torch.profiler ('' for none: clean step times)",
    )
    p.add_argument("--tiny", action="store_true", help="check this script on a CPU: tiny shapes")
    ns = p.parse_args(argv)
    out, models = Path(ns.out), Path(ns.models)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    deadline = t_start + ns.budget_s
    env = environment(" ".join(["python3", *sys.argv]))
    tflops = env.get("bf16_matmul_tflops_8192")
    (out / "env.json").write_text(json.dumps(env, indent=2))
    results = out / "results.jsonl"

    def record(rec: dict[str, Any]) -> None:
        with results.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(
            json.dumps(
                {
                    k: v
                    for k, v in rec.items()
                    if k not in ("losses", "log_tail", "manifest_files", "step_times_s")
                }
            ),
            flush=True,
        )
        if rec.get("log_tail"):
            print(rec["log_tail"][-2000:], flush=True)

    if not ns.no_varlen_check:
        try:
            record({"check": "varlen", **varlen_check()})
        except Exception as e:  # the runs still go on; the record says what broke
            record({"check": "varlen", "error": repr(e)})

    runners = ns.runners.split(",")
    # Build the timed runs' models while the grid's models are built and measured.
    build = subprocess.Popen(
        [sys.executable, str(HERE / "random_models.py"), str(models),
         *sorted({_shape(r, ns.tiny) for r in runners})],
        env=os.environ | OFFLINE_ENV,
    )
    logs = Path(tempfile.mkdtemp(prefix="speed-logs-"))
    grid = start_grid(ns.grid, models, out, ns.tiny, logs) if ns.grid else []
    if build.wait() != 0:
        raise SystemExit(f"random_models.py exited {build.returncode}")
    for shape, proc, log in grid:
        try:
            proc.wait(timeout=max(1.0, t_start + ns.grid_wait_s - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        record({"grid": shape, "exit_code": proc.returncode, "at_s": time.time() - t_start})
    pack_logs(logs, out)

    work = Path(tempfile.mkdtemp(prefix="speed-data-"))
    data = work / "realistic.jsonl"
    write_realistic(data, ns.rows, 2048)
    cache = work / "compile-cache"  # QLORA_COMPILE_CACHE_DIR of every qlora run: cold first
    ns_q = argparse.Namespace(
        seq=2048,
        dtype="bfloat16",
        qlora_backend="unsloth",
        optimizer="adamw_8bit",
        warm=ns.warm,
        scrape_interval=1.0,
    )
    for runner in runners:
        # Skip a runner that would not end before the deadline (durations seen on an H200).
        expected = 60 if "1b" in runner.split("-") else 95
        if time.time() + expected > deadline:
            record({"runner": runner, "skipped": "budget", "at_s": time.time() - t_start})
            continue
        shape = _shape(runner, ns.tiny)
        mdir = models / shape
        cfg = json.loads((mdir / "config.json").read_text())
        n_params = speed.param_count(cfg)
        rec: dict[str, Any] = {
            "runner": runner,
            "shape": shape,
            "params": n_params,
            "bf16_matmul_tflops": tflops,
            "card": env.get("card"),
            "rows_file": "realistic lognormal",
            "steps": ns.steps,
        }
        t0 = time.time()
        if runner.startswith(("unsloth", "hf")):
            backend = runner.split("-")[0]
            res = work / f"{runner}.json"
            mb, accum = (16, 1) if runner.endswith("16x1") else (2, 8)
            ns_b = argparse.Namespace(seq=2048, mb=mb, accum=accum)
            cmd = speed.bare_cmd(ns_b, backend, mdir, data, ns.steps, ns.warm, res)
            proc = subprocess.run(
                cmd,
                cwd=work,
                env=os.environ | OFFLINE_ENV,
                capture_output=True,
                text=True,
                timeout=max(60, deadline - time.time()),
            )
            rec |= {"exit_code": proc.returncode, "micro_batch": mb, "accumulation": accum}
            if res.exists():
                rec |= json.loads(res.read_text())
            else:
                rec["log_tail"] = (proc.stdout + proc.stderr)[-4000:]
        else:
            today = runner.startswith("qlora-today")
            gpu_class = "80GB" if "80gb" in runner.split("-") else "24GB"
            probe = work / f"probe-{runner}"
            probe.mkdir(parents=True, exist_ok=True)
            text = speed.spec_text(
                "probe", mdir, data, work / "store-probe", ns_q, "auto", "auto", ns.steps,
                gpu_class,
            )
            ns_q.drop_gc = not today  # checkpointing left to the planner
            if ns_q.drop_gc:
                text = text.replace("    gradient_checkpointing: true\n", "")
            (probe / "job.yaml").write_text(text)
            plan = plan_for(probe / "job.yaml", cfg, gpu_class, None if today else data)
            rec |= {
                "plan_micro_batch": plan["micro_batch_size"],
                "plan_accumulation": plan["gradient_accumulation_steps"],
                "plan_gradient_checkpointing": plan.get("gradient_checkpointing"),
                "plan_checkpointed_layers": plan.get("checkpointed_layers"),
                "plan_peak_micro_batch_tokens": plan.get("peak_micro_batch_tokens"),
                "plan_vram_estimate_bytes": plan["vram_estimate_bytes"],
                "gpu_class": gpu_class,
            }
            extra_env = {"QLORA_COMPILE_CACHE_DIR": str(cache)}
            if runner in ns.profile.split(","):
                extra_env["QLORA_TORCH_PROFILE"] = str(out / f"profile-{runner}.txt")
            if today:  # before issue 13: no varlen patch, default allocator
                extra_env |= {"QLORA_VARLEN_ATTENTION": "0", "QLORA_EXPANDABLE_SEGMENTS": "0"}
            rec["cache"] = "warm" if cache.exists() else "cold"
            os.environ.update(extra_env)
            try:
                rec |= speed.run_qlora(
                    ns_q, f"sd-{runner}", mdir, data, work, "auto", "auto", ns.steps, plan, None
                )
            finally:
                for k in extra_env:
                    os.environ.pop(k, None)
            log_path = work / f"sd-{runner}.log"
            if log_path.exists():
                (logs / f"log-{runner}.txt").write_text(log_path.read_text(errors="replace"))
            rec["replan"] = replan_line(log_path)
            marks = speed.log_marks(log_path)
            if 1 in marks:
                rec["first_step_end_s"] = marks[1][0] - t0  # launch to the end of step 1
            times = rec.get("step_times_s") or []
            if times:
                med = sorted(times)[len(times) // 2]
                tok = (rec.get("train_tokens") or 0) / max(1, rec.get("steps") or ns.steps)
                rec["median_step_s"] = med
                rec["median_step_tokens_per_s"] = tok / med if med else None
            rp = rec.get("replan") or {}
            res_b = rec.get("qlora_gpu_memory_peak_reserved_bytes")
            if rp.get("vram_estimate_bytes") and res_b:
                from runner.plan.estimator import DEFAULT_CALIBRATION

                est = rp["vram_estimate_bytes"] - DEFAULT_CALIBRATION.cuda_context_bytes
                rec["estimate_vs_reserved"] = est / res_b - 1
                alloc = rec.get("qlora_gpu_memory_peak_allocated_bytes")
                if alloc:
                    rec["estimate_vs_allocated"] = est / alloc - 1
                # The training phase's own peak (logged as training ended): what the estimate
                # sizes; the whole-process gauge above also spans verification and evaluation.
                train_res = rp.get("training_peak_reserved_bytes")
                if train_res:
                    rec["estimate_vs_training_reserved"] = est / train_res - 1
        rec["process_s"] = time.time() - t0
        rec["wall_s"] = rec["process_s"]
        for key in ("tokens_per_s", "steady_tokens_per_s", "median_step_tokens_per_s"):
            if rec.get(key) and tflops:
                rec[key.replace("tokens_per_s", "mfu")] = 4 * n_params * rec[key] / (tflops * 1e12)
        record(rec)
        pack_logs(logs, out)
    print(f"total {time.time() - t_start:.0f}s", flush=True)
    return 0


def replan_line(log_path: Path) -> dict[str, Any] | None:
    """The pod's re-plan record (JSON log) and its first-step time, from a run's log."""
    found: dict[str, Any] = {}
    for line in log_path.read_text(errors="replace").splitlines() if log_path.exists() else []:
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "replan" in rec:
            r = rec["replan"]
            found |= {
                k: r.get(k)
                for k in (
                    "micro_batch_size",
                    "gradient_accumulation_steps",
                    "gradient_checkpointing",
                    "checkpointed_layers",
                    "peak_micro_batch_tokens",
                    "vram_estimate_bytes",
                )
            }
        if "peak_micro_batch_tokens" in rec and "replan" not in rec:
            found["ordered_peak_tokens"] = rec["peak_micro_batch_tokens"]
        if "varlen_attention" in rec:
            found["varlen_attention"] = rec["varlen_attention"]
        for phase in ("training", "verifying", "evaluating"):  # the peaks as each phase ended
            for kind in ("reserved", "allocated"):
                key = f"{phase}_peak_{kind}_bytes"
                if key in rec:
                    found[key] = rec[key]
    return found or None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
    _ = math
