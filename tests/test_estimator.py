"""VRAM estimator: published parameter arithmetic, term behaviour, architectures, failures.

Pure unit tests (milliseconds). The comparison with measured peaks lives in
``tests/test_estimator_bench.py``; here each test pins down one term against a number that can
be computed by hand or is published (QLoRA paper constants, performance-anchors.md §2.2-2.3).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from runner.errors import ExitCode, SpecError
from runner.plan import (
    DEFAULT_CALIBRATION,
    TrainingShape,
    bundled_config,
    estimate,
    shape_from_config,
)
from runner.plan.estimator import (
    NF4_BYTES_PER_PARAM,
    NF4_DQ_BYTES_PER_PARAM,
    layer_activation_bytes_per_token,
    lora_params,
)
from runner.plan.shapes import SUPPORTED_MODEL_TYPES, ModelShape

GB = 1e9


def _shape(name: str) -> ModelShape:
    found = bundled_config(name)
    assert found is not None, name
    return shape_from_config(found.config)


def _t(**kw: Any) -> TrainingShape:
    base: dict[str, Any] = {
        "quant_mode": "4bit",
        "backend": "unsloth",
        "micro_batch_size": 1,
        "seq_len": 2048,
        "lora_r": 16,
    }
    base.update(kw)
    return TrainingShape(**base)


def _term(shape: ModelShape, t: TrainingShape, name: str) -> int:
    terms = {x.name: x.bytes for x in estimate(shape, t).terms}
    return terms.get(name, 0)


def test_nf4_constants_match_the_qlora_paper() -> None:
    # 4 bits + 32/64 bits of fp32 absmax; double quant: 8/64 + 32/(64*256) bits.
    assert pytest.approx(4.5 / 8) == NF4_BYTES_PER_PARAM
    assert pytest.approx(4 + 0.127, abs=1e-3) == NF4_DQ_BYTES_PER_PARAM * 8


@pytest.mark.parametrize(
    ("model", "double_quant", "gb"),
    [
        ("llama-3.1-8b", True, 3.60),
        ("llama-3.1-8b", False, 3.93),
        ("llama-3.1-70b", True, 35.31),
        ("llama-3.1-70b", False, 38.50),
    ],
    ids=["8b-dq", "8b-nodq", "70b-dq", "70b-nodq"],
)
def test_4bit_weights(model: str, double_quant: bool, gb: float) -> None:
    got = _term(_shape(model), _t(double_quant=double_quant), "weights_4bit")
    assert got / GB == pytest.approx(gb, abs=0.01)


@pytest.mark.parametrize(
    ("model", "backend", "gb"),
    [
        ("llama-3.1-8b", "unsloth", 2.10),  # embeddings + lm_head + norms in bf16
        ("llama-3.1-8b", "transformers", 4.21),  # peft's upcast to fp32 doubles it
        ("llama-3.2-1b", "unsloth", 0.53),  # tied: one 128k x 2048 matrix
        ("llama-3.1-70b", "unsloth", 4.21),
    ],
    ids=["8b-unsloth", "8b-hf-upcast", "1b-tied", "70b"],
)
def test_unquantized_weights(model: str, backend: str, gb: float) -> None:
    got = _term(_shape(model), _t(backend=backend), "weights_unquantized")
    assert got / GB == pytest.approx(gb, abs=0.01)


@pytest.mark.parametrize(
    ("model", "r", "millions"),
    [
        ("llama-3.1-8b", 16, 41.9),
        ("llama-3.1-8b", 32, 83.9),
        ("llama-3.1-70b", 16, 207.1),
        ("qwen2.5-14b", 16, 68.8),
        ("qwen2.5-32b", 16, 134.2),
    ],
    ids=["8b-r16", "8b-r32", "70b-r16", "qwen14b", "qwen32b"],
)
def test_lora_parameter_count(model: str, r: int, millions: float) -> None:
    assert lora_params(_shape(model), _t(lora_r=r)) / 1e6 == pytest.approx(millions, abs=0.1)


@pytest.mark.parametrize(
    ("optimizer", "bytes_per_param"),
    [("adamw_8bit", 2), ("paged_adamw_8bit", 2), ("adamw_torch", 8), ("adamw_torch_fused", 8)],
    ids=lambda v: str(v),
)
def test_optimizer_state(optimizer: str, bytes_per_param: int) -> None:
    shape = _shape("llama-3.1-8b")
    t = _t(optimizer=optimizer)
    assert _term(shape, t, "optimizer_state") == bytes_per_param * lora_params(shape, t)
    assert _term(shape, t, "lora_grads") == 4 * lora_params(shape, t)


def test_16bit_mode_stores_every_parameter_in_bf16() -> None:
    shape = _shape("llama-3.1-8b")
    t = _t(quant_mode="16bit")
    assert _term(shape, t, "weights_16bit") == 2 * shape.total_params
    assert _term(shape, t, "weights_4bit") == 0
    assert shape.total_params / 1e9 == pytest.approx(8.03, abs=0.01)


def test_dynamic_4bit_keeps_skipped_modules_in_16bit() -> None:
    shape = _shape("llama-3.1-8b")
    skip = ("model.layers.0.mlp.down_proj", "layers.1.self_attn.o_proj", "lm_head")
    plain = estimate(shape, _t())
    dyn = estimate(shape, _t(quant_mode="dynamic-4bit", skip_modules=skip))
    moved = 14336 * 4096 + 4096 * 4096
    w4 = {x.name: x.bytes for x in dyn.terms}
    w4_plain = {x.name: x.bytes for x in plain.terms}
    assert w4_plain["weights_4bit"] - w4["weights_4bit"] == pytest.approx(
        moved * NF4_DQ_BYTES_PER_PARAM, abs=2
    )
    assert w4["weights_unquantized"] - w4_plain["weights_unquantized"] == 2 * moved
    assert "dynamic_4bit_allowance" not in w4


def test_dynamic_4bit_without_a_skip_list_adds_the_published_allowance() -> None:
    shape = _shape("llama-3.1-8b")
    terms = {x.name: x.bytes for x in estimate(shape, _t(quant_mode="dynamic-4bit")).terms}
    assert terms["dynamic_4bit_allowance"] == pytest.approx(0.10 * terms["weights_4bit"], abs=1)


def test_terms_add_up_and_context_is_separate() -> None:
    e = estimate(_shape("llama-3.1-8b"), _t())
    assert sum(x.bytes for x in e.terms) == e.total_bytes
    assert e.reserved_bytes == e.total_bytes - e.context_bytes > 0


@pytest.mark.parametrize(
    ("bigger", "smaller"),
    [
        (_t(backend="transformers"), _t()),
        (_t(gradient_checkpointing=False), _t()),
        (_t(backend="transformers", gradient_checkpointing=False), _t(backend="transformers")),
        (_t(quant_mode="16bit"), _t()),
        (_t(optimizer="adamw_torch"), _t()),
        (_t(lora_r=64), _t()),
        (_t(double_quant=False), _t()),
        (_t(compute_dtype="float32"), _t()),
        (_t(backend="transformers", seq_len=4096), _t(backend="transformers")),
        (_t(backend="transformers", micro_batch_size=2), _t(backend="transformers")),
        (_t(micro_batch_size=2, seq_len=512), _t(seq_len=512)),
    ],
    ids=[
        "hf>unsloth",
        "no-gc>gc",
        "hf-no-gc>hf-gc",
        "16bit>4bit",
        "adamw32>adamw8",
        "r64>r16",
        "no-dq>dq",
        "fp32>bf16",
        "hf-seq",
        "hf-batch",
        "unsloth-batch",
    ],
)
def test_more_demanding_settings_need_more_memory(
    bigger: TrainingShape, smaller: TrainingShape
) -> None:
    shape = _shape("llama-3.1-8b")
    assert estimate(shape, bigger).total_bytes > estimate(shape, smaller).total_bytes


def test_unsloth_offloads_checkpoints_to_host_ram() -> None:
    shape = _shape("llama-3.1-8b")
    unsloth = estimate(shape, _t(micro_batch_size=4))
    hf = estimate(shape, _t(micro_batch_size=4, backend="transformers"))
    offload = shape.num_layers * 4 * 2048 * shape.hidden_size * 2
    assert unsloth.host_bytes - hf.host_bytes == pytest.approx(2 * offload, abs=1)
    # HF keeps every layer's input on the GPU instead: bf16, or fp32 after peft's upcast of
    # the embeddings (the residual stream follows the embedding dtype).
    hf = _t(micro_batch_size=4, backend="transformers", hf_upcast_fp32=False)
    hf_ckpt = _term(shape, hf, "checkpoints")
    assert hf_ckpt == (shape.num_layers + 1) * 4 * 2048 * shape.hidden_size * 2
    upcast = _term(shape, dataclasses.replace(hf, hf_upcast_fp32=True), "checkpoints")
    assert upcast == 2 * hf_ckpt


def test_hf_logits_scale_with_vocab_and_tokens() -> None:
    shape = _shape("llama-3.1-8b")
    t = _t(backend="transformers", micro_batch_size=2)
    per_logit = DEFAULT_CALIBRATION.hf_logits_bytes
    assert _term(shape, t, "logits_loss") == int(2 * 2048 * 128256 * per_logit)
    # Gemma 2 soft-caps its logits: more logits-sized tensors.
    gemma = _shape("gemma-2-2b")
    capped = _term(gemma, t, "logits_loss")
    per_logit += DEFAULT_CALIBRATION.softcap_logits_bytes
    assert capped == int(2 * 2048 * gemma.vocab_size * per_logit)


def test_unsloth_loss_is_a_fixed_workspace() -> None:
    # Measured: Unsloth's fused loss never materialises the logits, so its memory does not
    # grow with tokens x vocab; it sits in the backend's fixed workspace.
    shape = _shape("llama-3.1-8b")
    for mb in (1, 8):
        assert _term(shape, _t(micro_batch_size=mb), "logits_loss") == 0
        assert _term(shape, _t(micro_batch_size=mb), "workspaces") == (
            DEFAULT_CALIBRATION.unsloth.fixed_bytes
        )


def test_layer_activation_count_matches_the_hand_count() -> None:
    # Llama 3.1 8B, bf16: norms 2 x 6h, two shared inputs 4h, q+k+v 2(q+2kv), attention
    # output and its copy 4q, MLP 8f, LoRA A outputs 7 x 2r.
    h, f, q, kv = 4096, 14336, 4096, 1024
    want = 12 * h + 4 * h + 2 * (q + 2 * kv) + 4 * q + 8 * f + 7 * 2 * 16
    got = layer_activation_bytes_per_token(_shape("llama-3.1-8b"), _t())
    assert got == want


def test_unknown_target_module_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as info:
        estimate(_shape("llama-3.1-8b"), _t(target_modules=("q_proj", "c_attn")))
    assert info.value.exit_code == ExitCode.INVALID_INPUT
    assert "spec.lora.target_modules: 'c_attn'" in info.value.message
    assert "q_proj" in info.value.message


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"quant_mode": "8bit"}, "spec.quantization.mode"),
        ({"backend": "deepspeed"}, "spec.training.backend"),
    ],
    ids=["mode", "backend"],
)
def test_invalid_choices_are_named(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        estimate(_shape("llama-3.2-1b"), dataclasses.replace(_t(), **bad))


# --- architectures --------------------------------------------------------------------------


def test_every_bundled_shape_is_supported_and_estimable() -> None:
    from runner.plan.model_config import bundled_shapes

    for name, entry in bundled_shapes().items():
        shape = shape_from_config(entry["config"], name)
        e = estimate(shape, _t())
        assert e.total_bytes > 0, name


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("llama-3.2-1b", 1.24),
        ("llama-3.2-3b", 3.21),
        ("llama-3.1-8b", 8.03),
        ("llama-3.1-70b", 70.55),
        ("mistral-7b-v0.3", 7.25),
        ("qwen2.5-7b", 7.62),
        ("qwen3-8b", 8.19),
        ("gemma-2-9b", 9.24),
    ],
    ids=lambda v: str(v),
)
def test_parameter_counts_match_published_sizes(name: str, billions: float) -> None:
    assert _shape(name).total_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_gemma3_wrapper_reads_text_config_and_keeps_the_vision_tower() -> None:
    shape = _shape("gemma-3-4b")
    assert shape.model_type == "gemma3_text"
    assert shape.norms_per_layer == 4 and shape.qk_norm
    assert 0.35e9 < shape.vision_params < 0.5e9
    assert 4.0e9 < shape.total_params < 4.5e9


def test_qwen2_has_attention_bias_and_qwen3_has_qk_norm() -> None:
    assert _shape("qwen2.5-7b").attention_bias
    assert _shape("qwen3-8b").qk_norm and not _shape("qwen3-8b").attention_bias


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "mamba", "hidden_size": 768},
        {"model_type": "mixtral", "hidden_size": 4096},
        {"hidden_size": 4096},
        {"model_type": "gemma3"},
    ],
    ids=["mamba", "moe", "no-type", "wrapper-without-text-config"],
)
def test_unsupported_architectures_fail_clearly(config: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as info:
        shape_from_config(config, "models/x/config.json")
    msg = info.value.message
    assert msg.startswith("models/x/config.json: ")
    if "model_type" in config and config["model_type"] != "gemma3":
        assert repr(config["model_type"]) in msg
        assert all(t in msg for t in SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", None), ("num_hidden_layers", 0), ("vocab_size", "big"), ("head_dim", True)],
    ids=["missing", "zero", "string", "bool"],
)
def test_malformed_config_fields_are_named(field: str, value: Any) -> None:
    found = bundled_config("llama-3.2-1b")
    assert found is not None
    cfg = dict(found.config)
    if value is None:
        cfg.pop(field)
    else:
        cfg[field] = value
    with pytest.raises(SpecError, match=f"config field '{field}'"):
        shape_from_config(cfg)


@pytest.mark.parametrize(
    ("name", "entry", "skipped"),
    [
        ("layers.3.mlp.down_proj", "model.layers.3.mlp.down_proj", True),
        ("layers.3.mlp.down_proj", "language_model.model.layers.3.mlp.down_proj", True),
        ("layers.3.mlp.down_proj", "model.language_model.layers.3.mlp.down_proj", True),
        ("layers.3.mlp.down_proj", "layers.3", True),
        ("layers.3.mlp.down_proj", "down_proj", True),
        ("layers.13.mlp.down_proj", "model.layers.3.mlp.down_proj", False),
        ("layers.3.mlp.up_proj", "model.layers.3.mlp.down_proj", False),
        ("layers.3.self_attn.o_proj", "lm_head", False),
        ("layers.3.self_attn.o_proj", "vision_tower", False),
    ],
    ids=lambda v: str(v),
)
def test_dynamic_quant_skip_entries_match_module_names(
    name: str, entry: str, skipped: bool
) -> None:
    from runner.plan.estimator import _is_skipped

    assert _is_skipped(name, (entry,)) is skipped
