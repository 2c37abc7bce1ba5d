"""The trainer arguments both backends build from one batch shape (no GPU needed).

The Unsloth backend cannot run here, but what it hands TRL can be checked: its checkpointing is
Unsloth's own (set up in ``get_peft_model``), so the trainer must never switch on a second one.
That second one cost the Llama-3.2-1B shape about 14 % of its throughput on an H200
(``bench/speed/run2-1b-ab``). The rows reach TRL with a completion mask only when the loss is
completion-only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.train.backend import BatchShape, TokenizedExample
from runner.train.sft_loop import sft_args, to_dataset
from runner.train.unsloth_backend import unsloth_sft_args

pytestmark = pytest.mark.timeout(60)


def _shape(**kw: object) -> BatchShape:
    return BatchShape(micro_batch_size=4, gradient_accumulation_steps=2, max_seq_length=128, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_unsloth_never_turns_on_the_trainers_checkpointing(
    tmp_path: Path, checkpointing: bool
) -> None:
    from trl import SFTConfig

    shape = _shape(gradient_checkpointing=checkpointing)
    args = unsloth_sft_args(shape, tmp_path, "float32")
    config = SFTConfig(**args)
    assert config.gradient_checkpointing is False
    assert config.per_device_train_batch_size == 4
    assert config.gradient_accumulation_steps == 2
    assert config.max_length == 128
    assert config.dataset_num_proc is None
    # The transformers backend leaves checkpointing to the trainer, as the spec says.
    shared = sft_args(shape, tmp_path, optim="adamw_torch", bf16=False, fp16=False)
    assert shared["gradient_checkpointing"] is checkpointing


def test_unsloth_args_follow_the_compute_dtype(tmp_path: Path) -> None:
    args = unsloth_sft_args(_shape(), tmp_path, "bfloat16")
    assert (args["bf16"], args["fp16"]) == (True, False)
    args = unsloth_sft_args(_shape(), tmp_path, "float16")
    assert (args["bf16"], args["fp16"]) == (False, True)


def test_completion_mask_goes_along_only_for_completion_only_loss() -> None:
    from datasets import Dataset

    rows = [
        TokenizedExample(input_ids=(1, 2, 3, 4), completion_mask=(0, 0, 1, 1)),
        TokenizedExample(input_ids=(5, 6), completion_mask=(0, 1)),
    ]
    masked = to_dataset(Dataset, rows, completion_only_loss=True)
    assert masked.column_names == ["input_ids", "completion_mask"]
    assert masked[0]["completion_mask"] == [0, 0, 1, 1]
    plain = to_dataset(Dataset, rows, completion_only_loss=False)
    assert plain.column_names == ["input_ids"]
    assert plain[1]["input_ids"] == [5, 6]
