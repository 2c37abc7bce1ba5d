"""A tiny Llama-shaped model built from a config, for CPU tests and the embedded demo.

No hub, no download: the weights are random (seeded), the tokenizer is a byte-level one built
with ``tokenizers`` (256 byte tokens plus a few special tokens) and carries a small chat
template. The model has the same module names as Llama (``q_proj`` … ``down_proj``), so LoRA
on all seven projections, 4-bit loading and adapter reloading exercise the real code paths.

Usage: ``python -m runner.train.tiny DIR`` (idempotent: an existing model is left alone).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runner.errors import missing_extra

SPECIAL_TOKENS: tuple[str, ...] = (
    "<s>",
    "</s>",
    "<pad>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)

# Each turn is "<|role|>content<|end|>"; the assistant's <|end|> is part of its completion so the
# model learns to stop. add_generation_prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TINY_CONFIG: dict[str, int | float | bool] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "initializer_range": 0.2,
}


def build_tokenizer(out_dir: Path) -> int:
    """Write a byte-level fast tokenizer with the chat template to ``out_dir``.

    Returns:
        The vocabulary size.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise missing_extra(e.name or "transformers", "train") from e

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    # Like Llama: plain text gets a BOS token; chat text brings its own through the template.
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token=None,
        model_max_length=int(TINY_CONFIG["max_position_embeddings"]),
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(fast)


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Create the tiny model (config, safetensors weights, tokenizer) in ``out_dir``.

    Args:
        out_dir: Target directory; created if missing.
        seed: Seed of the random weight initialisation (same seed, same weights).

    Returns:
        ``out_dir``.
    """
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise missing_extra(e.name or "torch", "train") from e

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(out_dir)
    special = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=special["<s>"],
        eos_token_id=special["<|end|>"],
        pad_token_id=special["<pad>"],
        **TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").write_text(
        "Tiny random Llama-shaped model built by `python -m runner.train.tiny` for tests and the "
        "CPU demo. It knows nothing until trained.\n",
        encoding="utf-8",
    )
    return out_dir


def is_built(out_dir: Path) -> bool:
    """Whether ``out_dir`` already holds a complete tiny model."""
    return all(
        (out_dir / name).is_file()
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: build the tiny model into DIR unless it is already there."""
    parser = argparse.ArgumentParser(prog="python -m runner.train.tiny", description=__doc__)
    parser.add_argument("dir", type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    if is_built(args.dir) and not args.force:
        print(f"{args.dir}: tiny model already present")
        return 0
    build_tiny_model(args.dir, seed=args.seed)
    cfg = json.loads((args.dir / "config.json").read_text(encoding="utf-8"))
    print(f"{args.dir}: tiny Llama model built (vocab {cfg['vocab_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
