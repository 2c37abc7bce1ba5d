"""The portable backend: transformers + peft + bitsandbytes, trained with TRL's SFTTrainer.

It runs wherever PyTorch runs, the CPU included: bitsandbytes 0.50 quantizes to nf4 on the
CPU, so the CI end-to-end test trains real 4-bit QLoRA. On a GPU it is the fallback when
Unsloth is absent or not wanted. The data arrives already tokenized (input ids plus a
completion mask, see :mod:`runner.train.tokenize`), so what the preflight measured is exactly
what SFTTrainer trains on; with ``completion_only_loss`` TRL turns the mask into ``-100``
labels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.errors import SpecError, missing_extra
from runner.spec.model import LoraSpec
from runner.train.backend import (
    BatchShape,
    ModelSession,
    Precision,
    TokenizedExample,
    TrainOutcome,
)
from runner.train.model_files import load_tokenizer, raise_model_load_error
from runner.train.sft_loop import run_trainer, save_adapter_files, sft_args, trainer_datasets
from runner.train.speedups import speed_callbacks

log = logging.getLogger(__name__)

_EIGHT_BIT_OPTIMIZERS = frozenset({"adamw_8bit", "paged_adamw_8bit"})


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise missing_extra("torch", "train") from e
    return torch


def _dtype(name: str) -> Any:
    return getattr(_torch(), name)


def _device_map() -> dict[str, Any]:
    # One GPU per rank: torchrun's LOCAL_RANK is this process's device (0 without torchrun).
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return {"": local_rank} if _torch().cuda.is_available() else {"": "cpu"}


def quiet_progress_bars() -> None:
    """Turn off tqdm bars of datasets and transformers: logs are structured records."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


DEFAULT_SKIP_MODULES = ("lm_head",)
"""What bitsandbytes leaves unquantized by default; a skip list of our own replaces that default
(transformers' ``get_modules_to_not_convert``), so it is added back."""


def bnb_skip_kwargs(precision: Precision) -> dict[str, Any]:
    """``llm_int8_skip_modules`` for a dynamic 4-bit load (empty otherwise)."""
    if precision.quant_mode != "dynamic-4bit" or not precision.skip_modules:
        return {}
    return {"llm_int8_skip_modules": [*DEFAULT_SKIP_MODULES, *precision.skip_modules]}


def linear_module_names(model: Any) -> set[str]:
    """Last name component of every linear layer (plain or 4-bit) in ``model``."""
    names: set[str] = set()
    for full_name, module in model.named_modules():
        kind = type(module).__name__
        if kind in ("Linear", "Linear4bit", "Linear8bitLt") and "." in full_name:
            names.add(full_name.rsplit(".", 1)[-1])
    return names


class TransformersBackend:
    """:class:`runner.train.backend.TrainerBackend` on transformers + peft + bitsandbytes."""

    name = "transformers"

    def _load_base(self, model_dir: Path, precision: Precision, trust_remote_code: bool) -> Any:
        quiet_progress_bars()
        try:
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        except ImportError as e:
            raise missing_extra("transformers", "train") from e
        kwargs: dict[str, Any] = {
            "device_map": _device_map(),
            "trust_remote_code": trust_remote_code,
            "dtype": _dtype(precision.compute_dtype),
        }
        if precision.is_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=precision.quant_type,
                bnb_4bit_use_double_quant=precision.double_quant,
                bnb_4bit_compute_dtype=_dtype(precision.compute_dtype),
                **bnb_skip_kwargs(precision),
            )
        try:
            return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        except Exception as e:  # the model files are the user's input: see the helper
            raise_model_load_error(model_dir, e)

    def _load_tokenizer(self, model_dir: Path, trust_remote_code: bool) -> Any:
        return load_tokenizer(model_dir, trust_remote_code)

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

        Checkpointing is switched on by the trainer here (``SFTConfig``), so
        ``gradient_checkpointing`` needs nothing at load time.
        """
        quiet_progress_bars()
        try:
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        except ImportError as e:
            raise missing_extra("peft", "train") from e
        torch = _torch()
        quiet_progress_bars()
        notes: list[str] = []
        model = self._load_base(model_dir, precision, trust_remote_code)
        tokenizer = self._load_tokenizer(model_dir, trust_remote_code)
        available = linear_module_names(model)
        missing = [m for m in lora.target_modules if m not in available]
        if missing:
            raise SpecError(
                f"spec.lora.target_modules: {', '.join(missing)} not found in the model; "
                f"it has {', '.join(sorted(available))}"
            )
        if precision.is_4bit:
            # Casts norms to fp32 and enables input grads, which 4-bit training needs; the
            # trainer switches gradient checkpointing on itself.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(seed)
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            use_rslora=lora.use_rslora,
            target_modules=list(lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        trainable, total = model.get_nb_trainable_parameters()
        log.info(
            "LoRA attached: %d trainable of %d parameters (%.2f%%)",
            trainable,
            total,
            100.0 * trainable / max(total, 1),
            extra={"trainable_params": trainable, "total_params": total},
        )
        return ModelSession(model, tokenizer, precision, model_dir, notes)

    def _optimizer(self, wanted: str, notes: list[str]) -> str:
        if wanted in _EIGHT_BIT_OPTIMIZERS and not _torch().cuda.is_available():
            note = f"optimizer {wanted} needs CUDA; using adamw_torch on the CPU"
            log.info(note)
            notes.append(note)
            return "adamw_torch"
        if wanted == "adamw_torch_fused" and not _torch().cuda.is_available():
            return "adamw_torch"
        return wanted

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
        """Train the session's LoRA weights in place with TRL's SFTTrainer."""
        try:
            from datasets import Dataset
            from transformers import PrinterCallback
            from trl import SFTConfig, SFTTrainer
        except ImportError as e:
            raise missing_extra(e.name or "trl", "train") from e
        quiet_progress_bars()
        torch = _torch()
        cuda = bool(torch.cuda.is_available())
        optim = self._optimizer(shape.optimizer, session.notes)
        dtype = session.precision.compute_dtype
        config = SFTConfig(
            **sft_args(
                shape,
                output_dir,
                optim=optim,
                bf16=cuda and dtype == "bfloat16",
                fp16=cuda and dtype == "float16",
            ),
            use_cpu=not cuda,
        )
        trainer_cls = SFTTrainer if cuda else _cpu_trainer_class(SFTTrainer)
        train_ds, eval_ds = trainer_datasets(Dataset, train, eval_data, shape, padding_free=False)
        trainer = trainer_cls(
            model=session.model,
            args=config,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=session.tokenizer,
            callbacks=[*callbacks, *speed_callbacks(shape)],
        )
        # Progress is logged as structured records (runner.train.progress), not printed.
        trainer.remove_callback(PrinterCallback)
        return run_trainer(trainer, eval_data, resume_from, optim)

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
        """Load a fresh base model with the saved adapter on top, in eval mode."""
        try:
            from peft import PeftModel
        except ImportError as e:
            raise missing_extra("peft", "train") from e
        base = self._load_base(model_dir, precision, trust_remote_code)
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
        model.eval()
        tokenizer = self._load_tokenizer(adapter_dir, trust_remote_code)
        return ModelSession(model, tokenizer, precision, model_dir)


def _cpu_trainer_class(sft_trainer: Any) -> Any:
    """SFTTrainer with the model's own cross-entropy loss instead of TRL's fused LM head.

    TRL 1.15 computes the SFT loss with a Triton kernel (``trl.kernels.ChunkedLogProbFunction``),
    which exists only on CUDA/XPU; on the CPU ``compute_loss`` fails. The model's own loss
    (``labels`` with -100 on masked tokens, the same completion mask) is the documented
    ``Trainer`` path and gives the same objective.
    """
    from transformers import Trainer

    class CpuSFTTrainer(sft_trainer):  # type: ignore[misc]
        def compute_loss(
            self,
            model: Any,
            inputs: Any,
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            inputs = {**inputs, "use_cache": False}
            return Trainer.compute_loss(
                self,
                model,
                inputs,
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )

    return CpuSFTTrainer
