"""The metrics side of one ``qlora run``, as the recipe uses it.

:mod:`runner.metrics` knows Prometheus; this module knows the job: it is created before the
spec is read (so even a run that fails while loading ends with a recorded outcome), starts
serving ``/metrics`` once the spec says on which port, follows the recipe's phases, hands the
trainer a :class:`runner.train.metrics_callback.MetricsCallback`, and in the recipe's
``finally`` records the exit code and pushes the end to a Pushgateway.

The recipe's calls, in order::

    metrics = JobMetrics(settings)                 # before anything can fail
    metrics.open(job, run_id)                      # spec loaded: serve /metrics
    metrics.describe(backend=..., quant_mode=..., plan=plan, shape=shape)
    metrics.set_phase("training")                  # as an on_phase hook
    backend.train(..., [*metrics.training_callbacks(rows, tokens, loss_tokens)], ...)
    metrics.close(exit_code)                       # finally: phase, end time, push, stop
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from runner.metrics import MetricsServer, Phase, RunMetrics, push_metrics
from runner.settings import Settings
from runner.spec.model import JobSpec

if TYPE_CHECKING:
    from runner.plan.types import Plan
    from runner.train.backend import BatchShape

log = logging.getLogger(__name__)

_FINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class JobMetrics:
    """Values, ``/metrics`` server and final push of one run (see the module docstring).

    Args:
        settings: Deployment settings (bind address, default Pushgateway).
        metrics: The values; fresh ones (on a registry of their own) when omitted.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: RunMetrics | None = None,
        *,
        rank: int = 0,
        local_rank: int = 0,
    ) -> None:
        self.settings = settings
        # Each rank serves its own /metrics (port + local rank); rank 0 pushes the totals.
        self.rank, self.local_rank = rank, local_rank
        self.metrics = metrics if metrics is not None else RunMetrics()
        self.metrics.start()
        self.metrics.set_rank(rank, int(os.environ.get("WORLD_SIZE", "1")))
        self.metrics.attempt.set(settings.attempt)
        self.job: str | None = None
        self.run_id: str | None = None
        self.server: MetricsServer | None = None
        self.pushgateway_url: str | None = None
        self.pushed: bool | None = None
        self._gpu_class = "auto"

    def open(self, spec: JobSpec, run_id: str) -> RunMetrics:
        """The spec is known: describe the job and start serving ``/metrics``.

        The server listens on ``spec.metrics.port`` at ``settings.metrics_bind_address`` when
        ``spec.metrics.enabled``; the push at :meth:`close` goes to
        ``spec.metrics.pushgateway_url``, else ``settings.pushgateway_url``, else nowhere.
        """
        body = spec.spec
        self.job, self.run_id = spec.metadata.name, run_id
        self.pushgateway_url = body.metrics.pushgateway_url or self.settings.pushgateway_url
        self._gpu_class = body.resources.gpu_class
        self.metrics.set_job(
            self.job,
            backend=body.training.backend.value,
            gpu_class=self._gpu_class,
            quant_mode=body.quantization.mode.value,
        )
        if body.metrics.enabled and self.server is None:
            self.server = MetricsServer(
                self.metrics,
                body.metrics.port + self.local_rank,
                self.settings.metrics_bind_address,
            )
            self.server.start()
        return self.metrics

    def describe(
        self,
        *,
        backend: str,
        quant_mode: str,
        plan: Plan | None = None,
        shape: BatchShape | None = None,
    ) -> None:
        """What was resolved: backend, precision, the plan's class and estimate, batch shape.

        Without a plan (``qlora run`` by hand) the class stays the spec's ``resources.gpu_class``.
        """
        if plan is not None:
            self._gpu_class = plan.gpu_class.name
        self.metrics.set_job(
            self.job or "", backend=backend, gpu_class=self._gpu_class, quant_mode=quant_mode
        )
        self.metrics.set_plan(
            vram_estimate_bytes=plan.vram_estimate_bytes if plan is not None else 0,
            usable_bytes=plan.usable_memory_bytes if plan is not None else 0,
            micro_batch_size=shape.micro_batch_size if shape is not None else 0,
            gradient_accumulation_steps=shape.gradient_accumulation_steps if shape else 0,
        )

    def set_phase(self, phase: str) -> None:
        """Enter a phase (an ``on_phase`` hook); the final phases are left to :meth:`close`."""
        try:
            known = Phase(phase)
        except ValueError:  # a phase this module does not know yet: metrics never fail a job
            log.warning("metrics: unknown phase %r not recorded", phase)
            return
        if known not in _FINAL:
            self.metrics.set_phase(known)
            self._record_memory()

    def set_estimate(self, vram_estimate_bytes: int) -> None:
        """The planner's estimate when there is no plan (``qlora run`` by hand on a GPU)."""
        self.metrics.vram_estimate.set(vram_estimate_bytes)

    def training_callbacks(self, rows: int, tokens: int, loss_tokens: int) -> list[Any]:
        """The ``TrainerCallback`` that keeps the training metrics current.

        Args:
            rows: Training sequences in one epoch.
            tokens: Their tokens.
            loss_tokens: Those that carry loss.
        """
        from runner.train.metrics_callback import MetricsCallback, TokenCounts

        counts = TokenCounts(rows=rows, tokens=tokens, loss_tokens=loss_tokens)
        return [MetricsCallback(self.metrics, counts)]

    def close(self, exit_code: int) -> None:
        """Record the outcome, push it (when the job and a gateway are known), stop serving.

        Never raises for a metrics problem: a failed push is logged.
        """
        try:
            self._record_memory()
            self.metrics.finish(exit_code)
            if self.pushgateway_url and self.job and self.rank == 0:
                self.pushed = push_metrics(
                    self.metrics,
                    self.pushgateway_url,
                    job=self.job,
                    namespace=self.settings.namespace,
                )
        finally:
            if self.server is not None:
                self.server.stop()
                self.server = None

    def _record_memory(self) -> None:
        # Only where the training stack is already loaded: a run that failed before training
        # must not import torch just to report that it holds no GPU memory.
        import sys

        if "torch" in sys.modules and "transformers" in sys.modules:
            from runner.train.metrics_callback import record_memory

            try:
                record_memory(self.metrics)
            except RuntimeError as e:  # a CUDA context in an error state after a crash
                log.warning("metrics: cannot read GPU memory: %s", e)
