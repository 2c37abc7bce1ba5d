"""The one strict check every ``config.json`` passes before a library reads it (plan and run).

Real configs (the bundled shapes and full published documents) must pass; wrongly typed,
negative, misshaped or incomplete ones must fail with one ``file: field: problem`` line per
field. Hypothesis mutates a real config field by field for the bulk of the cases, in process;
``tests/test_hostile_model_inputs.py`` sends a few of the same mutations through ``qlora run``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner import cli
from runner.errors import ExitCode, SpecError
from runner.plan.config_schema import (
    MAX_CONFIG_BYTES,
    check_model_config,
    parse_model_config,
    read_model_config,
)
from runner.plan.model_config import bundled_shapes

LLAMA_31 = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
GEMMA_3 = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_attention_heads": 8,
        "num_hidden_layers": 34,
        "num_key_value_heads": 4,
        "query_pre_attn_scalar": 256,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
        "vocab_size": 262208,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27, "model_type": "siglip"},
}
QWEN_25 = {
    "architectures": ["Qwen2ForCausalLM"],
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
GPT2 = {
    "model_type": "gpt2",
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "vocab_size": 50257,
    "layer_norm_epsilon": 1e-05,
    "n_inner": None,
    "pad_token_id": -1,
}


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(LLAMA_31, id="llama-3.1"),
        pytest.param(GEMMA_3, id="gemma-3-wrapper"),
        pytest.param(QWEN_25, id="qwen-2.5"),
        pytest.param(GPT2, id="gpt2-field-names"),
        *(
            pytest.param(entry["config"], id=f"bundled-{name}")
            for name, entry in bundled_shapes().items()
        ),
    ],
)
def test_real_configs_pass(config: dict[str, Any]) -> None:
    check_model_config(config, "config.json")


def test_the_tiny_models_config_passes(tiny_model_dir: Path) -> None:
    read_model_config(tiny_model_dir / "config.json")


def _with(**changes: Any) -> dict[str, Any]:
    out = dict(LLAMA_31)
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key)
        else:
            out[key] = value
    return out


_DROP = object()

BAD = [
    pytest.param(
        _with(num_hidden_layers="32"),
        'num_hidden_layers: must be an integer, got a string "32"; write it without quotes',
        id="string-layer-count",
    ),
    pytest.param(
        _with(hidden_size=-4096), "hidden_size: must be greater than 0, got -4096", id="negative"
    ),
    pytest.param(_with(hidden_size=0), "hidden_size: must be greater than 0", id="zero"),
    pytest.param(
        _with(hidden_size=4096.0),
        "hidden_size: must be an integer, got a number 4096.0",
        id="float-size",
    ),
    pytest.param(
        _with(hidden_size=40960000),
        "hidden_size: must be less than or equal to 131072",
        id="absurd-size",
    ),
    pytest.param(
        _with(rope_scaling=[8.0]),
        "rope_scaling: must be an object, got a list [8.0]",
        id="list-for-object",
    ),
    pytest.param(
        _with(rope_scaling={"factor": "8"}),
        "rope_scaling.factor: must be a number",
        id="string-factor",
    ),
    pytest.param(
        _with(tie_word_embeddings=1),
        "tie_word_embeddings: must be true or false, got a number 1",
        id="int-for-bool",
    ),
    pytest.param(
        _with(tie_word_embeddings="false"),
        "tie_word_embeddings: must be true or false",
        id="string-for-bool",
    ),
    pytest.param(
        _with(eos_token_id="</s>"),
        "eos_token_id: must be an integer or a list",
        id="token-name-for-id",
    ),
    pytest.param(_with(model_type=_DROP), "model_type: missing", id="no-model-type"),
    pytest.param(_with(model_type=3), "model_type: must be a string", id="int-model-type"),
    pytest.param(_with(vocab_size=_DROP), "vocab_size: missing", id="no-vocab-size"),
    pytest.param(_with(hidden_size=None), "hidden_size: missing", id="null-hidden-size"),
    pytest.param(
        _with(num_key_value_heads=5),
        "num_key_value_heads: 5 does not divide num_attention_heads",
        id="gqa-mismatch",
    ),
    pytest.param(
        {**GEMMA_3, "text_config": [1, 2]},
        "text_config: must be an object, got a list",
        id="list-text-config",
    ),
    pytest.param(
        {**GEMMA_3, "text_config": {**GEMMA_3["text_config"], "num_hidden_layers": "34"}},
        "text_config.num_hidden_layers: must be an integer",
        id="nested-string",
    ),
    pytest.param(
        {**GEMMA_3, "text_config": {"model_type": "gemma3_text"}},
        "text_config.hidden_size: missing",
        id="empty-text-config",
    ),
    pytest.param(_with(auto_map=["x.Y"]), "auto_map: must be an object", id="list-auto-map"),
    pytest.param([LLAMA_31], "must be a JSON object, got a list", id="top-level-list"),
    pytest.param("llama", "must be a JSON object, got a string", id="top-level-string"),
]


@pytest.mark.parametrize(("config", "fragment"), BAD)
def test_bad_configs_name_the_field(config: Any, fragment: str) -> None:
    with pytest.raises(SpecError) as caught:
        check_model_config(config, "m/config.json")
    lines = caught.value.lines()
    assert all(line.startswith("m/config.json: ") for line in lines)
    assert any(fragment in line for line in lines), lines


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        pytest.param(b'{"model_type": "llama",', "not valid JSON", id="truncated"),
        pytest.param(b"\xef\xbb\xbf{}", "not valid JSON", id="bom"),
        pytest.param(b'{"model_type": "ll\xffama"}', r"not UTF-8 text \(byte 18\)", id="bad-byte"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="deep"),
        pytest.param(b'{"hidden_size": ' + b"9" * 5000 + b"}", "not valid JSON", id="huge-int"),
        pytest.param(b" " * (MAX_CONFIG_BYTES + 1), "is not a config.json", id="huge"),
    ],
)
def test_unparseable_bytes_are_spec_errors(raw: bytes, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        parse_model_config(raw, "m/config.json")


def test_plan_refuses_a_bad_local_config_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(_with(num_hidden_layers="32")))
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "apiVersion: qlora-runner.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: t}\n"
        f"spec:\n  model: {{source: {model}}}\n  dataset: {{sources: [d.jsonl]}}\n"
        "  output: {uri: 's3://bucket/x'}\n"
    )
    assert cli.main(["plan", str(spec)]) == ExitCode.INVALID_INPUT
    err = capsys.readouterr().err
    assert "config.json: num_hidden_layers: must be an integer" in err
    assert "Traceback" not in err


# --- hypothesis: one field of a real config made wrong -------------------------------------

_POSITIVE_INTS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
)
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_cache")
_OBJECTS = ("rope_scaling", "quantization_config", "auto_map")
_NOT_AN_INT = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=1 << 28),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=8),
    st.integers(1, 100).map(str),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_NOT_A_BOOL = st.one_of(
    st.integers(), st.sampled_from(["true", "false", "yes", "1"]), st.lists(st.booleans())
)
_NOT_AN_OBJECT = st.one_of(
    st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=3), st.booleans()
)

BAD_MUTATIONS = st.one_of(
    st.tuples(st.sampled_from(_POSITIVE_INTS), _NOT_AN_INT),
    st.tuples(st.sampled_from(_BOOLS), _NOT_A_BOOL),
    st.tuples(st.sampled_from(_OBJECTS), _NOT_AN_OBJECT),
    st.tuples(st.sampled_from(("hidden_size", "num_hidden_layers", "vocab_size")), st.none()),
    st.tuples(st.just("model_type"), st.one_of(st.none(), st.integers(), st.just(""))),
)


def mutated(field: str, value: Any) -> dict[str, Any]:
    """LLAMA_31 with ``field`` set to ``value`` (num_key_value_heads stays a divisor unless it
    is the field made wrong)."""
    return {**LLAMA_31, field: value}


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutation=BAD_MUTATIONS)
def test_every_generated_bad_config_is_a_spec_error_naming_the_field(
    mutation: tuple[str, Any],
) -> None:
    field, value = mutation
    with pytest.raises(SpecError) as caught:
        check_model_config(mutated(field, value), "m/config.json")
    assert caught.value.exit_code is ExitCode.INVALID_INPUT
    assert any(f"m/config.json: {field}" in line for line in caught.value.lines()), (
        caught.value.lines()
    )
