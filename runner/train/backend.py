"""The training backend interface, and the choice between Unsloth and plain transformers.

The recipe (:mod:`runner.recipe`) never touches a training library directly: it asks a
:class:`TrainerBackend` to load the base model with LoRA attached, train it on already
tokenized examples, save the adapter, and load base + adapter again for verification. Two
implementations exist: :class:`runner.train.transformers_backend.TransformersBackend`
(transformers + peft + bitsandbytes; runs on the CPU) and ``UnslothBackend`` in
:mod:`runner.train.unsloth_backend` (CUDA only). Both train with TRL's ``SFTTrainer``.

This module imports no heavy library, so the recipe can decide on a backend (and fail with a
clear message) before paying for ``import torch``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from runner.errors import MissingDependencyError, SpecError
from runner.spec.model import Backend, LoraSpec

log = logging.getLogger(__name__)

UNSLOTH_MODULE = "runner.train.unsloth_backend"
"""Module that must define ``UnslothBackend`` (a class constructed with no arguments)."""


@dataclass(frozen=True)
class Precision:
    """How the frozen base model is held in memory; never 'auto' here.

    Attributes:
        quant_mode: ``'4bit'`` (QLoRA), ``'dynamic-4bit'`` (4-bit with the modules of
            ``skip_modules`` kept in 16 bit) or ``'16bit'``.
        compute_dtype: Matmul dtype: ``'bfloat16'``, ``'float16'`` or ``'float32'``.
        quant_type: ``'nf4'`` or ``'fp4'`` (4-bit modes only).
        double_quant: Quantize the quantization constants too (4-bit modes only).
        skip_modules: Dynamic 4-bit: full names of the linear modules bitsandbytes leaves in
            16 bit (``llm_int8_skip_modules``; :mod:`runner.train.sensitivity` chooses them).
    """

    quant_mode: str
    compute_dtype: str
    quant_type: str = "nf4"
    double_quant: bool = True
    skip_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A manifest gives a JSON list back (qlora eval rebuilds the precision from it).
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))

    @property
    def is_4bit(self) -> bool:
        """Whether the base weights are quantized to 4 bit."""
        return self.quant_mode in ("4bit", "dynamic-4bit")


@dataclass(frozen=True)
class BatchShape:
    """The optimisation schedule the trainer runs with, every 'auto' already resolved.

    Attributes:
        micro_batch_size: Sequences per forward pass.
        gradient_accumulation_steps: Micro batches per optimizer step.
        max_seq_length: Tokens per sequence (the data is already truncated to it).
        epochs: Passes over the data (ignored when ``max_steps`` is set).
        max_steps: Optimizer steps, or None to run ``epochs``.
        learning_rate: Peak learning rate.
        lr_scheduler: transformers scheduler name.
        warmup_ratio: Fraction of steps warming up.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping norm.
        optimizer: transformers ``optim`` name; a backend may fall back (and log it).
        seed: Seed for data order and LoRA init.
        gradient_checkpointing: Recompute activations in backward.
        logging_steps: Report loss every N optimizer steps.
        checkpoint_every_steps: Save a resumable checkpoint every N steps, or None.
        completion_only_loss: Only tokens with ``completion_mask == 1`` carry loss.
        packing: Pack several short rows into one ``max_seq_length`` sequence.
        checkpointed_layers: Partial checkpointing: only the first this many decoder layers
            are checkpointed (the plan's choice, :mod:`runner.train.speedups`); None = all.
        ordered: Lay the rows out in the plan's order (:mod:`runner.train.ordering`) and read
            them sequentially, instead of the trainer's own shuffle.
    """

    micro_batch_size: int
    gradient_accumulation_steps: int
    max_seq_length: int
    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    optimizer: str = "adamw_8bit"
    seed: int = 3407
    gradient_checkpointing: bool = True
    logging_steps: int = 1
    checkpoint_every_steps: int | None = None
    completion_only_loss: bool = True
    packing: bool = False
    checkpointed_layers: int | None = None
    ordered: bool = True


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence exactly as it is trained on (already truncated).

    The preflight stores both sequences as compact ``array`` objects (4 and 1 bytes a token,
    not a Python int object each), which keeps million-row datasets in memory; any sequence
    of ints works.

    Attributes:
        input_ids: Token ids.
        completion_mask: 1 where the token carries loss, 0 elsewhere; same length.
        row: Where the row came from, e.g. ``dataset.sources[0]: row 17`` (for messages).
    """

    input_ids: Sequence[int]
    completion_mask: Sequence[int]
    row: str = ""


@dataclass
class ModelSession:
    """A loaded base model with LoRA attached, as returned by :meth:`TrainerBackend.load`.

    Attributes:
        model: The peft-wrapped model (a ``peft.PeftModel`` or Unsloth's equivalent).
        tokenizer: Its tokenizer (``PreTrainedTokenizerBase``), pad token set.
        precision: The precision it was loaded in.
        model_dir: Local directory of the base model.
        notes: Things the backend decided on its own (fallbacks), for logs and the manifest.
    """

    model: Any
    tokenizer: Any
    precision: Precision
    model_dir: Path
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrainOutcome:
    """What one training run did.

    Attributes:
        steps: Optimizer steps taken.
        losses: Training loss per logging step, in order.
        runtime_s: Wall time of ``trainer.train()``.
        train_tokens: Tokens seen by the model (all epochs, padding excluded).
        eval_loss: Loss on the held-out split, or None without one.
        optimizer: The optimizer actually used (after any fallback).
    """

    steps: int
    losses: tuple[float, ...]
    runtime_s: float
    train_tokens: int
    eval_loss: float | None = None
    optimizer: str = ""

    @property
    def first_loss(self) -> float | None:
        """The first logged training loss."""
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        """The last logged training loss."""
        return self.losses[-1] if self.losses else None


@runtime_checkable
class TrainerBackend(Protocol):
    """One training stack: loads, trains, saves, and reloads for verification.

    Implementations import their heavy libraries inside the methods and turn a missing one
    into :func:`runner.errors.missing_extra`. Every method runs in the training process.
    """

    name: str
    """``'transformers'`` or ``'unsloth'``: recorded in logs and the manifest."""

    def load(
        self,
        model_dir: Path,
        precision: Precision,
        lora: LoraSpec,
        *,
        seed: int,
        max_seq_length: int,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = True,
    ) -> ModelSession:
        """Load the base model in ``precision`` and attach fresh LoRA adapters.

        Args:
            model_dir: Local directory with the base model (config, weights, tokenizer).
            precision: Resolved precision.
            lora: Rank, alpha, dropout, rsLoRA and target modules.
            seed: Seed for the LoRA initialisation.
            max_seq_length: Longest sequence the model will see.
            trust_remote_code: Allow model code shipped with the weights.
            gradient_checkpointing: Whether training will recompute activations (a backend
                whose checkpointing is part of the model, like Unsloth's, sets it up here).

        Raises:
            SpecError: a target module does not exist in the model.
        """
        ...

    def train(
        self,
        session: ModelSession,
        train: Sequence[TokenizedExample],
        eval_data: Sequence[TokenizedExample] | None,
        shape: BatchShape,
        callbacks: Sequence[Any],
        output_dir: Path,
        resume_from: Path | None = None,
    ) -> TrainOutcome:
        """Train the session's LoRA weights in place with TRL's ``SFTTrainer``.

        Args:
            session: From :meth:`load`.
            train: Tokenized training examples (input ids + completion mask).
            eval_data: Held-out examples, or None.
            shape: Batch shape and schedule.
            callbacks: Extra ``transformers.TrainerCallback`` objects (metrics, tests).
            output_dir: Scratch directory for checkpoints.
            resume_from: A trainer checkpoint folder (adapter, optimizer, scheduler, RNG and
                trainer state) to continue from: the step count, the data position and the
                loss history carry on (``trainer.train(resume_from_checkpoint=...)``).
        """
        ...

    def save_adapter(self, session: ModelSession, dest: Path) -> list[Path]:
        """Write the adapter (``adapter_config.json``, ``adapter_model.safetensors``) and the
        tokenizer files into ``dest``; return the files written."""
        ...

    def load_for_verification(
        self,
        model_dir: Path,
        adapter_dir: Path,
        precision: Precision,
        *,
        trust_remote_code: bool = False,
    ) -> ModelSession:
        """Load a fresh base model and the saved adapter onto it (inference mode).

        The returned model must support ``with model.disable_adapter():`` so the verifier can
        compare against the base model's own logits without a second copy in memory.
        """
        ...


def prequantized(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds an already quantized checkpoint (e.g. ``*-unsloth-bnb-4bit``).

    Such a directory's ``config.json`` carries a ``quantization_config``; it loads as it is,
    with the modules its ``llm_int8_skip_modules`` names left in 16 bit.
    """
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config.get("quantization_config"), dict)


def cuda_available() -> bool:
    """Whether torch is installed and sees a CUDA device."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def cuda_device() -> tuple[str, int] | None:
    """Name and total memory in bytes of the CUDA device training uses; None without CUDA."""
    if not cuda_available():
        return None
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return str(props.name), int(props.total_memory)


def release_device_memory() -> None:
    """Free what the finished training left behind before the verification reload.

    The caching allocator keeps the trained model's blocks reserved after the last reference
    is gone; loading a second copy of the base model on top of them raised the run's peak
    above the training peak the planner sized the GPU class for (8B on an H200: 8.47 GiB
    reserved against 7.90 GiB in training). Collecting and emptying the cache first keeps
    the verification reload inside the training peak.
    """
    import gc

    gc.collect()
    if cuda_available():
        import torch

        torch.cuda.empty_cache()


def cuda_bf16_supported() -> bool:
    """Whether the visible CUDA device computes in bfloat16 (False without CUDA)."""
    if not cuda_available():
        return False
    import torch

    return bool(torch.cuda.is_bf16_supported())


def _unsloth_problem() -> str | None:
    """Why Unsloth cannot run here, or None when it can."""
    if importlib.util.find_spec(UNSLOTH_MODULE) is None:
        return f"{UNSLOTH_MODULE} is not part of this build"
    if not cuda_available():
        return "no CUDA device is visible (Unsloth trains on NVIDIA GPUs only)"
    try:
        importlib.import_module("unsloth")
    except ImportError as e:
        return f"unsloth does not import ({e}); install it with pip install 'qlora-runner[gpu]'"
    return None


def select_backend(
    requested: Backend | str, *, world_size: int = 1, unsloth_ddp: bool = False
) -> TrainerBackend:
    """The backend to train with.

    Args:
        requested: ``spec.training.backend``: 'auto' picks Unsloth when CUDA is available,
            ``unsloth`` imports and :data:`UNSLOTH_MODULE` exists, else transformers.
        world_size: Ranks of the run; above 1 'auto' means transformers unless
            ``unsloth_ddp`` (the ``QLORA_UNSLOTH_DDP`` setting) is on.
        unsloth_ddp: Whether Unsloth may train with several ranks.

    Raises:
        SpecError: 'unsloth' was asked for where it cannot run (exit code 2).
        MissingDependencyError: the transformers stack is not installed (exit code 10).
    """
    choice = Backend(requested)
    if world_size > 1 and not unsloth_ddp:
        if choice is Backend.UNSLOTH:
            raise SpecError(
                f"spec.training.backend: 'unsloth' with world size {world_size} needs the "
                "deployment setting QLORA_UNSLOTH_DDP=true (Unsloth's DDP path is off until it "
                "passes the multi-GPU tests); use backend auto or transformers"
            )
        if choice is Backend.AUTO:
            log.info(
                "using the transformers backend: world size %d and QLORA_UNSLOTH_DDP is off",
                world_size,
                extra={"backend": "transformers"},
            )
            choice = Backend.TRANSFORMERS
    if choice is not Backend.TRANSFORMERS:
        problem = _unsloth_problem()
        if problem is None:
            module = importlib.import_module(UNSLOTH_MODULE)
            backend: TrainerBackend = module.UnslothBackend()
            return backend
        if choice is Backend.UNSLOTH:
            raise SpecError(
                f"spec.training.backend: 'unsloth' cannot run here: {problem}; "
                "use backend: auto or transformers"
            )
        log.info("using the transformers backend: %s", problem, extra={"backend": "transformers"})
    for mod in ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes"):
        if importlib.util.find_spec(mod) is None:
            raise _missing(mod)
    from runner.train.transformers_backend import TransformersBackend

    return TransformersBackend()


def _missing(mod: str) -> MissingDependencyError:
    from runner.errors import missing_extra

    return missing_extra(mod, "train")
