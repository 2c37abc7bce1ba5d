"""The planner sizes a GGUF model from its header: written here with the ``gguf`` package."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.errors import SpecError
from runner.plan.gguf_header import gguf_config, is_gguf_source

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

# SmolLM2-135M's sizes, as its GGUF header gives them.
SIZES = {"layers": 30, "hidden": 576, "ffn": 1536, "heads": 9, "kv": 3, "vocab": 49152}


def write_gguf(path: Path, *, tied: bool = True, arch: str = "llama") -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(SIZES["layers"])
    w.add_embedding_length(SIZES["hidden"])
    w.add_feed_forward_length(SIZES["ffn"])
    w.add_head_count(SIZES["heads"])
    w.add_head_count_kv(SIZES["kv"])
    w.add_context_length(8192)
    w.add_token_list([f"t{i}" for i in range(SIZES["vocab"])])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_gives_the_config_the_planner_reads(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    with path.open("rb") as f:
        config = gguf_config(f, str(path))
    assert config == {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    }


def test_untied_head_is_seen_from_the_tensor_list(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", tied=False)
    with path.open("rb") as f:
        assert gguf_config(f, str(path))["tie_word_embeddings"] is False


def test_plan_of_a_gguf_source_counts_its_parameters(tmp_path: Path) -> None:
    from runner.plan import make_plan
    from runner.settings import Settings
    from runner.spec import JobSpec

    path = write_gguf(tmp_path / "SmolLM2.gguf")
    spec = JobSpec.model_validate(
        {
            "apiVersion": "qlora-runner.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "g"},
            "spec": {
                "model": {"source": str(path)},
                "dataset": {"sources": ["d.jsonl"]},
                "output": {"uri": "file://out"},
                "training": {"max_seq_length": 512},
            },
        }
    )
    plan = make_plan(spec, Settings())
    assert plan.model_config_origin == f"GGUF header of {path}"
    # 30 x (4 attention + 3 MLP projections) + tied embedding = 134.5 M parameters
    assert "0.13 B params" in plan.reasons[0] or "134.5" in plan.reasons[0], plan.reasons[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"GGML" + b"\0" * 20, "not a GGUF file"),
        (b"GGUF\x03\0\0\0" + b"\0" * 4, "truncated"),
        (b"GGUF\x09\0\0\0" + b"\0" * 16, "version 9"),
    ],
    ids=["magic", "truncated", "version"],
)
def test_bad_files_are_path_message_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with path.open("rb") as f, pytest.raises(SpecError, match=message):
        gguf_config(f, str(path))


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", arch="rwkv6")
    with path.open("rb") as f, pytest.raises(SpecError, match="architecture 'rwkv6'"):
        gguf_config(f, str(path))


def test_gguf_sources_are_recognised_by_suffix() -> None:
    assert is_gguf_source("s3://models/smol/SmolLM2.Q4_1.gguf")
    assert not is_gguf_source("s3://models/smol")
