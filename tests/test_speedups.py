"""The runner's speed-ups: kernel-cache volume, varlen hook, partial checkpointing (real model)."""

from __future__ import annotations

import types
from typing import Any

import pytest

from runner.k8s.manifests import COMPILE_CACHE_DIR, render_objects
from runner.settings import Settings
from runner.spec import load_spec_text
from runner.train.speedups import compile_cache_env, enable_varlen_attention, limit_checkpointing
from tests.test_manifests_render import SPEC, make_plan


def _pod(settings: Settings) -> dict[str, Any]:
    job = render_objects(load_spec_text(SPEC), make_plan(), settings)[-1]
    return dict(job["spec"]["template"]["spec"])


def test_compile_cache_claim_is_mounted_and_caches_point_at_it() -> None:
    pod = _pod(Settings(compile_cache_claim="kernel-cache"))
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["compile-cache"]["persistentVolumeClaim"] == {"claimName": "kernel-cache"}
    container = pod["containers"][0]
    assert {"name": "compile-cache", "mountPath": COMPILE_CACHE_DIR} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TRITON_CACHE_DIR"].startswith(COMPILE_CACHE_DIR)
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(COMPILE_CACHE_DIR)
    assert env["QLORA_COMPILE_CACHE_DIR"] == COMPILE_CACHE_DIR


def test_no_claim_keeps_the_emptydir() -> None:
    pod = _pod(Settings())
    assert "compile-cache" not in {v["name"] for v in pod["volumes"]}
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert "QLORA_COMPILE_CACHE_DIR" not in env


def test_compile_cache_env_keeps_what_is_set() -> None:
    got = compile_cache_env({"QLORA_COMPILE_CACHE_DIR": "/c", "TRITON_CACHE_DIR": "/t"})
    assert "TRITON_CACHE_DIR" not in got
    assert got["TORCHINDUCTOR_CACHE_DIR"] == "/c/inductor"
    assert got["UNSLOTH_COMPILE_LOCATION"] == "/c/unsloth_compiled_cache"
    assert compile_cache_env({}) == {}


def test_varlen_hook_leaves_a_native_kernel_and_foreign_modules_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    native = types.SimpleNamespace(_TORCH_VARLEN_ATTN=object())
    assert enable_varlen_attention(native) == "native"
    bare = types.SimpleNamespace(_TORCH_VARLEN_ATTN=None)
    assert enable_varlen_attention(bare).startswith("not patched")
    monkeypatch.setenv("QLORA_VARLEN_ATTENTION", "0")
    assert "QLORA_VARLEN_ATTENTION=0" in enable_varlen_attention(bare)


def test_partial_checkpointing_recomputes_only_the_first_layers() -> None:
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = [0] * 4
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    assert limit_checkpointing(model, 1) == 3
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [2, 1, 1, 1]  # layer 0 recomputed in backward, the others kept


def test_allocator_env_sets_expandable_segments_unless_configured() -> None:
    from runner.train.speedups import EXPANDABLE, allocator_env

    assert allocator_env({}, "2.11.0+cu130") == {"PYTORCH_ALLOC_CONF": EXPANDABLE}
    assert allocator_env({"PYTORCH_ALLOC_CONF": ""}, "2.11.0") == {"PYTORCH_ALLOC_CONF": EXPANDABLE}
    assert allocator_env({}, "2.5.1") == {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE}
    assert allocator_env({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "2.11.0") == {}
    assert allocator_env({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, "2.11.0") == {}
    assert allocator_env({"QLORA_EXPANDABLE_SEGMENTS": "0"}, "2.11.0") == {}
    assert allocator_env({}, None) == {}
