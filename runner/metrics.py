"""Prometheus metrics of one training run: what the job is doing, served and pushed.

A platform team watches a fine-tuning job through Prometheus: which phase it is in, how far
training has got, how fast it goes, how much GPU memory it really uses next to what the planner
estimated, and how it ended. :class:`RunMetrics` holds those values in a
:class:`prometheus_client.CollectorRegistry` of its own (never the process-global one, so tests
and pushes see exactly this run), :class:`MetricsServer` serves them over HTTP while the job
runs, and :func:`push_metrics` sends the final values to a Pushgateway so they outlive the pod.

This is the only module that imports ``prometheus_client``; everything else talks to
:class:`RunMetrics`. Metric names follow the Prometheus conventions (base units, ``_bytes``,
``_seconds``, ``_total`` on counters) and labels stay low-cardinality: the job's name, backend,
GPU class and precision on one info metric, the device on memory gauges, the phase on the phase
gauge; never a spec hash, a run id or a secret. A Pushgateway groups the pushed values by the
job's name and namespace (:func:`push_metrics`), so it holds one group per job, not per run.
``job_name`` rather than ``job`` labels the info metric because
Prometheus owns ``job`` as the scrape target's label and would rename ours ``exported_job``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.error import URLError

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import push_to_gateway, start_http_server

log = logging.getLogger(__name__)

PREFIX = "qlora"
PUSH_TIMEOUT_S = 5.0
"""Bound on one Pushgateway request; a slow gateway never holds a finished job for long."""


class Phase(StrEnum):
    """The phases of ``qlora run``, in order; the last two are final."""

    LOADING = "loading"
    PREFLIGHT = "preflight"
    TRAINING = "training"
    VERIFYING = "verifying"
    EVALUATING = "evaluating"
    PUBLISHING = "publishing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class DeviceMemory:
    """One GPU's allocator statistics, in bytes (what ``torch.cuda.memory_*`` report).

    Attributes:
        device: Device name, e.g. ``cuda:0``.
        allocated: Bytes held by live tensors.
        reserved: Bytes the caching allocator holds from the driver.
        peak_allocated: Highest ``allocated`` since the process started.
        peak_reserved: Highest ``reserved`` since the process started.
        total: The device's memory.
    """

    device: str
    allocated: int
    reserved: int
    peak_allocated: int
    peak_reserved: int
    total: int


class RunMetrics:
    """Every metric of one run, registered in a registry of its own.

    Args:
        registry: Where to register; a fresh :class:`CollectorRegistry` when omitted. The
            process-global registry is never used, so two runs in one process (tests) or a push
            never mix in unrelated collectors.
        clock: Wall clock in Unix seconds, for the start, end and phase timestamps.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._phase: Phase | None = None
        self._phase_started = 0.0

        def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, list(labels), registry=self.registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, registry=self.registry)

        # Job identity and outcome.
        self.job_info = gauge(
            "job_info",
            "Always 1; labels name the job, its training backend, GPU class and precision.",
            ("job_name", "backend", "gpu_class", "quant_mode"),
        )
        self.phase = gauge(
            "job_phase", "1 for the phase the job is in, 0 for the others.", ["phase"]
        )
        self.phase_seconds = gauge(
            "job_phase_duration_seconds", "Wall time spent in each phase so far.", ["phase"]
        )
        self.start_time = gauge("job_start_timestamp_seconds", "When the job started (Unix time).")
        self.end_time = gauge("job_end_timestamp_seconds", "When the job ended (Unix time).")
        self.exit_code = gauge(
            "job_exit_code", "Process exit code once the job ended (0 success; see the README)."
        )
        self.attempt = gauge(
            "job_attempt", "Out-of-memory re-plan attempt this pod runs (0 for the first try)."
        )
        for p in Phase:
            self.phase.labels(phase=p.value).set(0)
            self.phase_seconds.labels(phase=p.value).set(0)

        # The plan next to the measurement.
        self.vram_estimate = gauge(
            "vram_estimate_bytes", "The planner's estimate of peak GPU memory per device."
        )
        self.vram_usable = gauge(
            "vram_usable_bytes",
            "GPU memory the planner may use in the chosen class (after margin).",
        )
        self.micro_batch = gauge("train_micro_batch_size", "Sequences per forward pass.")
        self.accumulation = gauge(
            "train_gradient_accumulation_steps", "Micro batches per optimizer step."
        )

        # GPU memory, per device.
        dev = ("device",)
        self.mem_allocated = gauge(
            "gpu_memory_allocated_bytes", "GPU memory held by live tensors.", dev
        )
        self.mem_reserved = gauge(
            "gpu_memory_reserved_bytes", "GPU memory held by the caching allocator.", dev
        )
        self.mem_peak_allocated = gauge(
            "gpu_memory_peak_allocated_bytes", "Highest allocated GPU memory so far.", dev
        )
        self.mem_peak_reserved = gauge(
            "gpu_memory_peak_reserved_bytes", "Highest reserved GPU memory so far.", dev
        )
        self.mem_total = gauge("gpu_memory_total_bytes", "The device's GPU memory.", dev)

        # Progress.
        self.step = gauge("train_step", "Optimizer steps done.")
        self.max_steps = gauge("train_max_steps", "Optimizer steps the run will take.")
        self.epoch = gauge("train_epoch", "Passes over the training data done (fractional).")
        self.loss = gauge("train_loss", "Training loss at the last logging step.")
        self.learning_rate = gauge("train_learning_rate", "Learning rate at the last logging step.")
        self.grad_norm = gauge("train_grad_norm", "Gradient norm at the last logging step.")
        self.eta = gauge("train_eta_seconds", "Estimated wall time until training ends.")
        # Not a value yet: NaN (a gap on a graph) until the trainer logs one, never a loss of 0.
        for unknown in (self.loss, self.learning_rate, self.grad_norm, self.eta):
            unknown.set(math.nan)

        # Throughput.
        self.tokens = counter("train_tokens", "Tokens trained on (padding excluded).")
        self.loss_tokens = counter("train_loss_tokens", "Tokens that carried loss.")
        self.samples = counter("train_samples", "Sequences trained on.")
        self.tokens_rate = gauge(
            "train_tokens_per_second", "Recent throughput in tokens (padding excluded)."
        )
        self.loss_tokens_rate = gauge(
            "train_loss_tokens_per_second", "Recent throughput in tokens that carry loss."
        )
        self.samples_rate = gauge("train_samples_per_second", "Recent throughput in sequences.")

        # Data parallelism: the same values once more with this process's rank (every rank
        # serves its own /metrics; a dashboard sums or compares ranks by this label).
        self.rank = "0"
        self.rank_info = gauge(
            "rank_info", "Always 1; this process's DDP rank and the world size.",
            ("rank", "world_size"),
        )  # fmt: skip
        self.rank_peak_reserved = gauge(
            "rank_gpu_memory_peak_reserved_bytes",
            "Highest reserved GPU memory of a rank.",
            ["rank"],
        )
        self.rank_tokens_rate = gauge(
            "rank_train_tokens_per_second", "Recent throughput of a rank in tokens.", ["rank"]
        )

        # Checkpoints in object storage and resume (runner.train.preemption).
        self.checkpoint_step = gauge(
            "checkpoint_last_step", "Optimizer step of the newest committed checkpoint (0: none)."
        )
        self.checkpoint_time = gauge(
            "checkpoint_last_timestamp_seconds", "When the newest checkpoint was committed."
        )
        self.checkpoint_failures = counter(
            "checkpoint_failures", "Checkpoints that could not be committed to storage."
        )
        self.resumed_from = gauge(
            "resumed_from_step", "Step of the checkpoint this run resumed from (0: fresh start)."
        )

        # Held-out evaluation (runner.train.evaluate); model is 'base' or 'adapter'.
        self.eval_loss = gauge(
            "eval_loss", "Held-out loss per completion token (nats).", ("model",)
        )
        self.eval_perplexity = gauge("eval_perplexity", "Held-out perplexity.", ("model",))
        self.eval_accuracy = gauge(
            "eval_accuracy_ratio", "Held-out accuracy where answers are scored.", ("model",)
        )
        self.eval_rows = gauge("eval_rows", "Held-out rows evaluated.")
        self.eval_gate = gauge("eval_gate_passed", "1 if the quality gate passed, 0 if it failed.")

    # --- checkpoints ------------------------------------------------------------------------

    def checkpoint_committed(self, step: int) -> None:
        """A checkpoint of ``step`` is committed to storage."""
        self.checkpoint_step.set(step)
        self.checkpoint_time.set(self._clock())

    def checkpoint_failed(self) -> None:
        """A checkpoint could not be committed (training went on)."""
        self.checkpoint_failures.inc()

    def set_resumed_from(self, step: int) -> None:
        """The run resumed from a checkpoint of ``step`` (0: it started fresh)."""
        self.resumed_from.set(step)

    def set_evaluation(self, report: Mapping[str, Any]) -> None:
        """Record an evaluation report (``EvalReport.as_dict()``), passed or failed."""
        for model in ("base", "adapter"):
            scores = report[model]
            self.eval_loss.labels(model=model).set(scores["loss"])
            self.eval_perplexity.labels(model=model).set(scores["perplexity"])
            if scores.get("accuracy") is not None:
                self.eval_accuracy.labels(model=model).set(scores["accuracy"])
        self.eval_rows.set(report["rows"])
        self.eval_gate.set(1 if report["gate"]["passed"] else 0)

    # --- identity, plan, phases -------------------------------------------------------------

    def set_job(self, job_name: str, *, backend: str, gpu_class: str, quant_mode: str) -> None:
        """Describe the job on ``qlora_job_info`` (replacing any earlier description).

        Args:
            job_name: ``metadata.name`` of the spec.
            backend: ``unsloth`` or ``transformers``, or ``auto`` before it is resolved.
            gpu_class: The GPU memory class, e.g. ``24GB``; ``cpu`` without a GPU.
            quant_mode: ``4bit``, ``dynamic-4bit`` or ``16bit``.
        """
        self.job_info.clear()
        self.job_info.labels(
            job_name=job_name, backend=backend, gpu_class=gpu_class, quant_mode=quant_mode
        ).set(1)

    def set_rank(self, rank: int, world_size: int) -> None:
        """Name this process's DDP rank (``rank`` label of the per-rank metrics)."""
        self.rank = str(rank)
        self.rank_info.clear()
        self.rank_info.labels(rank=self.rank, world_size=str(world_size)).set(1)

    def set_plan(
        self,
        *,
        vram_estimate_bytes: int,
        usable_bytes: int = 0,
        micro_batch_size: int = 0,
        gradient_accumulation_steps: int = 0,
    ) -> None:
        """Record what the planner decided, so dashboards put it beside the measurement."""
        self.vram_estimate.set(vram_estimate_bytes)
        self.vram_usable.set(usable_bytes)
        self.micro_batch.set(micro_batch_size)
        self.accumulation.set(gradient_accumulation_steps)

    def start(self) -> None:
        """Mark the job as started now (``qlora_job_start_timestamp_seconds``)."""
        self.start_time.set(self._clock())

    def set_phase(self, phase: Phase | str) -> None:
        """Enter ``phase``: its gauge becomes 1, the others 0; the last one's time is added."""
        new = Phase(phase)
        with self._lock:
            now = self._clock()
            if self._phase is not None:
                self.phase.labels(phase=self._phase.value).set(0)
                self.phase_seconds.labels(phase=self._phase.value).inc(
                    max(0.0, now - self._phase_started)
                )
            self._phase, self._phase_started = new, now
            self.phase.labels(phase=new.value).set(1)

    @property
    def current_phase(self) -> Phase | None:
        """The phase last entered, or None before the first."""
        return self._phase

    def finish(self, exit_code: int) -> None:
        """Record the end: exit code, end time, and phase ``succeeded`` (0) or ``failed``."""
        self.exit_code.set(exit_code)
        self.set_phase(Phase.SUCCEEDED if exit_code == 0 else Phase.FAILED)
        self.end_time.set(self._clock())

    # --- training ---------------------------------------------------------------------------

    def set_memory(self, mem: DeviceMemory) -> None:
        """Record one device's allocator statistics."""
        d = mem.device
        self.mem_allocated.labels(device=d).set(mem.allocated)
        self.mem_reserved.labels(device=d).set(mem.reserved)
        self.mem_peak_allocated.labels(device=d).set(mem.peak_allocated)
        self.mem_peak_reserved.labels(device=d).set(mem.peak_reserved)
        self.mem_total.labels(device=d).set(mem.total)
        self.rank_peak_reserved.labels(rank=self.rank).set(mem.peak_reserved)

    def set_progress(
        self, *, step: int, max_steps: int, epoch: float, eta_s: float | None = None
    ) -> None:
        """Record how far training has got; ``eta_s`` None leaves the ETA as it was."""
        self.step.set(step)
        self.max_steps.set(max_steps)
        self.epoch.set(epoch)
        if eta_s is not None:
            self.eta.set(max(0.0, eta_s))

    def observe_log(
        self,
        *,
        loss: float | None = None,
        learning_rate: float | None = None,
        grad_norm: float | None = None,
    ) -> None:
        """Record the values a trainer logs; None leaves a value as it was."""
        for g, v in (
            (self.loss, loss),
            (self.learning_rate, learning_rate),
            (self.grad_norm, grad_norm),
        ):
            if v is not None:
                g.set(v)

    def add_work(self, *, tokens: float, loss_tokens: float, samples: float) -> None:
        """Add to the token and sample counters (negative amounts are ignored)."""
        for c, v in (
            (self.tokens, tokens),
            (self.loss_tokens, loss_tokens),
            (self.samples, samples),
        ):
            if v > 0:
                c.inc(v)

    def set_rates(
        self, *, tokens_per_s: float, loss_tokens_per_s: float, samples_per_s: float
    ) -> None:
        """Record the recent throughput."""
        self.tokens_rate.set(tokens_per_s)
        self.rank_tokens_rate.labels(rank=self.rank).set(tokens_per_s)
        self.loss_tokens_rate.set(loss_tokens_per_s)
        self.samples_rate.set(samples_per_s)

    # --- reading back -----------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what ``/metrics`` serves)."""
        return bytes(generate_latest(self.registry))

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's current value by full name (e.g. ``qlora_train_tokens_total``)."""
        result = self.registry.get_sample_value(name, labels)
        return None if result is None else float(result)


class MetricsServer:
    """``/metrics`` over HTTP for the life of a job, in a daemon thread.

    Args:
        metrics: What to serve.
        port: TCP port (``spec.metrics.port``; 0 picks a free one, for tests).
        bind_address: Address to listen on (``Settings.metrics_bind_address``).
    """

    def __init__(self, metrics: RunMetrics, port: int, bind_address: str = "0.0.0.0") -> None:
        self.metrics = metrics
        self.port = port
        self.bind_address = bind_address
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start serving; a port that cannot be bound is logged and the job goes on.

        Returns:
            Whether the server is listening.
        """
        try:
            self._server, self._thread = start_http_server(
                self.port, addr=self.bind_address, registry=self.metrics.registry
            )
        except OSError as e:
            log.warning(
                "metrics: cannot listen on %s:%d (%s); continuing without /metrics",
                self.bind_address,
                self.port,
                e,
                extra={"metrics_port": self.port},
            )
            return False
        self.port = int(self._server.server_port)
        log.info("metrics: serving /metrics on %s:%d", self.bind_address, self.port)
        return True

    @property
    def url(self) -> str:
        """``http://<address>:<port>/metrics``."""
        return f"http://{self.bind_address}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


def push_metrics(
    metrics: RunMetrics,
    gateway_url: str,
    *,
    job: str,
    namespace: str,
    timeout_s: float = PUSH_TIMEOUT_S,
) -> bool:
    """Replace this job's group on a Pushgateway with the current values.

    The group is ``job=<job>``, ``namespace=<namespace>``: each push replaces the job's last
    values, so a retry or a rerun of the same job leaves its own outcome and not its
    predecessors' (an old failure would otherwise keep ``qlora_job_exit_code`` non-zero, and an
    alert on it firing, for ever), and the gateway holds one group per job rather than one per
    run. The run id is in the job's logs and its manifest, never a label. A failing push is
    logged, never raised: metrics must not fail a job that trained and published.

    Args:
        metrics: What to push.
        gateway_url: ``http[s]://host:port[/path]``.
        job: The job's name (``metadata.name``).
        namespace: The Kubernetes namespace the job runs in (job names are unique there).
        timeout_s: Bound on the HTTP request.

    Returns:
        Whether the gateway accepted the push.
    """
    try:
        push_to_gateway(
            gateway_url,
            job=job,
            registry=metrics.registry,
            grouping_key={"namespace": namespace},
            timeout=timeout_s,
        )
    except (URLError, OSError, ValueError) as e:  # HTTPError is a URLError; timeouts are OSError
        log.warning(
            "metrics: push to the Pushgateway %s failed: %s",
            gateway_url,
            e,
            extra={"job_name": job, "namespace": namespace},
        )
        return False
    log.info("metrics: pushed to %s (job=%s, namespace=%s)", gateway_url, job, namespace)
    return True
