"""Spec + model config → a :class:`Plan`: precision, GPU class, micro batch and accumulation.

Decisions, in order (each leaves a reason line in the plan):

1. Backend: ``auto`` plans for Unsloth, which the GPU image runs.
2. Precision: an explicit ``quantization.mode`` is kept; ``auto`` with priority ``vram`` is
   4-bit; with priority ``accuracy`` it is 16-bit LoRA if a class holds it, else dynamic 4-bit.
3. Class: the smallest class whose usable memory holds the estimate at the smallest allowed
   micro batch; a class named in ``resources.gpu_class`` is checked instead.
4. Batch: ``auto`` micro batch is the largest divisor of the target effective batch that fits
   the class; accumulation makes up the rest, so the effective batch stays at the target.

When nothing fits, :class:`PlanError` (exit code 3) says by how much and which single changes
would make it fit, each computed with the estimator rather than suggested blindly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from runner.errors import PlanError, SpecError
from runner.plan.classes import GpuClassTable, load_gpu_classes
from runner.plan.dynamic_quant import all_linear_extra_bytes, budget_bytes
from runner.plan.estimator import (
    DEFAULT_CALIBRATION,
    EIGHT_BIT_OPTIMIZERS,
    Calibration,
    Estimate,
    TrainingShape,
    estimate,
)
from runner.plan.layout import Layout, choose_layout
from runner.plan.lengths import LengthProfile
from runner.plan.model_config import load_model_config
from runner.plan.parallel import Layout as RankLayout
from runner.plan.parallel import (
    allreduce_seconds,
    batch_fix,
    candidate_layouts,
    ddp_terms,
    per_rank_batch,
)
from runner.plan.runtime import estimate_runtime
from runner.plan.shapes import ModelShape, quantization_skip_modules, shape_from_config
from runner.plan.types import GIB, MIB, GpuClass, Plan, VramTerm
from runner.settings import Settings
from runner.spec import JobSpec, spec_hash
from runner.spec.model import Backend, QuantMode

GPU_COUNT_LABEL = "nvidia.com/gpu.count"
"""GPU Feature Discovery's label of a node's GPU count."""


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 10**8 else f"{n / 1e6:.2f} M"


def training_shape(
    spec: JobSpec,
    quant_mode: str,
    backend: str,
    micro_batch: int,
    skip_modules: tuple[str, ...] = (),
) -> TrainingShape:
    """The estimator's view of a spec, for one precision, backend and micro batch."""
    s = spec.spec
    skip = skip_modules if quant_mode == "dynamic-4bit" else ()
    cap = s.quantization.dynamic_budget_mib
    return TrainingShape(
        quant_mode=quant_mode,
        backend=backend,
        micro_batch_size=micro_batch,
        seq_len=s.training.max_seq_length,
        lora_r=s.lora.r,
        target_modules=tuple(s.lora.target_modules),
        double_quant=s.quantization.double_quant,
        gradient_checkpointing=s.training.gradient_checkpointing,
        optimizer=s.training.optimizer,
        compute_dtype=s.quantization.compute_dtype,
        skip_modules=skip,
        # A 16-bit checkpoint: the class is sized with Unsloth's published allowance (at most
        # the spec's cap); the budget the runner gets is set at the end of the plan.
        dynamic_cap_bytes=int(cap * MIB) if cap is not None else None,
    )


def estimate_run(
    spec: JobSpec,
    model_config: Mapping[str, Any],
    *,
    quant_mode: str,
    backend: str,
    micro_batch: int,
    calibration: Calibration = DEFAULT_CALIBRATION,
    skip_modules: tuple[str, ...] | None = None,
) -> Estimate:
    """The estimator's peak for a run whose precision, backend and micro batch are decided.

    ``skip_modules`` (dynamic 4-bit, once the runner has chosen them) replaces the config's
    own skip list, so the estimate counts the modules really kept in 16 bit.

    ``qlora run`` without a ``plan.json`` (by hand, on whatever card it finds) uses this to
    put the planner's estimate beside the measured peak, as a planned job does.

    Raises:
        SpecError: unknown architecture, mode, backend or target module.
    """
    shape = shape_from_config(model_config)
    skip = skip_modules if skip_modules is not None else quantization_skip_modules(model_config)
    t = training_shape(spec, quant_mode, backend, micro_batch, skip)
    return estimate(shape, t, calibration)


def _divisors_desc(n: int) -> list[int]:
    return sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True)


@dataclasses.dataclass(frozen=True)
class _Ctx:
    spec: JobSpec
    shape: ModelShape
    table: GpuClassTable
    cal: Calibration
    skip: tuple[str, ...]
    layout: RankLayout = dataclasses.field(default_factory=lambda: RankLayout(1, 1))
    lengths: LengthProfile | None = None

    def est(self, t: TrainingShape) -> Estimate:
        e = estimate(self.shape, t, self.cal)
        extra = ddp_terms(_lora_grad_bytes(e), self.layout)
        if not extra:
            return e
        # DDP's terms go before the CUDA context, which stays the last line.
        terms = (*e.terms[:-1], *extra, e.terms[-1])
        return dataclasses.replace(
            e, terms=terms, total_bytes=e.total_bytes + sum(x.bytes for x in extra)
        )

    def fits(self, t: TrainingShape, c: GpuClass) -> bool:
        return self.est(t).total_bytes <= self.table.usable_bytes(c)


def _largest_fitting(values: list[int], make: Any, ctx: _Ctx, c: GpuClass) -> int | None:
    """The first of ``values`` (ordered best first) whose training shape fits ``c``."""
    for v in values:
        if ctx.fits(make(v), c):
            return int(v)
    return None


def _knobs(ctx: _Ctx, t: TrainingShape, c: GpuClass) -> list[str]:
    """Single changes that make ``t`` fit ``c``, each checked with the estimator."""
    out: list[str] = []
    repl = dataclasses.replace
    if t.seq_len > 128:
        lo, hi = 128, t.seq_len - 1
        if ctx.fits(repl(t, seq_len=lo), c):
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if ctx.fits(repl(t, seq_len=mid), c) else (lo, mid - 1)
            out.append(f"spec.training.max_seq_length: {lo} or less fits")
    if t.micro_batch_size > 1:
        m = _largest_fitting(
            list(range(t.micro_batch_size - 1, 0, -1)),
            lambda v: repl(t, micro_batch_size=v),
            ctx,
            c,
        )
        if m:
            out.append(
                f"spec.training.micro_batch_size: {m} fits (raise "
                "gradient_accumulation_steps to keep the effective batch)"
            )
    if t.quant_mode == "16bit" and ctx.fits(repl(t, quant_mode="4bit"), c):
        out.append("spec.quantization.mode: '4bit' fits")
    ranks = [r for r in (256, 128, 64, 32, 16, 8, 4, 2, 1) if r < t.lora_r]
    r = _largest_fitting(ranks, lambda v: repl(t, lora_r=v), ctx, c)
    if r:
        out.append(f"spec.lora.r: {r} fits")
    if t.backend == "transformers" and ctx.fits(repl(t, backend="unsloth"), c):
        out.append("spec.training.backend: 'unsloth' fits (offloaded checkpoints, fused loss)")
    if not t.gradient_checkpointing and ctx.fits(repl(t, gradient_checkpointing=True), c):
        out.append("spec.training.gradient_checkpointing: true fits")
    if t.optimizer not in EIGHT_BIT_OPTIMIZERS and ctx.fits(repl(t, optimizer="adamw_8bit"), c):
        out.append("spec.training.optimizer: 'adamw_8bit' fits")
    return out


def _does_not_fit(ctx: _Ctx, t: TrainingShape, c: GpuClass, asked: bool) -> PlanError:
    need = ctx.est(t).total_bytes
    usable = ctx.table.usable_bytes(c)
    where = f"resources.gpu_class '{c.name}'" if asked else f"the largest GPU class, {c.name},"
    knobs = _knobs(ctx, t, c)
    if asked:
        bigger = [
            k.name
            for k in ctx.table.classes
            if k.min_memory_mib > c.min_memory_mib and ctx.fits(t, k)
        ]
        if bigger:
            knobs.insert(0, f"spec.resources.gpu_class: '{bigger[0]}' (or 'auto') fits")
    if not knobs:
        knobs = [
            "no single change of sequence length, micro batch, precision, rank, backend "
            "or optimizer is enough; use a smaller model"
        ]
    return PlanError(
        f"does not fit: {t.quant_mode} {t.backend} training needs {_gib(need)} but {where} "
        f"leaves {_gib(usable)} ({c.min_memory_mib} MiB - {ctx.table.safety_margin:.0%} "
        f"margin); short by {_gib(need - usable)}",
        knobs,
    )


def _precisions(spec: JobSpec) -> tuple[list[str], str]:
    mode = str(spec.spec.quantization.mode)
    if mode != "auto":
        return [mode], f"precision {mode}: set in quantization.mode"
    if spec.spec.resources.priority == "accuracy":
        return ["16bit", "dynamic-4bit"], "accuracy"
    return ["4bit"], "precision 4bit: quantization.mode auto with resources.priority vram"


def make_plan(
    spec: JobSpec,
    settings: Settings,
    *,
    model_config: Mapping[str, Any] | None = None,
    gpu_classes: GpuClassTable | None = None,
    calibration: Calibration = DEFAULT_CALIBRATION,
    lengths: LengthProfile | None = None,
) -> Plan:
    """Plan a job: precision, GPU class, batch shape, memory and a runtime estimate.

    Args:
        spec: The validated job spec.
        settings: Deployment settings (class table file, S3 endpoint for the model config).
        model_config: The model's ``config.json``; found from ``spec.model.source`` if None.
        gpu_classes: The class table; loaded from ``settings`` if None.
        calibration: Estimator constants (tests and the benchmark comparison pass their own).
        lengths: The data's token lengths (``qlora plan --data``, the pod's preflight): the
            batch layout is then sized by tokens per micro batch (:mod:`runner.plan.layout`).

    Returns:
        The plan.

    Raises:
        SpecError: unknown architecture, class name or target module (exit code 2).
        PlanError: nothing fits, or not the class asked for (exit code 3).
    """
    if model_config is None:
        found = load_model_config(spec, settings)
        cfg, origin = found.config, found.origin
    else:
        cfg, origin = model_config, "given config"
    shape = shape_from_config(cfg, origin)
    table = gpu_classes or load_gpu_classes(settings)
    base_ctx = _Ctx(
        spec, shape, table, calibration, quantization_skip_modules(cfg), lengths=lengths
    )
    res = spec.spec.resources
    layouts = candidate_layouts(
        res.gpus_per_node,
        res.nodes,
        max_gpus_per_node=settings.max_gpus_per_node,
        max_nodes=settings.max_nodes,
    )
    if len(layouts) == 1:
        only = dataclasses.replace(base_ctx, layout=layouts[0])
        return _plan_layout(spec, settings, only, origin)
    return _choose_layout(spec, settings, base_ctx, origin, layouts)


def _backend_for(asked: str, world: int, settings: Settings) -> tuple[str, str]:
    """The backend the pods will run for ``world`` ranks, and why.

    Raises:
        SpecError: 'unsloth' over several ranks while its DDP path is switched off.
    """
    if world > 1 and not settings.unsloth_ddp:
        if asked == "unsloth":
            raise SpecError(
                f"spec.training.backend: 'unsloth' with world size {world} needs the "
                "deployment setting QLORA_UNSLOTH_DDP=true (Unsloth's DDP path is off until it "
                "passes the multi-GPU tests); use backend auto or transformers"
            )
        if asked == "auto":
            return "transformers", (
                f"training.backend auto with world size {world}: transformers + peft + "
                "bitsandbytes (Unsloth's DDP is behind QLORA_UNSLOTH_DDP, off)"
            )
    if asked == "auto":
        return "unsloth", (
            "training.backend auto; the GPU image runs Unsloth (transformers + peft is its "
            "fallback)"
        )
    return asked, "set in training.backend"


def _lora_grad_bytes(e: Estimate) -> int:
    return next((t.bytes for t in e.terms if t.name == "lora_grads"), 0)


def _choose_layout(
    spec: JobSpec, settings: Settings, ctx: _Ctx, origin: str, layouts: list[RankLayout]
) -> Plan:
    """``gpus_per_node`` or ``nodes`` is 'auto': the fewest GPUs that meet the deadline."""
    res = spec.spec.resources
    target = spec.spec.training.target_effective_batch_size
    usable = [lay for lay in layouts if per_rank_batch(target, lay) is not None] or layouts[:1]
    try:
        one = _plan_layout(spec, settings, dataclasses.replace(ctx, layout=usable[0]), origin)
    except PlanError as e:
        if e.message.startswith("does not fit"):
            raise PlanError(
                e.message,
                [
                    *e.details,
                    "more GPUs do not help: DDP keeps the whole model on every GPU (it shards "
                    "nothing), so resources.gpus_per_node / nodes 'auto' cannot make it fit",
                ],
            ) from e
        raise
    deadline = res.deadline_hours
    if deadline is None:
        why = "no resources.deadline_hours goal, so the fewest GPUs"
        return _with_reason(one, f"layout {usable[0].describe()} ('auto'): {why}")
    if one.estimated_runtime_s is None:
        why = "the runtime is unknown (dataset not local and no training.max_steps)"
        return _with_reason(one, f"layout {usable[0].describe()} ('auto'): {why}")
    goal_s = deadline * 3600
    best = one
    for lay in usable:
        plan = (
            one
            if lay == usable[0]
            else _plan_layout(spec, settings, dataclasses.replace(ctx, layout=lay), origin)
        )
        best = plan
        took = plan.estimated_runtime_s or 0.0
        if took <= goal_s:
            why = (
                f"the fewest GPUs whose estimate ({took / 3600:.1f} h) meets "
                f"resources.deadline_hours {deadline:g}"
            )
            if lay != usable[0]:
                why += f"; {usable[0].describe()} would take {one.estimated_runtime_s / 3600:.1f} h"
            return _with_reason(plan, f"layout {lay.describe()} ('auto'): {why}")
    skipped = [lay.describe() for lay in layouts if lay not in usable]
    why = (
        f"no layout meets resources.deadline_hours {deadline:g} (the largest allowed, "
        f"settings max_gpus_per_node {settings.max_gpus_per_node} x max_nodes "
        f"{settings.max_nodes}, takes ~{(best.estimated_runtime_s or 0) / 3600:.1f} h); "
        "planned with the largest"
    )
    if skipped:
        why += f"; {', '.join(skipped)} skipped: they do not divide target {target}"
    return _with_reason(best, f"layout {best_layout(best).describe()} ('auto'): {why}")


def best_layout(plan: Plan) -> RankLayout:
    """The plan's layout."""
    return RankLayout(plan.gpus_per_node, plan.nodes)


def _with_reason(plan: Plan, reason: str) -> Plan:
    return dataclasses.replace(plan, reasons=(*plan.reasons, reason))


def _plan_layout(spec: JobSpec, settings: Settings, ctx: _Ctx, origin: str) -> Plan:
    """Plan for one layout (GPUs per node x nodes)."""
    shape, table, layout = ctx.shape, ctx.table, ctx.layout
    lengths, calibration = ctx.lengths, ctx.cal
    world = layout.world_size
    tr = spec.spec.training
    backend, why_backend = _backend_for(str(tr.backend), world, settings)
    reasons = [
        f"model: {shape.model_type}, {_count(shape.total_params)} params, "
        f"{shape.num_layers} layers, hidden {shape.hidden_size}, vocab {shape.vocab_size} "
        f"(config: {origin})",
        f"backend {backend}: {why_backend}",
    ]
    if spec.spec.model.trust_remote_code:
        reasons.append("trust_remote_code is ON: the model's own Python code runs in the pod")

    asked = spec.spec.resources.gpu_class
    if asked != "auto":
        chosen = table.by_name(asked)
        if chosen is None:
            raise SpecError(
                f"spec.resources.gpu_class: '{asked}' is not in the GPU class "
                f"table ({table.origin}); choose from {', '.join(table.names)} "
                "or 'auto'"
            )
        candidates: list[GpuClass] = [chosen]
    else:
        candidates = list(table.classes)

    full_target = tr.target_effective_batch_size
    per_rank = per_rank_batch(full_target, layout)
    if per_rank is None:
        raise PlanError(
            f"spec.training.target_effective_batch_size: {full_target} is not a multiple of "
            f"the world size {world} ({layout.describe()}); micro batch x accumulation x "
            f"world size must equal it exactly",
            [f"spec.training.target_effective_batch_size: {batch_fix(full_target, world)}"],
        )
    target = per_rank
    m_fixed = tr.micro_batch_size if tr.micro_batch_size != "auto" else None
    a_fixed = tr.gradient_accumulation_steps if tr.gradient_accumulation_steps != "auto" else None
    m_min = m_fixed or 1
    modes, why_mode = _precisions(spec)

    picked: tuple[str, GpuClass] | None = None
    for mode in modes:
        t = training_shape(spec, mode, backend, m_min, ctx.skip)
        for c in candidates:
            if ctx.fits(t, c):
                picked = (mode, c)
                break
        if picked:
            break
    if picked is None:
        t = training_shape(spec, modes[-1], backend, m_min, ctx.skip)
        raise _does_not_fit(ctx, t, candidates[-1], asked != "auto")
    mode, chosen = picked
    if why_mode == "accuracy":
        why_mode = (
            "precision 16bit: priority accuracy and 16-bit LoRA fits"
            if mode == "16bit"
            else "precision dynamic-4bit: priority accuracy, but 16-bit LoRA fits no "
            + ("class" if asked == "auto" else f"{chosen.name} GPU")
        )
    reasons.append(why_mode)

    if m_fixed is None:
        limit = max(1, target // a_fixed) if a_fixed else target
        options = (
            [d for d in _divisors_desc(target) if d <= limit]
            if not a_fixed
            else list(range(limit, 0, -1))
        )
        m = (
            _largest_fitting(
                options, lambda v: training_shape(spec, mode, backend, v, ctx.skip), ctx, chosen
            )
            or 1
        )
        a = a_fixed or max(1, -(-target // m))
        nxt = next((d for d in sorted(_divisors_desc(target)) if d > m), None)
        why_batch = f"micro batch {m}: the largest divisor of target {target} that fits"
        if nxt:
            need = ctx.est(training_shape(spec, mode, backend, nxt, ctx.skip)).total_bytes
            why_batch += f" ({nxt} would need {_gib(need)})"
    else:
        m = m_fixed
        a = a_fixed or max(1, -(-target // m))
        why_batch = f"micro batch {m}: set in training.micro_batch_size"
        if world > 1 and m * a != target:
            fits = _divisors_desc(target)
            raise PlanError(
                f"spec.training.micro_batch_size: {m} does not divide the {target} sequences "
                f"each of {world} ranks contributes to target_effective_batch_size "
                f"{full_target}, so micro batch x accumulation x world size cannot equal it",
                [
                    f"spec.training.micro_batch_size: one of {', '.join(map(str, fits))} "
                    "(or 'auto')",
                    f"spec.training.target_effective_batch_size: a multiple of {m * world}",
                ],
            )
    if world > 1:
        reasons.append(
            f"{why_batch}; x {a} accumulation x {world} ranks = {m * a * world} sequences per "
            f"step (target {full_target}, exactly)"
        )
    else:
        reasons.append(f"{why_batch}; x {a} accumulation = {m * a} sequences per step")

    final = ctx.est(training_shape(spec, mode, backend, m, ctx.skip))
    data_aware: dict[str, Any] = {}
    if lengths is not None and lengths.rows:
        laid_out = data_aware_layout(
            spec,
            shape,
            training_shape(spec, mode, backend, m, ctx.skip),
            lengths,
            budget_bytes=table.usable_bytes(chosen),
            calibration=calibration,
        )
        if laid_out is not None:
            batch_layout, why_layout = laid_out
            m, a = batch_layout.micro_batch_size, batch_layout.gradient_accumulation_steps
            final = batch_layout.estimate
            reasons[-1] = why_layout
            data_aware = {
                "gradient_checkpointing": batch_layout.gradient_checkpointing,
                "checkpointed_layers": batch_layout.checkpointed_layers,
                "peak_micro_batch_tokens": batch_layout.peak_tokens,
                "data_lengths": lengths.summary(),
            }
    usable = table.usable_bytes(chosen)
    dyn_budget: int | None = None
    if mode == "dynamic-4bit" and not ctx.skip:
        t_final = training_shape(spec, mode, backend, m, ctx.skip)
        final, dyn_budget, why_dyn = _dynamic_budget(spec, shape, t_final, final, usable)
        reasons.append(why_dyn)
    smaller = [c.name for c in table.classes if c.min_memory_mib < chosen.min_memory_mib]
    why_class = (
        f"class {chosen.name}: "
        + (
            "set in resources.gpu_class; "
            if asked != "auto"
            else "smallest class that holds the estimate; "
        )
        + f"usable {_gib(usable)} ({chosen.min_memory_mib} MiB floor - "
        f"{table.safety_margin:.0%} margin), estimate {_gib(final.total_bytes)} "
        f"({final.total_bytes / usable:.0%} used)"
    )
    if smaller and asked == "auto":
        why_class += f"; {', '.join(smaller)} too small"
    reasons.append(why_class)
    reasons.append(f"node affinity: {settings.gpu_memory_label} Gt {chosen.min_memory_mib - 1}")
    if layout.gpus_per_node > 1:
        reasons.append(
            f"node affinity: {GPU_COUNT_LABEL} Gt {layout.gpus_per_node - 1} "
            f"(each node holds {layout.gpus_per_node} GPUs)"
        )
    allreduce = allreduce_seconds(_lora_grad_bytes(final), layout)
    if world > 1:
        reasons.append(
            f"data parallel over {layout.describe()}: each GPU holds the whole {mode} model, "
            f"its own activations and LoRA state; {_gib(final.total_bytes)} per GPU; DDP "
            "does not shard the model, so more GPUs shorten the run but never make it fit"
        )
    runtime = estimate_runtime(
        spec, shape, chosen, backend, m * a * world, world_size=world, allreduce_s=allreduce
    )
    reasons.append(f"runtime: {runtime.note}")
    host = final.host_bytes
    if dyn_budget is not None:  # the 16-bit copy the sensitivity is measured on (host RAM)
        host += 2 * shape.total_params
    return Plan(
        spec_hash=spec_hash(spec),
        gpu_class=chosen,
        backend=backend,
        quant_mode=mode,
        micro_batch_size=m,
        gradient_accumulation_steps=a,
        vram_terms=final.terms,
        vram_estimate_bytes=final.total_bytes,
        host_memory_bytes=-(-host // GIB) * GIB * layout.gpus_per_node,  # one process per GPU
        cpu_cores=chosen.cpu_cores * layout.gpus_per_node,
        tokens_per_step=m * a * world * tr.max_seq_length,
        estimated_runtime_s=runtime.seconds,
        reasons=tuple(reasons),
        usable_memory_bytes=usable,
        tokens_per_second=runtime.tokens_per_second,
        model_config_origin=origin,
        trust_remote_code=spec.spec.model.trust_remote_code,
        prefer_below_mib=next(
            (c.min_memory_mib for c in table.classes if c.min_memory_mib > chosen.min_memory_mib),
            None,
        ),
        gpus_per_node=layout.gpus_per_node,
        nodes=layout.nodes,
        allreduce_s_per_step=allreduce,
        dynamic_4bit_budget_bytes=dyn_budget,
        **data_aware,
    )


_DYNAMIC_TERMS = ("dynamic_4bit_kept", "dynamic_4bit_allowance")


def _dynamic_budget(
    spec: JobSpec, shape: ModelShape, t: TrainingShape, final: Estimate, usable: int
) -> tuple[Estimate, int, str]:
    """Dynamic 4-bit on a 16-bit checkpoint: the budget for kept modules, and the estimate
    with it counted (term ``dynamic_4bit_kept``) in place of the sizing allowance."""
    q = spec.spec.quantization
    rest = final.total_bytes - sum(x.bytes for x in final.terms if x.name in _DYNAMIC_TERMS)
    everything = all_linear_extra_bytes(shape, t)
    budget = budget_bytes(usable, rest, q.dynamic_budget_mib, everything)
    kept = VramTerm(
        "dynamic_4bit_kept",
        budget,
        "budget for the linear modules the runner keeps in 16 bit (chosen from their "
        "measured nf4 sensitivity before training)",
    )
    terms: list[VramTerm] = []
    for term in final.terms:
        if term.name in _DYNAMIC_TERMS:
            continue
        terms.append(term)
        if term.name == "weights_unquantized":
            terms.append(kept)
    new = dataclasses.replace(final, terms=tuple(terms), total_bytes=rest + budget)
    cap = (
        f", capped by quantization.dynamic_budget_mib {q.dynamic_budget_mib:g}"
        if q.dynamic_budget_mib is not None
        else ""
    )
    why = (
        f"dynamic-4bit budget {budget / MIB:.1f} MiB for linear modules kept in 16 bit: usable "
        f"{_gib(usable)} - rest of the estimate {_gib(rest)}{cap}; keeping all would add "
        f"{everything / MIB:.1f} MiB; the runner ranks the modules by their nf4 output error on "
        f"{q.calibration_rows} training rows and keeps the most sensitive within it (expected "
        f"extra memory at most {budget / MIB:.1f} MiB, counted in the estimate)"
    )
    return new, budget, why


def dynamic_budget(
    spec: JobSpec, settings: Settings, model_config: Mapping[str, Any], backend: str
) -> tuple[int, str]:
    """The dynamic 4-bit budget for a run that has no ``plan.json`` (``qlora run`` by hand):
    what the planner would give it in the class it would place the spec in.

    Raises:
        SpecError, PlanError: as :func:`make_plan`.
    """
    body = spec.spec
    pinned = spec.model_copy(
        update={
            "spec": body.model_copy(
                update={
                    "training": body.training.model_copy(update={"backend": Backend(backend)}),
                    "quantization": body.quantization.model_copy(
                        update={"mode": QuantMode.DYNAMIC_FOUR_BIT}
                    ),
                }
            )
        }
    )
    plan = make_plan(pinned, settings, model_config=model_config)
    why = next((r for r in plan.reasons if r.startswith("dynamic-4bit budget")), "")
    return plan.dynamic_4bit_budget_bytes or 0, f"class {plan.gpu_class.name}: {why}"


def data_aware_layout(
    spec: JobSpec,
    shape: ModelShape,
    base: TrainingShape,
    lengths: LengthProfile,
    *,
    budget_bytes: int,
    calibration: Calibration = DEFAULT_CALIBRATION,
) -> tuple[Layout, str] | None:
    """The data-aware layout inside ``budget_bytes`` and its reason line, or None.

    Only what the spec leaves to the planner changes: a micro batch or accumulation set in
    the spec is kept, and checkpointing is only reduced when ``training.gradient_checkpointing``
    is not set explicitly.
    """
    tr = spec.spec.training
    if tr.packing:
        return None  # packed rows are max_seq_length long already
    target = tr.target_effective_batch_size
    m_fixed = tr.micro_batch_size if tr.micro_batch_size != "auto" else None
    a_fixed = tr.gradient_accumulation_steps if tr.gradient_accumulation_steps != "auto" else None
    if m_fixed and a_fixed:
        target, options = m_fixed * a_fixed, [m_fixed]
    elif m_fixed:
        options = [m_fixed]
    elif a_fixed:
        options = [max(1, target // a_fixed)]
    else:
        options = None
    layout = choose_layout(
        shape,
        base,
        lengths,
        budget_bytes=budget_bytes,
        effective_batch=target,
        seed=tr.seed,
        micro_batches=options,
        allow_checkpointing_change="gradient_checkpointing" not in tr.model_fields_set
        and tr.gradient_checkpointing,
        cal=calibration,
    )
    if layout is None:
        return None
    why = (
        f"layout from the data's lengths ({lengths.summary()}): "
        f"{layout.describe(shape.num_layers)}; x {layout.gradient_accumulation_steps} "
        f"accumulation = {layout.micro_batch_size * layout.gradient_accumulation_steps} "
        f"rows per step; the fastest predicted of the layouts that fit "
        f"({layout.step_s:.2f} s/step predicted)"
    )
    return layout, why


def plan_for_card(
    spec: JobSpec,
    settings: Settings,
    *,
    card_memory_bytes: int,
    card_name: str,
    backend: str,
    model_config: Mapping[str, Any] | None = None,
    gpu_classes: GpuClassTable | None = None,
    calibration: Calibration = DEFAULT_CALIBRATION,
) -> Plan:
    """Plan for the one card this process runs on (``qlora run`` by hand, no ``plan.json``).

    The class table is that card alone, with the deployment table's safety margin, so the
    plan picks micro batch, accumulation and precision for the memory really there. The
    spec's ``resources.gpu_class`` says where a cluster would schedule the job; by hand the
    card is what it is, so it is not consulted. ``backend`` is the one that will train
    (Unsloth, or the transformers fallback where Unsloth does not import).

    Raises:
        SpecError: unknown architecture or target module.
        PlanError: the run does not fit this card.
    """
    margin = (gpu_classes or load_gpu_classes(settings)).safety_margin
    card = GpuClass(
        name="this-card", min_memory_mib=card_memory_bytes // MIB, reference_card=card_name
    )
    table = GpuClassTable((card,), margin, f"this process's {card_name}")
    body = spec.spec
    local = spec.model_copy(
        update={
            "spec": body.model_copy(
                update={
                    "resources": body.resources.model_copy(update={"gpu_class": "auto"}),
                    "training": body.training.model_copy(update={"backend": Backend(backend)}),
                }
            )
        }
    )
    plan = make_plan(
        local, settings, model_config=model_config, gpu_classes=table, calibration=calibration
    )
    return dataclasses.replace(
        plan,
        spec_hash=spec_hash(spec),
        prefer_below_mib=None,
        reasons=(*plan.reasons, f"planned for this process's {card_name} (no plan.json)"),
    )


def replan_in_class(
    spec: JobSpec,
    settings: Settings,
    plan: Plan,
    lengths: LengthProfile,
    *,
    model_config: Mapping[str, Any],
    calibration: Calibration = DEFAULT_CALIBRATION,
) -> Plan:
    """Re-plan at preflight with the real token lengths, inside the class ``plan`` placed.

    The pod was scheduled for ``plan.gpu_class``; only micro batch, accumulation (as the
    target effective batch allows) and checkpointing may change, never the class, the
    precision or the backend.

    Raises:
        PlanError: the class no longer holds the run (the caller keeps the original plan).
    """
    margin = (load_gpu_classes(settings)).safety_margin
    table = GpuClassTable((plan.gpu_class,), margin, f"the placed class {plan.gpu_class.name}")
    body = spec.spec
    pinned = spec.model_copy(
        update={
            "spec": body.model_copy(
                update={
                    "resources": body.resources.model_copy(
                        update={"gpu_class": plan.gpu_class.name}
                    ),
                    "training": body.training.model_copy(update={"backend": Backend(plan.backend)}),
                    "quantization": body.quantization.model_copy(
                        update={"mode": QuantMode(plan.quant_mode)}
                    ),
                }
            )
        }
    )
    new = make_plan(
        pinned,
        settings,
        model_config=model_config,
        gpu_classes=table,
        calibration=calibration,
        lengths=lengths,
    )
    return dataclasses.replace(
        new, spec_hash=plan.spec_hash, prefer_below_mib=plan.prefer_below_mib
    )
