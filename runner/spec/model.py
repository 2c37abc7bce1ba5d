"""The job spec: one portable, versioned document per fine-tuning job.

The same document is the ``spec`` of the ``FineTuneJob`` custom resource and the file mounted
from a ConfigMap at ``/etc/qlora/job.yaml``. It is made of small frozen models, one per concern,
with constraints in the types and cross-field rules in ``model_validator(mode="after")`` whose
messages name the field and the fix. Deployment facts (namespace, image, S3 endpoint, GPU class
table) are not here: they live in :mod:`runner.settings`.

Types are strict where a wrong value would widen what runs or what is reachable, and plain
everywhere else only where YAML itself makes that necessary; each field is decided on purpose:

* **Booleans** (``model.trust_remote_code`` first of all, ``metrics.enabled``, ...) are
  :data:`StrictBool`: only a YAML/JSON ``true`` or ``false``. ``"yes"``, ``"on"``, ``1`` and
  the quoted string ``"true"`` are errors, so nothing but a literal ``true`` turns remote code on.
* **Whole numbers** are :data:`StrictInt`: no booleans (``true`` is not ``1``), no strings, no
  ``16.0``.
* **Real numbers** are :data:`Real`: ints and floats, and a numeric string only because PyYAML
  (YAML 1.1) reads ``2e-4`` as a string; never a boolean, never inf or NaN.
* **Strings** are never made from numbers or booleans (pydantic's default). URIs and paths
  (``model.source``, ``dataset.sources``, ``output.uri``, ``metrics.pushgateway_url``) are
  checked for their scheme: anything else is an error, never a fallback. Credentials in a URI
  are rejected (``runner.spec.loading`` also rejects anything that looks like a secret).
* **Choices** are enums or ``Literal`` values: exact strings only.

The size of the document itself (bytes, aliases, depth, list lengths, value lengths) is bounded
before any of this runs: :mod:`runner.spec.bounds`.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

API_VERSION = "qlora-runner.io/v1alpha1"
KIND = "FineTuneJob"

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# A DNS-1123 label, shortened so that rendered names (which add a hash suffix) stay within 63.
_NAME_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_MODULE_RE = r"^[A-Za-z_][A-Za-z0-9_.]*$"
MAX_TARGET_MODULES = 64
"""Most entries ``lora.target_modules`` may list (a model has seven projection kinds)."""


def _real(value: object) -> object:
    """A finite real number; a numeric string is read as one (PyYAML reads ``2e-4`` as text)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not a boolean (got {value!r})")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"must be a number (got {value!r})") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number (got {value!r})")
    return value


Real = Annotated[float, BeforeValidator(_real)]
"""A float field: ints, floats and numeric strings; never a boolean, inf or NaN."""


class _Section(BaseModel):
    """Base of every spec section: immutable, and unknown keys are errors, not silently dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=False)


class Metadata(_Section):
    """Identity of the job. ``name`` becomes part of every Kubernetes object's name."""

    name: str = Field(
        min_length=1,
        max_length=40,
        pattern=_NAME_RE,
        description="Job name: lowercase letters, digits and '-', at most 40 characters "
        "(a hash suffix is added to rendered object names).",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels copied onto rendered objects."
    )


class ModelSourceKind(StrEnum):
    """Where the base model comes from."""

    LOCAL = "local"
    S3 = "s3"
    HF = "hf"


class ModelSpec(_Section):
    """The base model to fine-tune."""

    source: str = Field(
        min_length=1,
        description="Base model: a local directory (absolute or relative), 's3://bucket/prefix', "
        "or 'hf://org/name@revision' (read from the local Hugging Face cache; pin a revision); "
        "or a GGUF file ('.gguf', local or s3://), converted once to safetensors and cached.",
        examples=["hf://meta-llama/Llama-3.1-8B-Instruct@0e9e39f", "s3://models/llama-3.1-8b"],
    )
    trust_remote_code: StrictBool = Field(
        False,
        description="Run Python code shipped with the model. Off unless you trust the source; "
        "only the YAML/JSON boolean true turns it on ('yes', 1 or \"true\" are errors). The "
        "plan says so, the run logs a warning and the published manifest records it.",
    )

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        kind = self.source_kind
        if kind is ModelSourceKind.HF:
            repo = self.source.removeprefix("hf://").split("@", 1)[0]
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", repo):
                raise ValueError(
                    f"'{self.source}' is not 'hf://org/name[@revision]'; "
                    "write e.g. hf://meta-llama/Llama-3.1-8B@main"
                )
        elif kind is ModelSourceKind.S3:
            _check_s3_uri(self.source)
        elif "://" in self.source:
            raise ValueError(
                f"unsupported scheme in '{self.source}'; use a local path, s3:// or hf://"
            )
        return self

    @property
    def source_kind(self) -> ModelSourceKind:
        """Which kind of source ``source`` names."""
        if self.source.startswith("hf://"):
            return ModelSourceKind.HF
        if self.source.startswith("s3://"):
            return ModelSourceKind.S3
        return ModelSourceKind.LOCAL

    @property
    def hf_repo(self) -> tuple[str, str]:
        """``(org/name, revision)`` of an ``hf://`` source; the revision defaults to ``main``."""
        repo, _, revision = self.source.removeprefix("hf://").partition("@")
        return repo, revision or "main"


class DatasetFormat(StrEnum):
    """Row layouts the runner understands."""

    MESSAGES = "messages"
    ALPACA = "alpaca"
    PROMPT_COMPLETION = "prompt-completion"
    TEXT = "text"
    SHAREGPT = "sharegpt"
    """``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`` chat dumps."""


class FieldMap(_Section):
    """Column names in the dataset rows, for data whose keys differ from the defaults."""

    messages: str = Field("messages", description="Chat list of {role, content} (messages).")
    prompt: str = Field("prompt", description="Prompt column (prompt-completion).")
    completion: str = Field("completion", description="Completion column (prompt-completion).")
    instruction: str = Field("instruction", description="Instruction column (alpaca).")
    input: str = Field("input", description="Optional input column (alpaca).")
    output: str = Field("output", description="Answer column (alpaca).")
    text: str = Field("text", description="Raw text column (text).")
    conversations: str = Field(
        "conversations", description="Turn list of {from, value} (sharegpt)."
    )


class DatasetSpec(_Section):
    """Training data and how loss is taken on it."""

    sources: list[str] = Field(
        min_length=1,
        description="JSON Lines / JSON / Parquet files: local paths or s3:// URIs, read in order.",
    )
    format: DatasetFormat = Field(DatasetFormat.MESSAGES, description="Row layout.")
    fields: FieldMap = Field(default_factory=FieldMap, description="Column name mapping.")
    train_on: Literal["completions", "all"] = Field(
        "completions",
        description="'completions' masks prompts so only answers carry loss; 'all' trains on "
        "every token.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template name for 'messages' data (e.g. 'llama-3.1', 'chatml'); "
        "default: the tokenizer's own.",
    )
    max_samples: StrictInt | None = Field(None, ge=1, description="Use at most this many rows.")
    eval_fraction: Real = Field(
        0.0, ge=0.0, lt=0.5, description="Fraction of rows held out for evaluation (0 = none)."
    )

    @model_validator(mode="before")
    @classmethod
    def _single_source(cls, data: object) -> object:
        # `source: x` is the common case; accept it as shorthand for `sources: [x]`.
        if isinstance(data, dict) and "source" in data and "sources" not in data:
            data = dict(data)
            data["sources"] = [data.pop("source")]
        return data

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        for src in self.sources:
            if src.startswith("s3://"):
                _check_s3_uri(src)
            elif "://" in src:
                raise ValueError(f"unsupported scheme in '{src}'; use a local path or s3://")
        if self.format is DatasetFormat.TEXT and self.train_on == "completions":
            raise ValueError(
                "format 'text' has no completion to train on; set train_on: all "
                "or use format: prompt-completion"
            )
        return self


class LoraSpec(_Section):
    """LoRA adapter shape."""

    r: StrictInt = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: StrictInt = Field(16, ge=1, le=4096, description="LoRA alpha (scaling = alpha / r).")
    dropout: Real = Field(
        0.0, ge=0.0, lt=1.0, description="LoRA dropout (0 lets Unsloth use its fast path)."
    )
    use_rslora: StrictBool = Field(
        False, description="Rank-stabilised LoRA (scaling = alpha / sqrt r)."
    )
    target_modules: list[Annotated[str, Field(pattern=_MODULE_RE)]] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        max_length=MAX_TARGET_MODULES,
        description="Linear modules that get adapters, each listed once; default: all seven "
        "projections. 'qlora validate' checks them against the model's architecture when its "
        "config is known.",
    )

    @field_validator("target_modules")
    @classmethod
    def _no_duplicates(cls, modules: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in modules:
            if name in seen:
                raise ValueError(f"'{name}' is listed more than once; list each module once")
            seen.add(name)
        return modules


class QuantMode(StrEnum):
    """Base-model precision during training."""

    AUTO = "auto"
    FOUR_BIT = "4bit"
    DYNAMIC_FOUR_BIT = "dynamic-4bit"
    SIXTEEN_BIT = "16bit"


class QuantizationSpec(_Section):
    """How the frozen base model is stored on the GPU."""

    mode: QuantMode = Field(
        QuantMode.AUTO,
        description="'auto' lets the planner choose from resources.priority; '4bit' is QLoRA "
        "(nf4); 'dynamic-4bit' keeps sensitive modules in 16 bit; '16bit' is plain LoRA.",
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: StrictBool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Matmul dtype; 'auto' is bfloat16 where supported, else float32."
    )
    dynamic_budget_mib: float | None = Field(
        None,
        ge=0,
        description="dynamic-4bit: at most this many MiB of GPU memory for the linear modules "
        "kept in 16 bit (default: all that the GPU class leaves beside the rest of the "
        "estimate).",
    )
    calibration_rows: StrictInt = Field(
        8,
        ge=1,
        le=256,
        description="dynamic-4bit: training rows (the first ones) on which each linear "
        "module's output error under nf4 is measured.",
    )


class Backend(StrEnum):
    """Training implementation."""

    AUTO = "auto"
    UNSLOTH = "unsloth"
    TRANSFORMERS = "transformers"


Auto = Literal["auto"]


class TrainingSpec(_Section):
    """Optimisation schedule and batch shape."""

    backend: Backend = Field(
        Backend.AUTO,
        description="'auto' uses Unsloth where CUDA and Unsloth are present, else "
        "transformers + peft + bitsandbytes.",
    )
    epochs: Real = Field(1.0, gt=0, le=1000, description="Passes over the data.")
    max_steps: StrictInt | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: Real = Field(2e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule."
    )
    warmup_ratio: Real = Field(0.03, ge=0, le=0.5, description="Fraction of steps warming up.")
    weight_decay: Real = Field(0.01, ge=0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: Real = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["adamw_8bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused"] = (
        Field("adamw_8bit", description="Optimizer; 8-bit AdamW is the QLoRA default on GPUs.")
    )
    micro_batch_size: Auto | Annotated[StrictInt, Field(ge=1, le=1024)] = Field(
        "auto", description="Sequences per forward pass; 'auto' = largest that fits the class."
    )
    gradient_accumulation_steps: Auto | Annotated[StrictInt, Field(ge=1, le=4096)] = Field(
        "auto", description="Micro batches per optimizer step; 'auto' keeps the target batch."
    )
    target_effective_batch_size: StrictInt = Field(
        16, ge=1, le=65536, description="Sequences per optimizer step the planner aims for."
    )
    max_seq_length: StrictInt = Field(2048, ge=16, le=1_048_576, description="Tokens per sequence.")
    packing: StrictBool = Field(False, description="Pack several short rows into one sequence.")
    seed: StrictInt = Field(3407, ge=0, description="Random seed for data order and LoRA init.")
    gradient_checkpointing: StrictBool = Field(
        True, description="Recompute activations in backward (Unsloth offloads them to RAM)."
    )
    checkpoint_every_steps: StrictInt | None = Field(
        None, ge=1, description="Write a resumable checkpoint every N optimizer steps."
    )
    checkpoint_every_minutes: Annotated[float, Field(gt=0), BeforeValidator(_real)] | None = Field(
        30.0, description="Write a resumable checkpoint at least this often (minutes)."
    )
    logging_steps: StrictInt = Field(1, ge=1, description="Log loss and throughput every N steps.")

    @model_validator(mode="after")
    def _check_batch(self) -> TrainingSpec:
        m, a = self.micro_batch_size, self.gradient_accumulation_steps
        if m != "auto" and m > self.target_effective_batch_size and a == "auto":
            raise ValueError(
                f"micro_batch_size {m} exceeds target_effective_batch_size "
                f"{self.target_effective_batch_size}; lower micro_batch_size or raise the target"
            )
        return self


class OutputSpec(_Section):
    """Where the verified adapter is published."""

    uri: str = Field(
        description="'s3://bucket/prefix' or 'file://path' (a relative path is resolved "
        "against the working directory). Each run writes under <uri>/runs/<run-id>/ and "
        "updates <uri>/latest.json after its manifest is committed.",
        examples=["s3://adapters/support-bot", "file:///data/adapters/support-bot"],
    )

    @model_validator(mode="after")
    def _check_uri(self) -> OutputSpec:
        if self.uri.startswith("s3://"):
            _check_s3_uri(self.uri)
        elif self.uri.startswith("file://"):
            path = self.uri.removeprefix("file://")
            if not path:
                raise ValueError("file:// needs a path, e.g. file:///data/adapters or file://./out")
            if ".." in path.split("/"):
                raise ValueError(f"'{self.uri}' contains '..'; name the directory directly")
        else:
            raise ValueError(
                f"'{self.uri}' has no supported scheme; use s3://bucket/prefix or file://path"
            )
        return self


class ResourcesSpec(_Section):
    """Placement hints for the planner."""

    gpu_class: str = Field(
        "auto",
        pattern=r"^(auto|[0-9]+GB(x[0-9]+)?|[a-z0-9][a-z0-9-]*)$",
        description="GPU memory class ('24GB', '48GB', '80GB', ... from the class table) or "
        "'auto' for the smallest class that fits.",
    )
    priority: Literal["vram", "accuracy"] = Field(
        "vram",
        description="With quantization.mode auto: 'vram' picks 4-bit; 'accuracy' picks 16-bit "
        "LoRA if it fits the class, else dynamic 4-bit.",
    )
    # Data parallelism (torchrun + DDP): every GPU holds the whole model and trains on its own
    # share of each optimizer step; the planner keeps the effective batch the same.
    gpus_per_node: Auto | Annotated[int, Field(ge=1, le=16)] = Field(
        1,
        description="GPUs per node (one pod per node, torchrun starts one rank per GPU); "
        "'auto' lets the planner add GPUs when a deadline_hours goal needs them.",
    )
    nodes: Auto | Annotated[int, Field(ge=1, le=64)] = Field(
        1,
        description="Nodes (pods) the job spans; more than 1 renders an Indexed Job with a "
        "headless Service; 'auto' lets the planner add nodes for a deadline_hours goal.",
    )
    deadline_hours: float | None = Field(
        None,
        gt=0,
        le=24 * 90,
        description="Wall-time goal: with gpus_per_node or nodes 'auto' the planner picks the "
        "fewest GPUs whose runtime estimate meets it (the dataset must be local or "
        "training.max_steps set).",
    )


class MetricsSpec(_Section):
    """Prometheus exposition while the job runs, and a push when it ends."""

    enabled: StrictBool = Field(True, description="Serve /metrics while the job runs.")
    port: StrictInt = Field(9400, ge=1024, le=65535, description="Port of the /metrics endpoint.")
    pushgateway_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/@]+(:[0-9]+)?(/.*)?$",
        description="Pushgateway to push final values to (http[s]://host:port); default: the "
        "deployment's setting, if any.",
    )


class QualityGateSpec(_Section):
    """What the evaluation must show before the adapter is published (else exit 4).

    Each comparison is paired (same rows, base vs adapter) and judged against its noise: the
    normal-approximation bound of the mean per-row difference at ``confidence``.
    """

    loss: Literal["improve", "not-worse", "ignore"] = Field(
        "improve",
        description="'improve': the held-out loss must be lower than the base model's beyond "
        "noise (the default: an adapter that learned nothing cannot pass); 'not-worse': not "
        "higher beyond noise; 'ignore'.",
    )
    accuracy: Literal["improve", "not-worse", "ignore"] = Field(
        "improve",
        description="Where answers are scored: 'improve' (the default: accuracy must rise "
        "beyond chance, McNemar's exact bound; the answer's loss alone also falls for an "
        "adapter that learned only the answer format), 'not-worse' (not lower beyond chance) "
        "or 'ignore'.",
    )
    confidence: Real = Field(0.95, ge=0.5, lt=1.0, description="Confidence of the bounds.")


class EvaluationSpec(_Section):
    """Held-out evaluation of base and adapter after verification, before publishing."""

    enabled: StrictBool = Field(True, description="Evaluate (and gate) before publishing.")
    sources: list[str] = Field(
        default_factory=list,
        description="Held-out files (same format as dataset.sources; local or s3://); "
        "default: dataset.eval_fraction's split, else a slice held out of training.",
    )
    holdout_fraction: Real = Field(
        0.05,
        gt=0.0,
        lt=0.5,
        description="Without dataset.eval_fraction, this fraction of the rows is held out of "
        "training (seeded, before training) and evaluated on; recorded in the manifest.",
    )
    max_rows: StrictInt | None = Field(
        1000, ge=1, description="Evaluate at most this many held-out rows (the first ones)."
    )
    scoring: Literal["auto", "choices", "exact-match", "loss"] = Field(
        "auto",
        description="'choices': rows list options (field choices_field), scored by the "
        "log-likelihood of each option's answer tokens; 'exact-match': greedy decoding must "
        "reproduce the answer; 'loss': loss and perplexity only; 'auto': choices when every "
        "held-out row has choices_field, else loss.",
    )
    choices_field: str = Field("choices", description="Row field listing the answer options.")
    gate: QualityGateSpec = Field(default_factory=QualityGateSpec, description="Quality gate.")


class JobBody(_Section):
    """The ``spec`` of a FineTuneJob."""

    model: ModelSpec
    dataset: DatasetSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output: OutputSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)

    @model_validator(mode="after")
    def _check_world(self) -> JobBody:
        r, t = self.resources, self.training
        if r.gpus_per_node == "auto" or r.nodes == "auto":
            return self
        world = r.gpus_per_node * r.nodes
        target = t.target_effective_batch_size
        if world > 1 and target % world:
            lower, upper = target - target % world, target + world - target % world
            fix = f"{lower} or {upper}" if lower else str(upper)
            raise ValueError(
                f"training.target_effective_batch_size {target} is not a multiple of the world "
                f"size {world} (resources.gpus_per_node x resources.nodes); micro batch x "
                f"accumulation x world size must equal it exactly: use {fix}"
            )
        m, a = t.micro_batch_size, t.gradient_accumulation_steps
        if world > 1 and m != "auto" and a != "auto" and m * a * world != target:
            raise ValueError(
                f"training.micro_batch_size {m} x gradient_accumulation_steps {a} x world size "
                f"{world} = {m * a * world}, not target_effective_batch_size {target}; set "
                "gradient_accumulation_steps: auto or make the product equal the target"
            )
        return self


class JobSpec(_Section):
    """A versioned fine-tuning job document (``kind: FineTuneJob``)."""

    api_version: Literal["qlora-runner.io/v1alpha1"] = Field(
        alias="apiVersion", description="Schema version of this document."
    )
    kind: Literal["FineTuneJob"] = Field(description="Always 'FineTuneJob'.")
    metadata: Metadata
    spec: JobBody

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _check_s3_uri(uri: str) -> None:
    """Reject malformed or credential-carrying s3:// URIs.

    Raises:
        ValueError: with a message naming the expected form.
    """
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        # Not echoed: the part before '@' may be a secret key.
        raise ValueError(
            f"'s3://…@{bucket.rpartition('@')[2]}/…' carries credentials or a port; credentials "
            "come from the environment or a Secret, the endpoint from settings"
        )
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"'{uri}': '{bucket}' is not a valid bucket name (3-63 of a-z 0-9 . -)")
    segments = key.rstrip("/").split("/")
    if any(part in {"..", "."} for part in segments) or (key.rstrip("/") and "" in segments):
        raise ValueError(f"'{uri}': the key must not contain '.', '..' or '//' segments")
