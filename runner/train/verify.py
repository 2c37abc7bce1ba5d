"""Proof that training changed the adapter, and that the saved adapter is the trained one.

A LoRA run can "succeed" and produce a useless adapter: the optimizer never stepped, a
callback or a library bug restored the weights, a module was frozen, the loss went NaN. Two
checks catch that before anything is published:

1. **Weight update** (:func:`check_weight_update`): every LoRA tensor is hashed (sha256 of its
   raw bytes) and compared before and after training. Each targeted module (e.g.
   ``layers.3.self_attn.q_proj``) fails if none of its LoRA tensors changed, if its ``lora_B``
   is still all zeros (LoRA initialises B to zero, so the adapter would add nothing), or if any
   tensor holds NaN or Inf.
2. **Reload** (:func:`check_reloaded`): the saved adapter is loaded onto a freshly loaded base
   model. Its tensors must hash-equal the saved file's, and on a fixed batch of training
   tokens the logits must be finite and differ from the base model's (the same model with the
   adapter disabled). Statistic: the largest absolute logit difference over all real tokens
   and the vocabulary, in float32; it must exceed :data:`MIN_LOGIT_DIFF` = 1e-2, five times the
   ~2e-3 reload noise of 4-bit models on the CPU (test-tooling notes, bitsandbytes 0.50.2).
   No ``allclose``: the statistic and the threshold are reported in the manifest.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import VerificationError, missing_extra
from runner.train.backend import ModelSession, TokenizedExample

MIN_LOGIT_DIFF = 1e-2
"""Smallest max |logits(adapter) - logits(base)| accepted as 'the adapter changes the model'."""
VERIFY_BATCH_ROWS = 4
VERIFY_MAX_TOKENS = 128


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise missing_extra("torch", "train") from e
    return torch


def tensor_sha256(tensor: Any) -> str:
    """sha256 of a tensor's raw bytes (row-major, its own dtype)."""
    torch = _torch()
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class LoraTensor:
    """One LoRA tensor at one point in time: its hash and a CPU copy."""

    sha256: str
    value: Any


def snapshot_lora(model: Any) -> dict[str, LoraTensor]:
    """Hash and copy every LoRA parameter of ``model`` (names as in ``named_parameters``)."""
    out = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            out[name] = LoraTensor(tensor_sha256(param), param.detach().to("cpu").clone())
    return out


def make_snapshot_callback() -> Any:
    """A ``TrainerCallback`` that snapshots the LoRA tensors as the trainer is built.

    The "before" state must be taken inside the trainer, not before building it: TRL's
    SFTTrainer casts the LoRA weights of a quantized model to bfloat16 in its constructor, so a
    snapshot taken earlier differs from the trained start point even if no step ever ran. It
    is taken at ``on_init_end`` (after that cast, before a resumed run loads its checkpoint),
    else at ``on_train_begin``. Register it first; read ``.before`` after training (None if
    the trainer never started).
    """
    try:
        from transformers import TrainerCallback
    except ImportError as e:
        raise missing_extra("transformers", "train") from e

    class LoraSnapshotCallback(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.before: dict[str, LoraTensor] | None = None

        def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # After TRL's cast, before train(resume_from_checkpoint=...) loads a checkpoint:
            # a resumed run is checked against the LoRA initialisation, not the checkpoint.
            self.before = snapshot_lora(kwargs["model"])

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.before is None:
                self.before = snapshot_lora(kwargs["model"])

    return LoraSnapshotCallback()


def _module_of(name: str) -> str:
    # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight -> ...q_proj
    return name.split(".lora_", 1)[0]


def check_weight_update(
    before: Mapping[str, LoraTensor] | None,
    after: Mapping[str, LoraTensor],
    target_modules: Sequence[str],
) -> dict[str, Any]:
    """Compare LoRA tensors before and after training.

    Args:
        before: Snapshot as training began (None: training never began).
        after: Snapshot after training.
        target_modules: ``lora.target_modules``; each must carry adapters.

    Returns:
        The manifest's ``weight_update`` block (per-tensor hashes and abs-diffs).

    Raises:
        VerificationError: with one ``module: problem`` line per failing module (exit 4).
    """
    if not before:
        raise VerificationError(
            "weight-update check failed: no LoRA tensors were seen when training began; "
            "nothing was published"
        )
    torch = _torch()
    problems: list[str] = []
    tensors: list[dict[str, Any]] = []
    changed_by_module: dict[str, bool] = {}
    for name in sorted(before):
        if name not in after:
            problems.append(f"{name}: missing after training")
            continue
        b, a = before[name], after[name]
        diff = (a.value.float() - b.value.float()).abs()
        finite = bool(torch.isfinite(a.value.float()).all())
        changed = a.sha256 != b.sha256
        module = _module_of(name)
        changed_by_module[module] = changed_by_module.get(module, False) or changed
        if not finite:
            problems.append(f"{module}: {name.rsplit('.', 3)[-3]} holds NaN or Inf")
        if ".lora_B" in name and finite and float(a.value.float().abs().max()) == 0.0:
            problems.append(f"{module}: lora_B is all zeros, the adapter adds nothing")
        tensors.append(
            {
                "name": name,
                "sha256_before": b.sha256,
                "sha256_after": a.sha256,
                "max_abs_diff": float(diff.max()) if finite else None,
                "mean_abs_diff": float(diff.mean()) if finite else None,
                "finite": finite,
            }
        )
    problems += [
        f"{m}: adapter unchanged by training" for m, ch in changed_by_module.items() if not ch
    ]
    present = {m.rsplit(".", 1)[-1] for m in changed_by_module}
    problems += [
        f"{t}: targeted but has no LoRA adapter" for t in target_modules if t not in present
    ]
    if problems:
        failed = {p.split(": ", 1)[0] for p in problems}
        raise VerificationError(
            f"weight-update check failed for {len(failed)} adapter module(s); nothing was "
            "published",
            details=sorted(set(problems))[:20],
        )
    return {
        "check": "sha256 and abs-diff of every LoRA tensor before vs after training",
        "modules": len(changed_by_module),
        "tensors": len(tensors),
        "changed_tensors": sum(t["sha256_before"] != t["sha256_after"] for t in tensors),
        "min_max_abs_diff": min((t["max_abs_diff"] for t in tensors), default=0.0),
        "per_tensor": tensors,
    }


def _verify_batch(examples: Sequence[TokenizedExample], pad_id: int) -> tuple[Any, Any]:
    torch = _torch()
    rows = [list(e.input_ids[:VERIFY_MAX_TOKENS]) for e in examples[:VERIFY_BATCH_ROWS]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    return ids, mask


def check_reloaded(
    session: ModelSession, adapter_dir: Path, examples: Sequence[TokenizedExample]
) -> dict[str, Any]:
    """Check a reloaded adapter against the saved file and against the base model.

    Args:
        session: From ``TrainerBackend.load_for_verification`` (fresh base + saved adapter).
        adapter_dir: Directory holding ``adapter_model.safetensors``.
        examples: Training examples; the first few form the fixed batch.

    Returns:
        The manifest's ``reload`` block.

    Raises:
        VerificationError: hashes differ, logits are non-finite, or the adapter does not
            change the logits beyond :data:`MIN_LOGIT_DIFF` (exit code 4).
    """
    torch = _torch()
    try:
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file
    except ImportError as e:
        raise missing_extra(e.name or "peft", "train") from e
    saved_path = adapter_dir / "adapter_model.safetensors"
    saved = load_file(str(saved_path))
    loaded = get_peft_model_state_dict(session.model)
    problems = [f"{k}: in the saved file but not reloaded" for k in saved if k not in loaded]
    for key, tensor in saved.items():
        if key in loaded and tensor_sha256(loaded[key].to(tensor.dtype)) != tensor_sha256(tensor):
            problems.append(f"{key}: reloaded tensor differs from {saved_path.name}")
    if problems:
        raise VerificationError(
            f"{adapter_dir}: the reloaded adapter does not match the saved one", problems[:20]
        )
    pad = session.tokenizer.pad_token_id
    ids, mask = _verify_batch(examples, int(pad if pad is not None else 0))
    device = next(session.model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        adapted = session.model(input_ids=ids, attention_mask=mask).logits.float()
        with session.model.disable_adapter():
            base = session.model(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    if not bool(torch.isfinite(adapted[real]).all()):
        raise VerificationError(f"{adapter_dir}: logits with the adapter are NaN or Inf")
    if not bool(torch.isfinite(base[real]).all()):
        raise VerificationError(f"{adapter_dir}: the base model's logits are NaN or Inf")
    diff = (adapted[real] - base[real]).abs()
    max_diff, mean_diff = float(diff.max()), float(diff.mean())
    report = {
        "check": "saved adapter reloaded onto a fresh base model; logits on a fixed batch",
        "tensors": len(saved),
        "tensors_hash_equal": True,
        "batch_rows": int(ids.shape[0]),
        "batch_tokens": int(mask.sum()),
        "logits_finite": True,
        "statistic": "max |logits(base+adapter) - logits(base)| over real tokens and vocab",
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": mean_diff,
        "threshold": MIN_LOGIT_DIFF,
    }
    if not (math.isfinite(max_diff) and max_diff > MIN_LOGIT_DIFF):
        raise VerificationError(
            f"{adapter_dir}: the reloaded adapter changes the logits by at most {max_diff:.3g}, "
            f"not more than {MIN_LOGIT_DIFF:g}; the adapter has no effect"
        )
    return report
