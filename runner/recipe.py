"""The training job, start to finish: what ``qlora run`` does inside the pod.

Read it top to bottom; each phase is one block in :func:`run`:

1. **loading**: spec (and ``plan.json`` beside it), base model files, data rows, tokenizer;
2. **preflight**: format and tokenize the rows exactly as they will be trained; refuse empty,
   malformed or loss-less data (exit 2) before any GPU time is spent;
3. **training**: resume from the newest complete checkpoint of this spec in storage, if any;
   load the base model with LoRA attached, snapshot the LoRA tensors, train, committing
   checkpoints on schedule and on SIGTERM (then exit 7; :mod:`runner.train.preemption`);
   CUDA out of memory exits 6;
4. **verifying**: the LoRA tensors changed and are finite; save the adapter; reload it on a
   fresh base model, check hashes and logits (exit 4, nothing published, on failure);
5. **evaluating**: base and adapter on the same held-out rows (the eval split, else a slice
   held out of training before it began): loss, perplexity and, where answers are scored,
   accuracy with a 95 % interval; a failed quality gate exits 4 and publishes nothing
   (:mod:`runner.train.evaluate`);
6. **publishing**: upload the adapter with a manifest written last (storage errors exit 5),
   then prune all but the newest checkpoint;
7. **succeeded** / **failed**.

Every phase change is logged and passed to ``on_phase`` hooks (metrics, and the watchdog that
ends a phase over its time budget with exit 13: :mod:`runner.watchdog`). The training stack
and the storage client are only reached through :mod:`runner.train` and :mod:`runner.publish`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from runner import __version__
from runner.errors import ExitCode, PlanError, RunnerError, VerificationError
from runner.job_metrics import JobMetrics
from runner.plan.types import GIB, MIB, Plan
from runner.settings import Settings, load_settings
from runner.spec import RUN_SPEC_HINT, JobSpec, load_spec, resolve_spec_path, spec_hash
from runner.train.preemption import PreemptionGuard
from runner.watchdog import Watchdog, make_watchdog_callback

log = logging.getLogger("runner.recipe")

EVAL_REPORT = "evaluation.json"
"""Written into the work directory by every evaluation (the manifest holds it on success)."""
PLAN_FILE = "plan.json"
"""Read from the spec's directory when present (the ConfigMap mounts both keys together)."""
LIBRARIES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "unsloth",
)


class Phase(StrEnum):
    """Where a run is; each value is logged and reported to ``on_phase`` hooks."""

    LOADING = "loading"
    PREFLIGHT = "preflight"
    TRAINING = "training"
    VERIFYING = "verifying"
    EVALUATING = "evaluating"
    PUBLISHING = "publishing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


PhaseHook = Callable[[Phase], None]


@dataclass(frozen=True)
class RunResult:
    """What a successful run produced."""

    run_id: str
    run_uri: str
    manifest_uri: str
    metadata: dict[str, Any]


def run(
    spec_path: str | None = None,
    *,
    settings: Settings | None = None,
    callbacks: Sequence[Any] = (),
    on_phase: Sequence[PhaseHook] = (),
) -> RunResult:
    """Train, verify and publish one adapter.

    Args:
        spec_path: The job spec; None reads ``$QLORA_SPEC`` or ``/etc/qlora/job.yaml``.
        settings: Deployment settings; default from the environment.
        callbacks: Extra ``transformers.TrainerCallback`` objects (metrics, tests).
        on_phase: Called with each :class:`Phase` as the run enters it.

    Raises:
        RunnerError: a subclass whose ``exit_code`` is the documented exit code.
    """
    from runner.train import distributed
    from runner.train.speedups import apply_allocator_env, apply_compile_cache_env

    # First of all: PyTorch reads its allocator variable when torch is imported, and the
    # watchdog's callback below imports transformers (and torch) already.
    apply_compile_cache_env()  # kernel caches on QLORA_COMPILE_CACHE_DIR, before Unsloth loads
    apply_allocator_env()  # expandable segments (runner.train.speedups)
    settings = settings or load_settings()
    started = time.monotonic()
    rank = distributed.current()  # rank 0 of 1 unless torchrun started this process
    # Served once the spec names the port (+ local rank); rank 0 alone pushes the job's totals.
    metrics = JobMetrics(settings, rank=rank.rank, local_rank=rank.local_rank)
    guard = PreemptionGuard()  # SIGTERM: checkpoint, then exit 7 (runner.train.preemption)
    watchdog = Watchdog.from_settings(settings)  # a phase over its budget: exit 13
    phase = _PhaseTracker((guard.on_phase, watchdog.on_phase, *on_phase, metrics.set_phase))
    exit_code = int(ExitCode.INTERNAL)
    try:
        with guard:
            distributed.init(rank, settings.ddp_timeout_s)
            callbacks = (*callbacks, make_watchdog_callback(watchdog))
            result = _run(resolve_spec_path(spec_path), settings, callbacks, phase, metrics, guard)
        exit_code = int(ExitCode.OK)
    except BaseException as e:
        exit_code = _exit_code(e)
        phase.enter(Phase.FAILED, error=type(e).__name__)
        raise
    finally:
        metrics.close(exit_code)
        distributed.close()
    phase.enter(Phase.SUCCEEDED, run_id=result.run_id, runtime_s=time.monotonic() - started)
    return result


def _exit_code(e: BaseException) -> int:
    """The process exit code ``e`` will end in (as the CLI maps it)."""
    if isinstance(e, RunnerError):
        return int(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED)
    if isinstance(e, SystemExit) and isinstance(e.code, int):
        return e.code
    return int(ExitCode.INTERNAL)


def _run(
    spec_path: str,
    settings: Settings,
    callbacks: Sequence[Any],
    phase: _PhaseTracker,
    metrics: JobMetrics,
    guard: PreemptionGuard,
) -> RunResult:
    # Imported here so `qlora --help` and the pure commands never load the training modules.
    from runner.checkpoints import CheckpointStore, checkpoint_identity
    from runner.publish import new_run_id, publish_adapter
    from runner.train import distributed, select_backend
    from runner.train.allocator import allocator_report, dump_history, start_history
    from runner.train.backend import cuda_available, cuda_bf16_supported, release_device_memory
    from runner.train.dataset import load_rows
    from runner.train.evaluate import held_out
    from runner.train.faults import make_fault_callbacks
    from runner.train.formatting import format_rows, resolve_chat_template
    from runner.train.model_files import load_tokenizer, resolve_model
    from runner.train.oom import cuda_oom_as_error
    from runner.train.preemption import make_checkpoint_callback
    from runner.train.preflight import preflight
    from runner.train.progress import make_progress_callback
    from runner.train.resolve import resolve
    from runner.train.speedups import expandable_requested
    from runner.train.verify import (
        check_reloaded,
        check_weight_update,
        make_snapshot_callback,
        snapshot_lora,
    )

    # 1. loading
    rank = distributed.current()
    phase.enter(Phase.LOADING, spec=spec_path, rank=rank.rank, world_size=rank.world_size)
    job = load_spec(spec_path, hint=RUN_SPEC_HINT)
    if job.spec.model.trust_remote_code:
        log.warning(
            "model.trust_remote_code is true: Python code shipped with %s will run in this process",
            job.spec.model.source,
            extra={"trust_remote_code": True, "model_source": job.spec.model.source},
        )
    run_id = new_run_id(spec_hash(job))
    metrics.open(job, run_id)
    body = job.spec
    plan = _read_plan(Path(spec_path).parent / PLAN_FILE)
    work = Path(settings.work_dir) / job.metadata.name
    if rank.world_size > 1:  # ranks of one node share the disk, not their scratch files
        work = work / f"rank-{rank.rank}"
    fetcher = _fetcher(work, settings)
    base = resolve_model(body.model, fetcher, _cache_dir(settings))  # config.json checked first
    backend = select_backend(
        body.training.backend, world_size=rank.world_size, unsloth_ddp=settings.unsloth_ddp
    )
    cuda = cuda_available()
    if plan is None and cuda:  # by hand on a GPU: plan for the card that is there
        plan = plan_this_card(job, settings, backend.name)
    decided = resolve(
        body, plan, cuda=cuda, bf16=cuda_bf16_supported(), world_size=rank.world_size
    )
    for reason in decided.reasons:
        log.info("resolved: %s", reason)
    metrics.describe(
        backend=backend.name,
        quant_mode=decided.precision.quant_mode,
        plan=plan,
        shape=decided.shape,
    )
    if plan is None and cuda:  # no plan even for this card: still put an estimate beside
        estimated = estimate_without_plan(
            job,
            base.path,
            quant_mode=decided.precision.quant_mode,
            backend=backend.name,
            micro_batch=decided.shape.micro_batch_size,
        )
        if estimated is not None:
            metrics.set_estimate(estimated)
    tokenizer = load_tokenizer(base.path, body.model.trust_remote_code)

    # 2. preflight (rank 0 reads and tokenizes once; the other ranks get its result)
    phase.enter(Phase.PREFLIGHT)
    max_len = decided.shape.max_seq_length

    def prepare() -> Any:
        data = load_rows(body.dataset, fetcher, seed=body.training.seed)
        held = None
        if body.evaluation.enabled:  # carved before training, so no scored row is trained on
            extra = body.evaluation.sources
            train_only, held = held_out(
                data.train,
                _eval_rows(body, fetcher) if extra else data.eval,
                body.evaluation.holdout_fraction,
                body.training.seed,
                body.evaluation.max_rows,
            )
            data = dataclasses.replace(data, train=train_only)
        template = resolve_chat_template(body.dataset, tokenizer, base.path)
        train_rows = format_rows(data.train, body.dataset, tokenizer, template)
        train, report = preflight(train_rows, tokenizer, max_len)
        eval_data, eval_report = None, None
        if data.eval:
            eval_rows = format_rows(data.eval, body.dataset, tokenizer, template)
            eval_data, eval_report = preflight(eval_rows, tokenizer, max_len, name="eval")
        return data, held, template, train, report, eval_data, eval_report

    data, held, template, train, report, eval_data, eval_report = distributed.share_from_main(
        rank, prepare
    )
    log.info(
        "preflight: %d rows, %d tokens, %.1f%% carry loss, %.1f%% of rows truncated",
        report.rows,
        report.tokens,
        100 * report.loss_token_fraction,
        100 * report.truncation_rate,
        extra={"preflight": report.as_dict()},
    )

    # The real lengths may allow a faster layout in the placed class; an out-of-memory retry
    # (attempt > 0) keeps the operator's smaller, fully checkpointed layout instead.
    if plan is not None and cuda and settings.attempt == 0:
        plan, decided = _replan_with_lengths(job, settings, plan, base.path, train, decided)
        metrics.set_estimate(plan.vram_estimate_bytes)

    # Dynamic 4-bit: measure each linear module's nf4 output error on the first training rows
    # and keep the most sensitive in 16 bit within the plan's budget (runner.train.sensitivity).
    from runner.train.sensitivity import dynamic_4bit, sixteen_bit_linears

    decided, dyn4 = dynamic_4bit(job, settings, plan, base.path, train, decided, backend.name)
    if dyn4 is not None and not dyn4["prequantized"]:
        metrics.set_estimate(dyn4["estimate_bytes"])

    # 3. training
    phase.enter(Phase.TRAINING, backend=backend.name, precision=decided.precision.quant_mode)
    shape = decided.shape
    checkpoints = CheckpointStore.open(
        body.output.uri,
        checkpoint_identity(
            job,
            dataset_fingerprint=data.fingerprint,
            base_model_config_sha256=base.config_sha256,
            effective_batch_size=shape.micro_batch_size
            * shape.gradient_accumulation_steps
            * rank.world_size,
            quant_mode=decided.precision.quant_mode,
            compute_dtype=decided.precision.compute_dtype,
        ),
        settings,
    )
    resume = checkpoints.restore_latest(work / "resume")  # newest complete one, else None
    metrics.metrics.set_resumed_from(resume.checkpoint.step if resume else 0)
    shutil.rmtree(work / "trainer", ignore_errors=True)
    start_history()  # QLORA_CUDA_MEMORY_HISTORY: the allocator's history, load to trained
    session = backend.load(
        base.path,
        decided.precision,
        body.lora,
        seed=body.training.seed,
        max_seq_length=max_len,
        trust_remote_code=body.model.trust_remote_code,
        gradient_checkpointing=shape.gradient_checkpointing,
    )
    if dyn4 is not None:  # what the load really kept, beside what was asked for
        dyn4["loaded_16bit"] = sixteen_bit_linears(session.model)
        log.info(
            "dynamic-4bit: %d decoder linear modules loaded in 16 bit",
            len(dyn4["loaded_16bit"]),
            extra={"loaded_16bit": dyn4["loaded_16bit"]},
        )
    start = make_snapshot_callback()  # LoRA tensors as training begins (after any dtype cast)
    saver = make_checkpoint_callback(
        checkpoints,
        guard,
        every_steps=body.training.checkpoint_every_steps,
        every_minutes=body.training.checkpoint_every_minutes,
        observer=metrics.metrics,
    )
    try:
        with guard.training(), cuda_oom_as_error("training", decided.shape):
            outcome = backend.train(
                session,
                train,
                eval_data,
                decided.shape,
                [
                    start,
                    make_progress_callback(),
                    *metrics.training_callbacks(report.rows, report.tokens, report.loss_tokens),
                    *callbacks,
                    *make_fault_callbacks(settings),
                    saver,
                ],
                work / "trainer",
                resume_from=resume.local_dir if resume else None,
            )
    finally:
        dump_history("training")
    after = snapshot_lora(session.model)
    allocator = allocator_report()  # {} without CUDA
    log.info(
        "training done: %d steps, loss %s -> %s in %.1fs",
        outcome.steps,
        _fmt(outcome.first_loss),
        _fmt(outcome.last_loss),
        outcome.runtime_s,
        extra={
            "rank": rank.rank,
            "world_size": distributed.world_size(),
            "lora_sha256": lora_digest(after),
            "allocator": allocator,
        },
    )
    if allocator.get("expandable_segments") == "false" and expandable_requested(os.environ):
        log.warning(
            "the CUDA allocator ran without expandable segments although they were asked for: "
            "its reserved peak (%.1f GiB) can run far above the allocated one (%.1f GiB)",
            allocator["reserved_bytes_peak"] / GIB,
            allocator["allocated_bytes_peak"] / GIB,
            extra={"allocator": allocator},
        )
    if not rank.is_main:  # rank 0 alone verifies, saves, publishes and reports
        return RunResult(run_id, "", "", {"rank": rank.rank, "steps": outcome.steps})

    # 4. verifying
    phase.enter(Phase.VERIFYING)
    weight_update = check_weight_update(start.before, after, body.lora.target_modules)
    del start, after
    adapter_dir = work / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    backend.save_adapter(session, adapter_dir)
    notes = list(session.notes)
    del session
    release_device_memory()
    with cuda_oom_as_error("verification"):
        reloaded = backend.load_for_verification(
            base.path,
            adapter_dir,
            decided.precision,
            trust_remote_code=body.model.trust_remote_code,
        )
        reload_report = check_reloaded(reloaded, adapter_dir, train)
    log.info(
        "adapter verified: %d LoRA tensors changed; reloaded logits differ from the base by "
        "up to %.3g (threshold %g)",
        weight_update["changed_tensors"],
        reload_report["max_abs_logit_diff"],
        reload_report["threshold"],
    )

    # 5. evaluating: on the verified model (the adapter disabled for the base)
    evaluation = None
    if held is not None:
        phase.enter(Phase.EVALUATING, rows=len(held.rows), split=held.split)
        with cuda_oom_as_error("evaluation"):
            evaluation = _evaluate(
                body, held, reloaded, template, max_len, work, decided.shape.micro_batch_size
            )
        metrics.metrics.set_evaluation(evaluation)
    del reloaded
    release_device_memory()
    if evaluation is not None and not evaluation["gate"]["passed"]:
        raise VerificationError(
            f"quality gate failed: {evaluation['summary']}; nothing was published "
            f"(report: {work / EVAL_REPORT})",
            details=evaluation["gate"]["failures"],
        )

    # 6. publishing
    phase.enter(Phase.PUBLISHING, output=body.output.uri)
    meta = {
        "job_name": job.metadata.name,
        "spec_hash": spec_hash(job),
        "base_model": {**base.manifest_entry(), "trust_remote_code": body.model.trust_remote_code},
        "dataset": {
            **data.manifest_entry(),
            "format": body.dataset.format.value,
            "train_on": body.dataset.train_on,
            "preflight": report.as_dict(),
            "eval_preflight": eval_report.as_dict() if eval_report else None,
        },
        "lora": body.lora.model_dump(mode="json"),
        "training": {
            **_training_summary(backend.name, decided, plan, outcome, notes),
            "dynamic_4bit": dyn4,
        },
        "verification": {"weight_update": weight_update, "reload": reload_report},
        "evaluation": evaluation,
        "checkpoints": {
            "uri": checkpoints.uri,
            "resumed_from_step": resume.checkpoint.step if resume else None,
            "committed_steps": saver.committed_steps,
        },
        "libraries": library_versions(),
    }
    published = publish_adapter(adapter_dir, body.output.uri, meta, settings, run_id=run_id)
    log.info("published %s", published.manifest_uri, extra={"run_id": published.run_id})
    _prune(checkpoints)
    return RunResult(published.run_id, published.run_uri, published.manifest_uri, meta)


def lora_digest(tensors: Any) -> str:
    """sha256 over the LoRA tensors by name: equal on every rank of a healthy DDP run."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(f"{name}={tensors[name].sha256};".encode())
    return h.hexdigest()


def _eval_rows(body: Any, fetcher: Any) -> Any:
    """The rows of ``evaluation.sources``, read like the training data."""
    from runner.train.dataset import load_rows

    spec = body.dataset.model_copy(
        update={"sources": list(body.evaluation.sources), "max_samples": None, "eval_fraction": 0}
    )
    return load_rows(spec, fetcher, seed=body.training.seed).train


def _evaluate(
    body: Any,
    held: Any,
    session: Any,
    template: Any,  # a compiled runner.train.template_sandbox.ChatTemplate, or None
    max_len: int,
    work: Path,
    micro_batch: int,
) -> dict[str, Any]:
    """Score base and adapter on the held-out rows; the report as a dict (also on disk)."""
    from runner.train.eval_stats import GateRule
    from runner.train.evaluate import build_items, eval_batch_size, evaluate, resolve_scoring

    spec = body.evaluation
    scoring = resolve_scoring(held.rows, body.dataset, spec.scoring, spec.choices_field)
    items = build_items(
        held.rows,
        body.dataset,
        session.tokenizer,
        template,
        max_len,
        scoring=scoring,
        choices_field=spec.choices_field,
    )
    rule = GateRule(spec.gate.loss, spec.gate.accuracy, spec.gate.confidence)
    # Scoring keeps fp32 logits and their log-softmax; the batch is cut so that stays within
    # the bf16 logits of one training micro batch, which the estimate's loss term holds.
    vocab = int(getattr(session.model.config, "vocab_size", 0) or 1)
    batch = eval_batch_size(micro_batch, max_len, vocab, micro_batch * max_len * vocab * 2)
    report = evaluate(
        session, items, scoring=scoring, rule=rule, split=held.split, batch_size=batch
    )
    out = {**report.as_dict(), "summary": report.summary(), "held_out": held.record}
    (work / EVAL_REPORT).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


def _prune(checkpoints: Any) -> None:
    """Drop all but the newest checkpoint once the adapter is published (a rerun of the same
    spec resumes from that one instead of training again)."""
    from runner.errors import StorageError

    try:
        checkpoints.prune(keep=1)
    except StorageError as e:  # the adapter is published; leftovers only cost storage
        log.warning("could not prune old checkpoints in %s: %s", checkpoints.uri, e.message)


class _PhaseTracker:
    """Logs each phase with the time spent in the previous one and calls the hooks."""

    def __init__(self, hooks: Sequence[PhaseHook]) -> None:
        self.hooks = tuple(hooks)
        self.current: Phase | None = None
        self.since = time.monotonic()

    def enter(self, phase: Phase, **fields: Any) -> None:
        now = time.monotonic()
        if self.current is not None:
            fields[f"{self.current.value}_s"] = round(now - self.since, 3)
            fields |= _device_peaks(self.current.value)
        self.current, self.since = phase, now
        level = logging.ERROR if phase is Phase.FAILED else logging.INFO
        log.log(level, "phase %s", phase.value, extra={"phase": phase.value, **fields})
        for hook in self.hooks:
            hook(phase)


def _device_peaks(ended: str) -> dict[str, int]:
    """The CUDA allocator's peaks so far, logged as a phase ends (nothing before CUDA is used).

    The peaks are the process's (never reset, the same as the ``peak`` gauges), so the value
    logged when training ends is the training peak the planner estimates, and a later phase
    that logs a higher one (verification reload, evaluation) raised the run's peak itself.
    """
    from runner.train.metrics_callback import read_cuda_memory

    try:
        devices = read_cuda_memory()
    except Exception:  # a reading only: never fail a phase change over it
        return {}
    if not devices:
        return {}
    return {
        f"{ended}_peak_reserved_bytes": max(d.peak_reserved for d in devices),
        f"{ended}_peak_allocated_bytes": max(d.peak_allocated for d in devices),
    }


def plan_this_card(job: JobSpec, settings: Settings, backend: str) -> Plan | None:
    """The planner's micro batch, accumulation and precision for the local GPU.

    Used when no ``plan.json`` came with the spec (``qlora run`` by hand). The planner keeps
    what the spec sets explicitly; when it finds the run does not fit this card, or cannot
    size the model, the run goes on with the spec's own values and a warning (the estimate
    has a safety margin, and a user who set every value asked for exactly that).
    """
    from runner.plan import plan_for_card
    from runner.train.backend import cuda_device

    card = cuda_device()
    if card is None:
        return None
    name, total = card
    try:
        plan = plan_for_card(
            job, settings, card_memory_bytes=total, card_name=name, backend=backend
        )
    except RunnerError as e:
        log.warning(
            "no plan for this %s: %s; training with the spec's own values",
            name,
            "; ".join(e.lines()),
        )
        return None
    log.info(
        "planned for this %s (%d MiB): %s, micro batch %d x accumulation %d, estimated peak "
        "%.1f GiB",
        name,
        total // MIB,
        plan.quant_mode,
        plan.micro_batch_size,
        plan.gradient_accumulation_steps,
        plan.vram_estimate_bytes / GIB,
        extra={"plan": json.loads(plan.to_json())},
    )
    return plan


def _replan_with_lengths(
    job: JobSpec, settings: Settings, plan: Plan, model_dir: Path, train: Any, decided: Any
) -> tuple[Plan, Any]:
    """Re-plan inside the placed class from the real token lengths (runner.plan.layout).

    Keeps the original plan when the re-plan is not possible (no config, nothing fits).
    """
    from runner.plan.lengths import profile
    from runner.plan.planner import replan_in_class
    from runner.train.backend import cuda_available, cuda_bf16_supported
    from runner.train.resolve import resolve

    body = job.spec
    lengths = profile((len(e.input_ids) for e in train), body.training.max_seq_length, "preflight")
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        new = replan_in_class(job, settings, plan, lengths, model_config=config)
    except (OSError, ValueError, RunnerError) as e:
        reason = e.message if isinstance(e, RunnerError) else str(e)
        log.warning("kept the plan; no re-plan from the real lengths: %s", reason)
        return plan, decided
    log.info(
        "re-planned from the real lengths in class %s: micro batch %d x %d, checkpointing %s, "
        "largest micro batch %s tokens, estimated peak %.1f GiB",
        new.gpu_class.name,
        new.micro_batch_size,
        new.gradient_accumulation_steps,
        "off"
        if new.gradient_checkpointing is False
        else (f"first {new.checkpointed_layers} layers" if new.checkpointed_layers else "all"),
        new.peak_micro_batch_tokens,
        new.vram_estimate_bytes / GIB,
        extra={"replan": json.loads(new.to_json())},
    )
    cuda = cuda_available()
    return new, resolve(body, new, cuda=cuda, bf16=cuda_bf16_supported())


def estimate_without_plan(
    job: JobSpec, model_dir: Path, *, quant_mode: str, backend: str, micro_batch: int
) -> int | None:
    """The planner's peak-memory estimate for a run that has no ``plan.json``.

    Sized from the model's own ``config.json`` and what the run resolved (precision, backend,
    micro batch). The estimate only informs (the ``qlora_vram_estimate_bytes`` metric and the
    log), so a model the estimator cannot size gives None and a warning, never a failed job.
    """
    from runner.plan import estimate_run

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        found = estimate_run(
            job, config, quant_mode=quant_mode, backend=backend, micro_batch=micro_batch
        )
    except (OSError, ValueError, RunnerError) as e:
        reason = e.message if isinstance(e, RunnerError) else str(e)
        log.warning("no VRAM estimate for this run: %s", reason)
        return None
    log.info(
        "estimated peak GPU memory %.1f GiB (%s, %s, micro batch %d; no plan.json)",
        found.total_bytes / GIB,
        backend,
        quant_mode,
        micro_batch,
        extra={"vram_estimate_bytes": found.total_bytes},
    )
    return found.total_bytes


def _cache_dir(settings: Settings) -> Path | None:
    return Path(settings.model_cache_dir) if settings.model_cache_dir else None


def _read_plan(path: Path) -> Plan | None:
    from runner.local_files import is_file, read_file

    if not is_file(path):
        return None
    raw = read_file(path, max_bytes=1024 * 1024, what="plan.json")
    try:
        plan = Plan.from_json(raw.decode("utf-8"))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise PlanError(f"{path}: not a valid plan: {e}") from e
    log.info("using %s (class %s)", path, plan.gpu_class.name)
    return plan


def _fetcher(work: Path, settings: Settings) -> Callable[[str, Path], Path]:
    def fetch(uri: str, sub: Path) -> Path:
        from runner.storage import fetch as storage_fetch

        log.info("fetching %s", uri)
        return storage_fetch(uri, work / sub, settings)

    return fetch


def _training_summary(
    backend: str, decided: Any, plan: Plan | None, outcome: Any, notes: list[str]
) -> dict[str, Any]:
    shape, precision = decided.shape, decided.precision
    return {
        "backend": backend,
        "precision": vars(precision),
        "micro_batch_size": shape.micro_batch_size,
        "gradient_accumulation_steps": shape.gradient_accumulation_steps,
        "max_seq_length": shape.max_seq_length,
        "learning_rate": shape.learning_rate,
        "optimizer": outcome.optimizer or shape.optimizer,
        "plan": {"gpu_class": plan.gpu_class.name, "spec_hash": plan.spec_hash} if plan else None,
        "resolved": list(decided.reasons),
        "notes": notes,
        "steps": outcome.steps,
        "first_loss": outcome.first_loss,
        "last_loss": outcome.last_loss,
        "eval_loss": outcome.eval_loss,
        "loss_curve": _downsample(outcome.losses, 100),
        "train_tokens": outcome.train_tokens,
        "runtime_s": round(outcome.runtime_s, 3),
    }


def library_versions() -> dict[str, str | None]:
    """Versions of Python, qlora-runner and the training stack (None where not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "qlora-runner": __version__}
    for name in LIBRARIES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def _downsample(values: Sequence[float], n: int) -> list[float]:
    if len(values) <= n:
        return [round(v, 5) for v in values]
    return [round(values[round(i * (len(values) - 1) / (n - 1))], 5) for i in range(n)]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
