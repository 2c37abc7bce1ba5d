"""A model's ``config.json`` → the tensor shapes the VRAM estimator needs.

The estimator never loads a model: it counts parameters and activations from the config. That
only works for architectures whose layer layout we know, so this module keeps an explicit table
of supported ``model_type`` values and their traits (norms per layer, q/k norms, attention bias,
logit soft-capping). Anything else fails with a :class:`SpecError` naming the model type and the
supported ones: guessing a layout silently would produce a plan nobody should trust.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runner.errors import SpecError


@dataclass(frozen=True)
class _Family:
    """Layout traits shared by the model types of one family."""

    norms_per_layer: int
    qk_norm: bool
    attention_bias: bool
    # Gemma's RMSNorm keeps its whole computation in float32 (saves 8 bytes/elem, not 6).
    fp32_norm: bool = False


# model_type → layout. Every entry is a decoder-only transformer with q/k/v/o attention and a
# gated (gate/up/down) MLP, so the seven LoRA target names exist in each layer.
_FAMILIES: dict[str, _Family] = {
    "llama": _Family(norms_per_layer=2, qk_norm=False, attention_bias=False),
    "mistral": _Family(norms_per_layer=2, qk_norm=False, attention_bias=False),
    "qwen2": _Family(norms_per_layer=2, qk_norm=False, attention_bias=True),
    "qwen3": _Family(norms_per_layer=2, qk_norm=True, attention_bias=False),
    "gemma": _Family(norms_per_layer=2, qk_norm=False, attention_bias=False, fp32_norm=True),
    "gemma2": _Family(norms_per_layer=4, qk_norm=False, attention_bias=False, fp32_norm=True),
    "gemma3_text": _Family(norms_per_layer=4, qk_norm=True, attention_bias=False, fp32_norm=True),
}
# Multimodal wrappers whose language model is in ``text_config``.
_WRAPPERS = {"gemma3": "gemma3_text"}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted({*_FAMILIES, *_WRAPPERS}))

LINEAR_NAMES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only model, as the estimator uses them.

    Attributes:
        model_type: The language model's ``model_type`` (e.g. ``llama``).
        hidden_size: h.
        intermediate_size: f (MLP width).
        num_layers: L.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (GQA).
        head_dim: Per-head width.
        vocab_size: V.
        tie_word_embeddings: lm_head shares the embedding matrix.
        norms_per_layer: RMSNorms per decoder layer.
        qk_norm: Per-head norms on q and k (Qwen3, Gemma 3).
        attention_bias: q/k/v carry biases (Qwen2).
        fp32_norm: The RMSNorm computes entirely in float32.
        final_logit_softcapping: Gemma 2's tanh cap on logits (extra logits-sized tensors).
        attn_logit_softcapping: Gemma 2's cap on attention scores.
        sliding_window: Local attention window, if any.
        vision_params: Parameters of a vision tower kept in 16 bit (multimodal wrappers).
        vision_lora_dims: (d_in, d_out) of vision-tower q/k/v projections, per layer.
        vision_layers: Vision tower depth.
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    norms_per_layer: int = 2
    qk_norm: bool = False
    attention_bias: bool = False
    fp32_norm: bool = False
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    sliding_window: int | None = None
    vision_params: int = 0
    vision_lora_dims: tuple[int, int] = (0, 0)
    vision_layers: int = 0

    @property
    def q_dim(self) -> int:
        """Width of the query projection's output."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection's output."""
        return self.num_kv_heads * self.head_dim

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each of the seven linear modules in one decoder layer."""
        h, f, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, f),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of the seven linears of one layer (what 4-bit quantization stores)."""
        return sum(i * o for i, o in self.linear_dims().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding matrix."""
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Output projection, zero when tied to the embeddings."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def small_params(self) -> int:
        """Norm weights and biases: never quantized, tiny next to the rest."""
        per_layer = self.norms_per_layer * self.hidden_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        if self.attention_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        return self.num_layers * per_layer + self.hidden_size

    @property
    def total_params(self) -> int:
        """Every parameter of the model (language model + vision tower)."""
        return (
            self.num_layers * self.linear_params_per_layer
            + self.embedding_params
            + self.lm_head_params
            + self.small_params
            + self.vision_params
        )

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (block linears + output head)."""
        return self.num_layers * self.linear_params_per_layer + self.vocab_size * self.hidden_size


def _int(cfg: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(
            f"{where}: config field '{key}' must be a positive integer, got {value!r}; "
            "is this a complete config.json?"
        )
    return value


def _opt_float(cfg: Mapping[str, Any], key: str) -> float | None:
    value = cfg.get(key)
    return float(value) if isinstance(value, int | float) and value else None


def shape_from_config(config: Mapping[str, Any], where: str = "config.json") -> ModelShape:
    """Read the sizes the estimator needs from a ``config.json`` mapping.

    Args:
        config: The parsed config.
        where: Where the config came from, for error messages.

    Returns:
        The model's shape.

    Raises:
        SpecError: the architecture is not supported or a field is missing or malformed.
    """
    model_type = config.get("model_type")
    text_cfg: Mapping[str, Any] = config
    vision_params = 0
    vision_dims = (0, 0)
    vision_layers = 0
    if model_type in _WRAPPERS:
        inner = config.get("text_config")
        if not isinstance(inner, Mapping):
            raise SpecError(f"{where}: model_type '{model_type}' needs a 'text_config' mapping")
        text_cfg = {"model_type": _WRAPPERS[str(model_type)], **inner}
        vision = config.get("vision_config")
        if isinstance(vision, Mapping):
            vh = _int(vision, "hidden_size", f"{where}: vision_config")
            vf = _int(vision, "intermediate_size", f"{where}: vision_config")
            vl = _int(vision, "num_hidden_layers", f"{where}: vision_config")
            # ViT block: q, k, v, out (4 h^2) + fc1, fc2 (2 h f); plus a projector to the LM.
            vision_params = vl * (4 * vh * vh + 2 * vh * vf) + vh * int(
                text_cfg.get("hidden_size", 0) or 0
            )
            vision_dims, vision_layers = (vh, vh), vl
        model_type = text_cfg["model_type"]
    family = _FAMILIES.get(str(model_type)) if isinstance(model_type, str) else None
    if family is None:
        raise SpecError(
            f"{where}: model_type {model_type!r} is not supported by the planner; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Fine-tuning it would need its layer layout "
            "added to runner/plan/shapes.py."
        )
    h = _int(text_cfg, "hidden_size", where)
    heads = _int(text_cfg, "num_attention_heads", where)
    head_dim_raw = text_cfg.get("head_dim")
    head_dim = _int(text_cfg, "head_dim", where) if head_dim_raw is not None else h // heads
    tie_default = str(model_type).startswith("gemma")
    tie = config.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", tie_default))
    attention_bias = bool(text_cfg.get("attention_bias", family.attention_bias))
    window = text_cfg.get("sliding_window")
    return ModelShape(
        model_type=str(model_type),
        hidden_size=h,
        intermediate_size=_int(text_cfg, "intermediate_size", where),
        num_layers=_int(text_cfg, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=_int(text_cfg, "num_key_value_heads", where, default=heads),
        head_dim=head_dim,
        vocab_size=_int(text_cfg, "vocab_size", where),
        tie_word_embeddings=bool(tie),
        norms_per_layer=family.norms_per_layer,
        qk_norm=family.qk_norm,
        attention_bias=attention_bias,
        fp32_norm=family.fp32_norm,
        final_logit_softcapping=_opt_float(text_cfg, "final_logit_softcapping"),
        attn_logit_softcapping=_opt_float(text_cfg, "attn_logit_softcapping"),
        sliding_window=window if isinstance(window, int) and window > 0 else None,
        vision_params=vision_params,
        vision_lora_dims=vision_dims,
        vision_layers=vision_layers,
    )


def quantization_skip_modules(config: Mapping[str, Any]) -> tuple[str, ...]:
    """Modules a pre-quantized (e.g. Unsloth dynamic 4-bit) checkpoint keeps in 16 bit.

    Read from ``quantization_config.llm_int8_skip_modules`` (bitsandbytes' name for it).
    """
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping):
        return ()
    skip = qc.get("llm_int8_skip_modules") or ()
    if not isinstance(skip, list | tuple):
        return ()
    return tuple(str(s) for s in skip)
