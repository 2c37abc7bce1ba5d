"""The fast GPU backend: Unsloth's ``FastLanguageModel`` trained with TRL's ``SFTTrainer``.

Unsloth replaces the attention, MLP, RoPE, LoRA and cross-entropy kernels of the model with
fused Triton versions and offloads each layer's checkpointed input to host RAM
(``use_gradient_checkpointing="unsloth"``, set up when the model is loaded; with
``training.gradient_checkpointing: false`` nothing is checkpointed). The trainer itself is told
nothing about checkpointing, as in Unsloth's own notebooks: ``SFTConfig(gradient_checkpointing=
True)`` would make ``Trainer`` call ``gradient_checkpointing_enable()`` on top of Unsloth's own
(:func:`unsloth_sft_args`). On the benchmark card (one H200, seq 2048, micro batch 4) this
backend trained the Llama-3.1-8B shape as fast as a bare Unsloth script, and bare Unsloth was
1.31x (8B) to 1.6x (1B) faster than plain transformers + peft + bitsandbytes with TRL 1.15's
fused head (``bench/README.md``).
Everything around training stays the recipe's: the data arrives tokenized with its completion
mask, and the saved adapter is a plain peft adapter, verified and published exactly like the
transformers backend's.

Unsloth patches transformers, peft and TRL when it is imported and refuses to import without
a GPU, so this module imports it only inside :meth:`UnslothBackend.load` (and before any other
training library in that process).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.errors import SpecError, VerificationError, missing_extra
from runner.spec.model import LoraSpec
from runner.train.backend import (
    BatchShape,
    ModelSession,
    Precision,
    TokenizedExample,
    TrainOutcome,
    prequantized,
)
from runner.train.model_files import raise_model_load_error
from runner.train.sft_loop import run_trainer, save_adapter_files, sft_args, trainer_datasets
from runner.train.speedups import enable_varlen_attention, speed_callbacks

log = logging.getLogger(__name__)

_IGNORE_INDEX = -100


def _unsloth() -> Any:
    """Import Unsloth first (it must patch transformers, peft and TRL before they load)."""
    try:
        import unsloth
    except ImportError as e:
        raise missing_extra("unsloth", "gpu") from e
    except NotImplementedError as e:  # Unsloth's answer when no GPU is visible
        raise SpecError(f"spec.training.backend: Unsloth cannot run here: {e}") from e
    return unsloth


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def unsloth_chat_template(name: str) -> str | None:
    """Jinja text of one of Unsloth's named chat templates (``llama-3.1``, ``chatml``…).

    Returns None when Unsloth is not importable here or has no template of that name. The
    runner masks loss on character spans of the rendered text, so any template works with
    completion-only loss; this only makes Unsloth's names available.
    """
    try:
        from unsloth.chat_templates import CHAT_TEMPLATES
    except (ImportError, NotImplementedError):
        return None
    entry = CHAT_TEMPLATES.get(name)
    return str(entry[0]) if entry else None


def unsloth_bnb_config(precision: Precision) -> Any:
    """Dynamic 4-bit through Unsloth: the ``BitsAndBytesConfig`` Unsloth itself would build
    (nf4, double quant, the compute dtype, its own skip list) plus the modules the runner keeps
    in 16 bit. ``FastLanguageModel.from_pretrained`` keeps a caller's bitsandbytes 4-bit
    ``quantization_config`` authoritative (unsloth 2026.10.9, ``models/llama.py``: "a
    BitsAndBytesConfig passed by the caller stays authoritative") instead of its own."""
    from transformers import BitsAndBytesConfig
    from unsloth_zoo.peft_utils import SKIP_QUANTIZATION_MODULES

    dtype = _torch_dtype(precision.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=precision.double_quant,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=[*SKIP_QUANTIZATION_MODULES, *precision.skip_modules],
    )


class UnslothBackend:
    """:class:`runner.train.backend.TrainerBackend` on Unsloth (CUDA only)."""

    name = "unsloth"

    def _from_pretrained(
        self,
        model_dir: Path,
        precision: Precision,
        max_seq_length: int,
        trust_remote_code: bool,
        notes: list[str],
    ) -> tuple[Any, Any]:
        unsloth = _unsloth()
        kwargs: dict[str, Any] = {
            "model_name": str(model_dir),
            "max_seq_length": max_seq_length,
            "dtype": _torch_dtype(precision.compute_dtype),
            "trust_remote_code": trust_remote_code,
            "local_files_only": True,
            "load_in_4bit": precision.is_4bit,
            "load_in_16bit": not precision.is_4bit,
        }
        if "LOCAL_RANK" in os.environ:  # under torchrun: this rank's own GPU
            kwargs["device_map"] = {"": int(os.environ["LOCAL_RANK"])}
        if prequantized(model_dir):
            notes.append(f"{model_dir.name}: pre-quantized checkpoint, loaded as it is")
        elif precision.is_4bit and precision.skip_modules:
            kwargs["quantization_config"] = unsloth_bnb_config(precision)
        if precision.is_4bit and precision.quant_type != "nf4":
            notes.append(
                f"Unsloth quantizes to nf4; quantization.quant_type "
                f"{precision.quant_type} is not used"
            )
        try:
            model, tokenizer = unsloth.FastLanguageModel.from_pretrained(**kwargs)
        except Exception as e:  # the model files are the user's input: see the helper
            raise_model_load_error(model_dir, e)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer

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
        """Load the base model through Unsloth and attach fresh LoRA adapters.

        ``gradient_checkpointing`` picks Unsloth's offloaded checkpointing or none.
        """
        from runner.train.transformers_backend import linear_module_names

        notes: list[str] = []
        model, tokenizer = self._from_pretrained(
            model_dir, precision, max_seq_length, trust_remote_code, notes
        )
        varlen = enable_varlen_attention()
        log.info("padding-free attention: %s", varlen, extra={"varlen_attention": varlen})
        if varlen == "patched":
            notes.append(
                "padding-free rows attend with PyTorch's flash varlen kernel, one launch per "
                "layer (runner.train.speedups)"
            )
        available = linear_module_names(model)
        missing = [m for m in lora.target_modules if m not in available]
        if missing:
            raise SpecError(
                f"spec.lora.target_modules: {', '.join(missing)} not found in the model; "
                f"it has {', '.join(sorted(available))}"
            )
        from unsloth import FastLanguageModel

        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias="none",
            use_rslora=lora.use_rslora,
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=seed,
            max_seq_length=max_seq_length,
        )
        trainable, total = model.get_nb_trainable_parameters()
        log.info(
            "LoRA attached (Unsloth): %d trainable of %d parameters (%.2f%%)",
            trainable,
            total,
            100.0 * trainable / max(total, 1),
            extra={"trainable_params": trainable, "total_params": total},
        )
        return ModelSession(model, tokenizer, precision, model_dir, notes)

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
        """Train the session's LoRA weights in place with (Unsloth-patched) SFTTrainer.

        ``resume_from`` continues from a trainer checkpoint exactly as the transformers
        backend does (step count, data position, optimizer and loss history carry on).
        """
        _unsloth()
        from datasets import Dataset
        from transformers import PrinterCallback
        from trl import SFTConfig, SFTTrainer

        from runner.train.transformers_backend import quiet_progress_bars

        quiet_progress_bars()
        config = SFTConfig(**unsloth_sft_args(shape, output_dir, session.precision.compute_dtype))
        train_ds, eval_ds = trainer_datasets(Dataset, train, eval_data, shape, padding_free=True)
        trainer = SFTTrainer(
            model=session.model,
            args=config,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=session.tokenizer,
            callbacks=[*callbacks, *speed_callbacks(shape)],
        )
        trainer.remove_callback(PrinterCallback)
        if shape.completion_only_loss:
            counts = check_completion_masking(trainer, train, shape.micro_batch_size)
            log.info("completion-only loss checked on the collated batch", extra=counts)
        return run_trainer(trainer, eval_data, resume_from, shape.optimizer)

    def save_adapter(self, session: ModelSession, dest: Path) -> list[Path]:
        """Write the adapter (plain peft format) and the tokenizer files into ``dest``."""
        return save_adapter_files(session, dest)

    def load_for_verification(
        self,
        model_dir: Path,
        adapter_dir: Path,
        precision: Precision,
        *,
        trust_remote_code: bool = False,
    ) -> ModelSession:
        """Load a fresh base model through Unsloth, put the saved adapter on it, eval mode."""
        notes: list[str] = []
        # Unsloth's fused loss may skip materialising logits; verification compares them.
        os.environ["UNSLOTH_RETURN_LOGITS"] = "1"
        base, _ = self._from_pretrained(
            model_dir, precision, _max_positions(model_dir), trust_remote_code, notes
        )
        try:
            from peft import PeftModel
        except ImportError as e:
            raise missing_extra("peft", "train") from e
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
        model.eval()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            str(adapter_dir), trust_remote_code=trust_remote_code
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return ModelSession(model, tokenizer, precision, model_dir, notes)


def unsloth_sft_args(shape: BatchShape, output_dir: Path, compute_dtype: str) -> dict[str, Any]:
    """The ``SFTConfig`` arguments of an Unsloth run: the shared ones, checkpointing left out.

    Unsloth's checkpointing is part of the model (``get_peft_model``, see the module
    docstring). Turning the trainer's on as well made the Llama-3.2-1B shape train about 14 %
    slower on an H200 (``bench/speed/run2-1b-ab``), so the trainer is never told.
    """
    args = sft_args(
        shape,
        output_dir,
        optim=shape.optimizer,
        bf16=compute_dtype == "bfloat16",
        fp16=compute_dtype == "float16",
    )
    args["gradient_checkpointing"] = False
    args["dataset_num_proc"] = None
    return args


def check_completion_masking(
    trainer: Any, train: Sequence[TokenizedExample], rows: int
) -> dict[str, int]:
    """Collate the first rows with the trainer's own collator and compare labels to the mask.

    Unsloth rewrites parts of SFTTrainer (padding-free batching, its own column handling: some
    paths turn ``completion_mask`` into a ``labels`` column); this proves, before the first
    step, that the completion tokens of our own examples (and only they) carry loss. Rows are
    matched to examples by their token ids. Padding-free batching also masks the first token of
    each packed row, so up to one token per row may be missing from the labels.

    Returns:
        ``{"mask_tokens": ..., "label_tokens": ..., "rows": ...}`` for the log.

    Raises:
        VerificationError: the collated labels train on other tokens than the mask says.
    """
    masks = {tuple(e.input_ids): e.completion_mask for e in train}
    dataset = trainer.train_dataset
    sample = []
    wanted = 0
    for i in range(min(len(dataset), 64)):
        row = dataset[i]
        mask = masks.get(tuple(row["input_ids"]))
        if mask is not None:
            sample.append(row)
            wanted += int(sum(mask))
        if len(sample) == rows:
            break
    if not sample:
        raise VerificationError(
            "completion-only loss: no training row reached the trainer unchanged, so the "
            "completion mask cannot be checked; nothing was trained"
        )
    batch = trainer.data_collator(sample)
    carried = int((batch["labels"] != _IGNORE_INDEX).sum())
    if not wanted - len(sample) <= carried <= wanted:
        raise VerificationError(
            f"completion-only loss: the trainer's collator labels {carried} tokens for loss "
            f"but the completion mask of the same {len(sample)} rows has {wanted}; "
            "nothing was trained",
            details=[f"collator: {type(trainer.data_collator).__name__}"],
        )
    return {"mask_tokens": wanted, "label_tokens": carried, "rows": len(sample)}


def _max_positions(model_dir: Path) -> int:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 2048
    return int(min(config.get("max_position_embeddings", 2048), 8192))
