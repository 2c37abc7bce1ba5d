"""Randomly initialised Llama checkpoints of real shapes, for measuring memory and speed offline.

The GPU host has no route to a model hub, and neither memory nor throughput depends on the
values of the weights, so the benchmarks build checkpoints of the published Llama 3.x shapes
with random weights, save them to local disk and load them from there in 4 bit, exactly as a
real checkpoint would be loaded. A small word-level tokenizer with Llama 3's special tokens and
chat template goes with each checkpoint (tokenizer size does not change the model's shapes).

Usage: ``python3 bench/random_models.py DIR SHAPE [SHAPE...]`` (shapes: see ``SHAPES``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

_LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]

# Llama 3's own template, shortened to what training needs (no tools, no date header).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def _llama3(
    hidden: int, inter: int, layers: int, heads: int, tie: bool, factor: float, kv: int = 8
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden // heads,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
    }


# Published config.json values of the Llama 3.x models (hidden, intermediate, layers, heads, tie).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": _llama3(2048, 8192, 16, 32, True, 32.0),
    "llama-3.2-3b": _llama3(3072, 8192, 28, 24, True, 32.0),
    "llama-3.1-8b": _llama3(4096, 14336, 32, 32, False, 8.0),
    "llama-3.3-70b": _llama3(8192, 28672, 80, 64, False, 8.0),
    "llama-3.3-70b-2l": _llama3(8192, 28672, 2, 64, False, 8.0),
    "llama-3.3-70b-4l": _llama3(8192, 28672, 4, 64, False, 8.0),
    # Published config.json sizes of one Qwen and one Gemma model (the rest: transformers'
    # defaults for the model type, as in the published configs).
    "qwen3-1.7b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
        "sliding_window": 512,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    # Gemma 3 4B's language model (text_config of the multimodal checkpoint, loaded text-only).
    "gemma-3-4b": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "vocab_size": 262208,
        "max_position_embeddings": 131072,
        "sliding_window": 1024,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    # Tiny shapes for checking the scripts' logic on a CPU.
    "tiny": _llama3(64, 128, 2, 4, False, 8.0, kv=2) | {"vocab_size": 512},
}
SHAPES["tiny-qwen3"] = SHAPES["qwen3-1.7b"] | {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
}
SHAPES["tiny-gemma3"] = SHAPES["gemma-3-1b"] | {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 512, "sliding_window": 16,
}


def save_tokenizer(directory: Path, vocab_words: int = 256) -> None:
    """Write a word-level fast tokenizer with Llama 3's special tokens and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0} | {f"w{i}": i + 1 for i in range(vocab_words)}
    vocab |= {t: len(vocab) + i for i, t in enumerate(_LLAMA3_SPECIAL)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token="<unk>",
        model_max_length=131072,
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(str(directory))


def build(shape: str, directory: Path, device: str = "cuda") -> dict[str, Any]:
    """Save a randomly initialised checkpoint of ``shape`` (bf16 safetensors) plus a tokenizer.

    Returns:
        The config dict that was used.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = dict(SHAPES[shape])
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        return config
    fields = {k: v for k, v in config.items() if k not in ("torch_dtype", "model_type")}
    torch.manual_seed(0)
    if config["model_type"] == "llama":
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**fields)).to(torch.bfloat16)
    else:  # Qwen / Gemma: the model type's own config class and defaults
        cfg = AutoConfig.for_model(config["model_type"], **fields)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(str(directory), max_shard_size="4GB")
    del model
    save_tokenizer(directory)
    # Keep the published dtype field so loaders pick bf16.
    cfg_path = directory / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["torch_dtype"] = "bfloat16"
    cfg_path.write_text(json.dumps(saved, indent=2))
    if device == "cuda":
        torch.cuda.empty_cache()
    return config


def main(argv: list[str]) -> int:
    import torch

    root = Path(argv[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = argv[1:]
    if shapes and shapes[0].startswith("--device="):
        device = shapes.pop(0).split("=", 1)[1]
    for shape in shapes:
        t0 = time.time()
        build(shape, root / shape, device)
        (root / shape / "READY").write_text("ok")
        print(f"built {shape} in {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
