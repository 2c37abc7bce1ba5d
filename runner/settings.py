"""Deployment settings, kept apart from the portable job spec.

A job spec says *what* to train; settings say *where* this installation runs it: namespace,
image, the S3 endpoint, the Pushgateway, the GPU class table. They come from ``QLORA_*``
environment variables (the Helm chart sets them on the operator and the rendered pods).
Secrets are never settings: S3 credentials come from the standard AWS environment and files,
which in the cluster are filled from a Secret by ``secretKeyRef``.

Environment values are strings, so settings are parsed from text, on purpose and strictly
where a wrong value would enable something or widen what is reachable:

* a boolean setting accepts exactly ``true`` or ``false`` (``1``, ``yes``, ``on`` are errors);
* URL settings (``QLORA_S3_ENDPOINT_URL``, ``QLORA_PUSHGATEWAY_URL``) must be
  ``http://`` or ``https://`` URLs without credentials in them;
* a whole number is decimal digits with an optional sign (not ``1.0``, ``1_0``, ``0x10`` or
  `` 1``); a real number is decimal text and finite (``inf``, ``1e999`` and ``nan`` are errors,
  so no time budget of the watchdog can be switched off); both are checked against their bounds;
* list settings (``QLORA_IMAGE_PULL_SECRETS``, ``QLORA_OPERATOR_NAMESPACES``) are a JSON list of
  strings of at most 64 KiB; anything else is an error, never an exit 1;
* choices (``QLORA_S3_ADDRESSING_STYLE``, ``QLORA_MULTI_NODE_TARGET``) are exact.

Every invalid value is exit code 2 with one ``QLORA_NAME: message`` line (:func:`load_settings`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from runner.errors import SpecError


class Settings(BaseSettings):
    """Settings read from ``QLORA_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="QLORA_", extra="ignore", frozen=True, allow_inf_nan=False
    )

    namespace: str = Field("qlora", description="Namespace for rendered and submitted jobs.")
    image: str = Field(
        "qlora-runner:0.1.0", description="Runner image (repository:tag, no registry host)."
    )
    image_pull_secrets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Secrets for pulling the runner image in training pods; in the "
        "environment a JSON list, e.g. QLORA_IMAGE_PULL_SECRETS='[\"registry-pull\"]'.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://seaweedfs.storage:8333."
    )
    s3_region: str | None = Field(None, description="S3 region, if the server needs one.")
    s3_addressing_style: Literal["path", "virtual", "auto"] = Field(
        "path", description="S3 addressing style; most self-hosted servers want 'path'."
    )
    s3_secret_name: str = Field(
        "qlora-s3",
        description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for rendered pods.",
    )
    pushgateway_url: str | None = Field(
        None, description="Default Pushgateway when a spec names none."
    )
    metrics_bind_address: str = Field(
        "0.0.0.0",
        description="Address the /metrics endpoint of a running job listens on "
        "(the port is spec.metrics.port).",
    )
    host_network: bool = Field(
        False, description="Run the training pods in the node's network namespace "
        "(hostNetwork), for clusters whose S3 endpoint or Pushgateway is only on the node's "
        "own addresses (e.g. a one-node test cluster on 127.0.0.1).",
    )
    gpu_classes_file: str | None = Field(
        None, description="YAML file with the GPU class table (default: the bundled table)."
    )
    gpu_memory_label: str = Field(
        "nvidia.com/gpu.memory", description="Node label holding one GPU's memory in MiB."
    )
    work_dir: str = Field(
        ".qlora-work", description="Local scratch directory for downloads and the adapter."
    )
    model_cache_dir: str | None = Field(
        None,
        description="Where a GGUF model source is converted to a safetensors folder, once per "
        "file content (sha256); outside work_dir so every job reuses it. Default: "
        "$XDG_CACHE_HOME/qlora-runner/models (~/.cache/qlora-runner/models).",
    )
    compile_cache_claim: str | None = Field(
        None,
        description="PersistentVolumeClaim mounted into every training pod for the Triton, "
        "Inductor and Unsloth kernel caches, so a later job skips the first step's "
        "compilation (ReadWriteMany when jobs run on several nodes); unset: an emptyDir.",
    )
    storage_retries: int = Field(
        5, ge=0, le=20, description="Retries (with backoff) for a failing storage call."
    )
    unsloth_ddp: bool = Field(
        False,
        description="Let Unsloth train with several ranks (torchrun). Off until its DDP path "
        "has passed the multi-GPU tests: backend auto then picks transformers for world size "
        "> 1, and backend unsloth with world size > 1 is an error.",
    )
    multi_node_target: Literal["indexed-job", "jobset", "trainjob"] = Field(
        "indexed-job",
        description="What a job over several nodes renders as: a batch/v1 Indexed Job with a "
        "headless Service, a JobSet (jobset.x-k8s.io/v1alpha2) or a Kubeflow Trainer "
        "TrainJob (trainer.kubeflow.org/v1alpha1).",
    )
    trainer_runtime: str = Field(
        "torch-distributed",
        min_length=1,
        max_length=253,
        description="The Kubeflow Trainer ClusterTrainingRuntime a TrainJob runs on "
        "(multi_node_target trainjob); its terminationGracePeriodSeconds should be 300 or more "
        "so a preempted run can write its checkpoint.",
    )
    ddp_timeout_s: int = Field(
        900,
        ge=30,
        le=86400,
        description="Collective timeout of a run over several ranks: long enough for rank 0 "
        "to tokenize the data and commit a checkpoint, short enough that a dead rank fails "
        "the group instead of hanging it.",
    )
    max_gpus_per_node: int = Field(
        8, ge=1, le=16, description="Most GPUs per node the planner may choose with 'auto'."
    )
    max_nodes: int = Field(
        4, ge=1, le=64, description="Most nodes the planner may choose with 'auto'."
    )
    attempt: int = Field(
        0,
        ge=0,
        description="Out-of-memory re-plan attempt of this pod (0 first); rendered Jobs set it "
        "from their qlora-runner.io/attempt label. Exported as qlora_job_attempt.",
    )
    fault_oom_at_step: int = Field(
        0,
        ge=0,
        description="Fault injection for tests (0: off): in attempt 0 only, raise PyTorch's "
        "out-of-memory error at the end of this optimizer step, as a plan too large for the "
        "GPU would, so the run exits 6 and the operator re-plans. Rendered Jobs inherit it.",
    )
    fault_step_delay_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="Fault injection for tests (0: off): sleep this long after every optimizer "
        "step, as a slow node would, so that a test's signal reliably lands mid-training. "
        "Rendered Jobs inherit it.",
    )

    # -- the watchdog of `qlora run` (runner.watchdog): a phase over its budget exits 13 ---
    loading_budget_s: float = Field(
        7200.0, gt=0, description="Longest the loading phase may take (spec, model download, "
        "data, tokenizer), seconds.",
    )
    preflight_budget_s: float = Field(
        3600.0, gt=0, description="Longest preflight may take (formatting and tokenizing "
        "every row), seconds.",
    )
    training_stall_s: float = Field(
        3600.0, gt=0, description="Longest training may go without an optimizer step (the "
        "first window also covers loading the model and compiling), seconds.",
    )
    verifying_budget_s: float = Field(
        3600.0, gt=0, description="Longest verification may take (saving, reloading and "
        "checking the adapter), seconds.",
    )
    evaluating_budget_s: float = Field(
        7200.0, gt=0, description="Longest the held-out evaluation may take, seconds."
    )
    publishing_budget_s: float = Field(
        3600.0, gt=0, description="Longest publishing may take (uploading the adapter), "
        "seconds.",
    )

    # -- the operator (qlora operator): its HTTP endpoint, leader election, work queue ------
    operator_metrics_port: int = Field(
        8080, ge=0, le=65535,
        description="Port of the operator's /healthz, /readyz and /metrics endpoint "
        "(0: any free port).",
    )
    operator_bind_address: str = Field(
        "0.0.0.0", description="Address the operator's health and metrics endpoint listens on."
    )
    operator_metrics_port_tries: int = Field(
        1, ge=1, le=64,
        description="Ports tried from QLORA_OPERATOR_METRICS_PORT upwards, the first free one "
        "bound: replicas sharing one node's network (hostNetwork) each get their own.",
    )
    operator_endpoint_file: str | None = Field(
        None, description="File the operator writes its endpoint's 'host:port' to once bound "
        "(the chart's exec probes read it under hostNetwork, where the port differs per pod).",
    )
    operator_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces a namespace-scoped operator watches (a Role in each); empty: "
        "only QLORA_NAMESPACE. In the environment a JSON list, e.g. '[\"team-a\",\"team-b\"]'.",
    )
    operator_leader_election: bool = Field(
        True, description="Elect one leader through a coordination.k8s.io/v1 Lease; only the "
        "leader reconciles, the other replicas stand by.",
    )
    operator_lease_name: str = Field("qlora-operator", description="Name of the Lease.")
    operator_lease_namespace: str | None = Field(
        None, description="Namespace of the Lease: the operator's own (default: "
        "QLORA_NAMESPACE).",
    )
    operator_lease_duration_s: float = Field(
        15.0, gt=0, description="How long a standby waits after the leader's last renewal "
        "before it takes over (client-go's default, seconds).",
    )
    operator_renew_deadline_s: float = Field(
        10.0, gt=0, description="How long the leader keeps trying to renew before it stops "
        "reconciling (seconds; less than the lease duration).",
    )
    operator_retry_period_s: float = Field(
        2.0, gt=0, description="Pause between two tries to acquire or renew the Lease (seconds).",
    )
    operator_workers: int = Field(
        4, ge=1, le=64, description="FineTuneJobs reconciled at the same time."
    )
    operator_retry_base_delay_s: float = Field(
        0.5, gt=0, description="First retry delay of a FineTuneJob whose reconcile failed; "
        "doubles per failure (seconds).",
    )
    operator_retry_max_delay_s: float = Field(
        300.0, gt=0, description="Cap of the per-FineTuneJob retry delay (seconds).",
    )

    @model_validator(mode="after")
    def _leader_timings(self) -> Settings:
        if not self.operator_lease_duration_s > self.operator_renew_deadline_s \
                > self.operator_retry_period_s:
            raise ValueError(
                "QLORA_OPERATOR_LEASE_DURATION_S > QLORA_OPERATOR_RENEW_DEADLINE_S > "
                "QLORA_OPERATOR_RETRY_PERIOD_S must hold (client-go's rule), got "
                f"{self.operator_lease_duration_s:g}, {self.operator_renew_deadline_s:g}, "
                f"{self.operator_retry_period_s:g}"
            )
        return self

    @field_validator("*", mode="before")
    @classmethod
    def _strict_text(cls, value: object, info: ValidationInfo) -> object:
        # pydantic's lax parsing reads "1", "yes", "on", "t" as true, "1.0" and "1_0" as ints
        # and "inf" as a float: no surprise may enable something or switch a limit off here.
        field = cls.model_fields.get(info.field_name or "")
        if field is None or not isinstance(value, str):
            return value
        kind = field.annotation
        if kind is bool:
            if value not in ("true", "false"):
                raise ValueError(f"must be 'true' or 'false' (got {value[:40]!r})")
            return value == "true"
        if kind is int:
            if not _INT_TEXT_RE.fullmatch(value):
                raise ValueError(f"must be a whole number in decimal digits (got {value[:40]!r})")
            return int(value)
        if kind is float:
            number = float(value) if _FLOAT_TEXT_RE.fullmatch(value) else math.nan
            if not math.isfinite(number):
                raise ValueError(f"must be a finite decimal number (got {value[:40]!r})")
            return number
        if kind == list[str]:  # NoDecode: parsed here, so a bad value is a message, not exit 1
            return _json_list(value)
        return value

    @field_validator("s3_endpoint_url", "pushgateway_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _HTTP_URL_RE.fullmatch(value):
            # Never echoed when it may carry a user or password (settings errors are logged).
            shown = "the value" if "@" in value else repr(value)
            raise ValueError(
                f"{shown} is not an http:// or https:// URL (host[:port][/path], no user "
                "or password in it); credentials come from the AWS environment or a Secret"
            )
        return value


_INT_TEXT_RE = re.compile(r"[-+]?[0-9]{1,18}")
_FLOAT_TEXT_RE = re.compile(
    r"[-+]?(?:[0-9]{1,18}(?:\.[0-9]{0,18})?|\.[0-9]{1,18})(?:[eE][-+]?[0-9]{1,3})?"
)
MAX_LIST_SETTING_CHARS = 64 * 1024


def _json_list(text: str) -> list[str]:
    """A list setting: a JSON list of strings (an empty value is the empty list)."""
    if not text.strip():
        return []
    if len(text) > MAX_LIST_SETTING_CHARS:
        raise ValueError(f"{len(text)} characters; the limit is {MAX_LIST_SETTING_CHARS}")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, list) or not all(isinstance(x, str) for x in doc):
        raise ValueError(
            f'must be a JSON list of strings, e.g. \'["a", "b"]\' (got {text[:40]!r})'
        )
    return doc


_HTTP_URL_RE = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[^\s/@:\[\]]+)(:[0-9]{1,5})?(/[^\s@]*)?")


def load_settings() -> Settings:
    """Settings from the environment.

    Raises:
        SpecError: a ``QLORA_*`` variable holds an invalid value (exit code 2), one
            ``QLORA_NAME: message`` line per variable.
    """
    try:
        return Settings()
    except ValidationError as e:
        lines = [
            f"QLORA_{'_'.join(str(p) for p in err['loc']).upper()}: "
            f"{err['msg'].removeprefix('Value error, ')}"
            if err["loc"] else str(err["msg"]).removeprefix("Value error, ")
            for err in e.errors(include_url=False)
        ]
        raise SpecError("invalid settings in the QLORA_* environment", lines) from e
