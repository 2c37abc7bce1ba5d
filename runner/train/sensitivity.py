"""Dynamic 4-bit, measured: how much each linear module's output suffers from nf4.

Before training, for ``quantization.mode: dynamic-4bit`` on a 16-bit checkpoint, the recipe
asks :func:`choose_kept_modules` which linear modules to keep in 16 bit. What is measured, for
every linear module inside the decoder layers (the ones bitsandbytes would quantize):

    score = ||x Ŵᵀ - x Wᵀ||_F / ||x Wᵀ||_F

where ``x`` are the module's real inputs when the 16-bit model runs the first
``quantization.calibration_rows`` training rows of this job (all their tokens, one row per
forward pass, so no padding is scored), ``W`` its weight as the training load stores it
(the compute dtype), and ``Ŵ = dequantize_4bit(quantize_4bit(W))`` with bitsandbytes' own
functions, the quantization type, block size 64 and double quant the training load uses. It is
the error each module's output gets from its own rounding, on this job's data, not the
weight error alone (a module whose inputs are large along the rounded directions scores
high). Modules are then ranked and kept within the planner's budget by the pure
:func:`runner.plan.dynamic_quant.select`.

The 16-bit copy is loaded once on the CPU (host RAM, which the plan counts), never on the
GPU, and freed before training loads the model; the cost is one forward pass per row plus
one rounding and one extra matmul per module.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.errors import missing_extra
from runner.plan.dynamic_quant import ModuleScore, Selection, select
from runner.plan.estimator import TrainingShape, kept_module_extra_bytes
from runner.plan.shapes import LINEAR_NAMES
from runner.train.backend import Precision, TokenizedExample

log = logging.getLogger(__name__)


def decoder_linears(model: Any) -> dict[str, Any]:
    """The decoder's linear modules by full name (``model.layers.3.mlp.down_proj``)."""
    import torch

    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and ".layers." in name
        and name.rsplit(".", 1)[-1] in LINEAR_NAMES
    }


def sixteen_bit_linears(model: Any) -> list[str]:
    """Decoder linear modules of a loaded (possibly peft-wrapped) model whose weights are not
    4-bit: what a dynamic 4-bit load really kept in 16 bit."""
    import torch

    out = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or "lora_" in name or ".layers." not in name:
            continue
        name = name.removesuffix(".base_layer").removeprefix("base_model.model.")
        if name.rsplit(".", 1)[-1] in LINEAR_NAMES and type(m.weight).__name__ != "Params4bit":
            out.append(name)
    return sorted(out)


def measure(
    model_dir: Path,
    rows: Sequence[TokenizedExample],
    precision: Precision,
    *,
    trust_remote_code: bool = False,
) -> dict[str, tuple[float, int]]:
    """Each decoder linear module's relative output error under nf4 (see the module doc), and
    its number of weights."""
    try:
        import bitsandbytes.functional as bnb_f
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise missing_extra(e.name or "torch", "train") from e
    from runner.train.model_files import raise_model_load_error

    dtype = getattr(torch, precision.compute_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, device_map={"": "cpu"}, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # the model files are the user's input: see the helper
        raise_model_load_error(model_dir, e)
    model.eval()
    err: dict[str, float] = {}
    ref: dict[str, float] = {}
    rounded: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def run(module: Any, args: tuple[Any, ...], out: Any) -> None:
            w = module.weight.data
            if name not in rounded:  # bitsandbytes' own nf4 round trip, as the load does it
                q, state = bnb_f.quantize_4bit(
                    w.contiguous(),
                    blocksize=64,
                    quant_type=precision.quant_type,
                    compress_statistics=precision.double_quant,
                )
                rounded[name] = bnb_f.dequantize_4bit(q, state).float()
            x = args[0].float()
            y = x @ w.float().T
            dy = x @ rounded[name].T - y
            err[name] = err.get(name, 0.0) + float(dy.pow(2).sum())
            ref[name] = ref.get(name, 0.0) + float(y.pow(2).sum())

        return run

    linears = decoder_linears(model)
    params = {n: int(m.weight.numel()) for n, m in linears.items()}
    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for row in rows:
                model(input_ids=torch.tensor([list(row.input_ids)]))
    finally:
        for h in handles:
            h.remove()
        rounded.clear()
        del model
        gc.collect()
    return {n: ((err[n] / ref[n]) ** 0.5 if ref[n] > 0 else 0.0, params[n]) for n in err}


def choose_kept_modules(
    model_dir: Path,
    rows: Sequence[TokenizedExample],
    precision: Precision,
    shape: TrainingShape,
    budget_bytes: int,
    *,
    trust_remote_code: bool = False,
) -> Selection:
    """Measure, rank and keep the most sensitive modules within ``budget_bytes``.

    Args:
        model_dir: The 16-bit checkpoint.
        rows: Calibration rows (the first training rows).
        precision: The training load's precision (quant type, double quant, compute dtype).
        shape: The estimator's view of the run (backend, dtype: the bytes of a kept module).
        budget_bytes: The planner's budget.
    """
    started = time.monotonic()
    scores = measure(model_dir, rows, precision, trust_remote_code=trust_remote_code)
    chosen = select(
        [
            ModuleScore(n, round(s, 6), kept_module_extra_bytes(p, shape))
            for n, (s, p) in scores.items()
        ],
        budget_bytes,
    )
    log.info(
        "dynamic-4bit: measured %d modules on %d rows in %.1fs; keeping %d in 16 bit "
        "(%.1f of %.1f MiB): %s",
        len(scores),
        len(rows),
        time.monotonic() - started,
        len(chosen.kept),
        chosen.spent_bytes / 2**20,
        budget_bytes / 2**20,
        ", ".join(f"{m.name} {m.score:.4f}" for m in chosen.kept) or "none",
        extra={"dynamic_4bit": chosen.as_dict()},
    )
    return chosen


def dynamic_4bit(
    job: Any,
    settings: Any,
    plan: Any,
    model_dir: Path,
    train: Sequence[TokenizedExample],
    decided: Any,
    backend: str,
) -> tuple[Any, dict[str, Any] | None]:
    """The recipe's dynamic 4-bit step: the resolved run with its skip list, and the record
    for the logs and the manifest (None when the run is not dynamic 4-bit).

    A pre-quantized checkpoint (``*-unsloth-bnb-4bit``) loads as it is, with its own skip list.
    Otherwise the budget is the plan's (``plan.json``), else what the planner gives this spec
    in the class it would place it in (:func:`runner.plan.planner.dynamic_budget`).
    """
    import dataclasses
    import json

    from runner.errors import RunnerError
    from runner.plan.planner import dynamic_budget, estimate_run, training_shape
    from runner.train.backend import prequantized

    precision = decided.precision
    if precision.quant_mode != "dynamic-4bit":
        return decided, None
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if prequantized(model_dir):
        own = (config.get("quantization_config") or {}).get("llm_int8_skip_modules") or []
        log.info(
            "dynamic-4bit: %s is pre-quantized; loaded as it is, with its own skip list (%s)",
            model_dir.name,
            ", ".join(own) or "none",
        )
        return decided, {"prequantized": True, "skip_modules": list(own)}
    q = job.spec.quantization
    if plan is not None and plan.dynamic_4bit_budget_bytes is not None:
        budget = int(plan.dynamic_4bit_budget_bytes)
        source = f"plan (class {plan.gpu_class.name})"
    else:
        try:
            budget, source = dynamic_budget(job, settings, config, backend)
        except RunnerError as e:
            budget = int((q.dynamic_budget_mib or 0) * 2**20)
            source = f"quantization.dynamic_budget_mib (no plan: {e.message})"
            log.warning("dynamic-4bit: no planner budget (%s); using %d bytes", e.message, budget)
    micro = decided.shape.micro_batch_size
    shape = dataclasses.replace(
        training_shape(job, "dynamic-4bit", backend, micro),
        compute_dtype=precision.compute_dtype,
    )
    rows = list(train[: q.calibration_rows])
    chosen = choose_kept_modules(
        model_dir,
        rows,
        precision,
        shape,
        budget,
        trust_remote_code=job.spec.model.trust_remote_code,
    )
    kept = dataclasses.replace(precision, skip_modules=chosen.skip_modules)
    est = estimate_run(
        job,
        config,
        quant_mode="dynamic-4bit",
        backend=backend,
        micro_batch=micro,
        skip_modules=("lm_head", *chosen.skip_modules),
    )
    record = {
        "prequantized": False,
        "measure": "relative output error ||x W_nf4^T - x W^T|| / ||x W^T|| on the calibration "
        "rows' tokens, W_nf4 = bitsandbytes dequantize_4bit(quantize_4bit(W))",
        "calibration_rows": len(rows),
        "budget_source": source,
        "estimate_bytes": est.total_bytes,
        **chosen.as_dict(),
    }
    log.info(
        "dynamic-4bit: estimated peak with the %d kept modules %.2f GiB (budget from %s)",
        len(chosen.kept),
        est.total_bytes / 2**30,
        source,
        extra={"vram_estimate_bytes": est.total_bytes},
    )
    return dataclasses.replace(decided, precision=kept), record
