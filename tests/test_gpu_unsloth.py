"""``qlora run`` on a CUDA GPU through the Unsloth backend, end to end (GPU host only).

A small random Llama-shaped model (real head size 64, so Unsloth's kernels take their normal
path) learns the bundled antonym chat data with completion-only loss; the run must publish an
adapter whose manifest says it was trained by Unsloth, passed both verifications and lists
files whose sha256 match what is in the store. A second run loads a pre-quantized bitsandbytes
4-bit checkpoint (the layout of ``*-unsloth-bnb-4bit`` directories) as it is; a third runs
dynamic 4-bit on the 16-bit checkpoint, the kept modules passed to Unsloth's loader as
bitsandbytes' skip list.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data" / "antonyms-chat.jsonl"

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.timeout(900)]


def _build_small_llama(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from runner.train.tiny import SPECIAL_TOKENS, build_tokenizer

    vocab = build_tokenizer(out)
    special = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=special["<s>"],
        eos_token_id=special["<|end|>"],
        pad_token_id=special["<pad>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(out))
    return out


def _prequantize(src: Path, out: Path) -> Path:
    """Save ``src`` as a bitsandbytes nf4 checkpoint with a skip list, like Unsloth's quants.

    Done in a child process so this test process never initialises CUDA itself.
    """
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig\n"
        "q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',\n"
        "    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,\n"
        "    llm_int8_skip_modules=['lm_head', 'down_proj'])\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q,\n"
        "    dtype=torch.bfloat16, device_map={'': 0})\n"
        "m.save_pretrained(sys.argv[2])\n"
        "AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(src), str(out)], check=True, timeout=300)
    return out


def _spec(tmp: Path, model: Path, name: str, mode: str, quant: str = "") -> Path:
    spec = f"""
apiVersion: qlora-runner.io/v1alpha1
kind: FineTuneJob
metadata:
  name: {name}
spec:
  model:
    source: {model}
  dataset:
    sources: [{DATA}]
    format: messages
    train_on: completions
  lora:
    r: 16
    alpha: 32
  quantization:
    mode: {mode}
    compute_dtype: bfloat16{quant}
  training:
    backend: unsloth
    max_steps: 30
    learning_rate: 0.005
    warmup_ratio: 0.0
    micro_batch_size: 8
    gradient_accumulation_steps: 1
    max_seq_length: 64
    optimizer: adamw_8bit
    logging_steps: 5
  output:
    uri: file://{tmp / "store" / name}
  metrics:
    enabled: false
"""
    path = tmp / f"{name}.yaml"
    path.write_text(spec, encoding="utf-8")
    return path


def _qlora_run(spec: Path, tmp: Path) -> dict[str, Any]:
    env = os.environ | {
        "QLORA_WORK_DIR": str(tmp / "work"),
        "QLORA_LOG_FORMAT": "text",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "run", "--spec", str(spec)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary


def _manifest(store: Path) -> tuple[Path, dict[str, Any]]:
    latest = json.loads((store / "latest.json").read_text(encoding="utf-8"))
    run_dir = store / "runs" / latest["run_id"]
    return run_dir, json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))


def _check_published(store: Path) -> dict[str, Any]:
    run_dir, manifest = _manifest(store)
    meta = manifest.get("metadata", manifest)
    training = meta["training"]
    assert training["backend"] == "unsloth"
    assert training["steps"] == 30
    assert training["last_loss"] < training["first_loss"]
    assert meta["verification"]["weight_update"]["changed_tensors"] > 0
    assert meta["verification"]["reload"]["max_abs_logit_diff"] > 1e-2
    names = set()
    for entry in manifest["files"]:
        data = (run_dir / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
        names.add(entry["path"])
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    config = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    return dict(meta)


def test_qlora_run_trains_through_unsloth_and_publishes(tmp_path: Path) -> None:
    model = _build_small_llama(tmp_path / "small-llama")
    summary = _qlora_run(_spec(tmp_path, model, "gpu-unsloth", "4bit"), tmp_path)
    assert summary["steps"] == 30
    meta = _check_published(tmp_path / "store" / "gpu-unsloth")
    assert meta["libraries"]["unsloth"]


def test_prequantized_checkpoint_loads_as_is(tmp_path: Path) -> None:
    model = _build_small_llama(tmp_path / "small-llama")
    quantized = _prequantize(model, tmp_path / "small-llama-bnb-4bit")
    assert "quantization_config" in json.loads((quantized / "config.json").read_text())
    _qlora_run(_spec(tmp_path, quantized, "gpu-prequant", "dynamic-4bit"), tmp_path)
    meta = _check_published(tmp_path / "store" / "gpu-prequant")
    assert any("pre-quantized" in note for note in meta["training"]["notes"])
    dyn = meta["training"]["dynamic_4bit"]
    assert dyn["prequantized"] is True and "down_proj" in dyn["skip_modules"]
    assert dyn["loaded_16bit"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


def test_dynamic_4bit_through_unsloth_keeps_the_ranked_modules(tmp_path: Path) -> None:
    """A 16-bit checkpoint with dynamic-4bit: the runner measures the 14 linear modules' nf4
    output error, keeps the most sensitive within 0.5 MiB, and Unsloth's loader (given a
    BitsAndBytesConfig with that skip list) holds exactly those in 16 bit."""
    from runner.plan.dynamic_quant import ModuleScore, select

    model = _build_small_llama(tmp_path / "small-llama")
    extra = "\n    dynamic_budget_mib: 0.5\n    calibration_rows: 4"
    _qlora_run(_spec(tmp_path, model, "gpu-dyn4", "dynamic-4bit", extra), tmp_path)
    meta = _check_published(tmp_path / "store" / "gpu-dyn4")
    dyn = meta["training"]["dynamic_4bit"]
    assert dyn["prequantized"] is False and dyn["budget_bytes"] == 2**19
    ranking = [ModuleScore(**m) for m in dyn["ranking"]]
    assert len(ranking) == 14
    kept = [m["name"] for m in dyn["kept"]]
    assert kept == [m.name for m in select(ranking, dyn["budget_bytes"]).kept]
    assert 0 < len(kept) < 14
    assert dyn["loaded_16bit"] == sorted(kept)
    assert meta["training"]["precision"]["skip_modules"] == kept
