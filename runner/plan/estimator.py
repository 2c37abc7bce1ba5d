"""Peak GPU memory of one QLoRA / LoRA training process, term by term, from shapes alone.

Why a first-principles model and not a table: the plan has to hold for any sequence length,
micro batch, rank and model the user writes, and it has to explain itself. Each term below is
a count of the tensors that are alive at the training step's peak, multiplied by their bytes;
the few constants that counting cannot give (CUDA context, allocator slack, a correction per
activation term) live in :class:`Calibration`, fitted to the measurements described in
``runner/plan/VRAM.md`` (card, library versions and method are recorded there).

The peak of a step is: everything persistent (weights, LoRA state, checkpoints), plus the
larger of two phases that are not live at the same time: the loss (logits) and the backward
pass through one decoder layer. The estimate is of ``torch.cuda.max_memory_reserved()`` plus the
CUDA context, i.e. what ``nvidia-smi`` would show at the peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.errors import SpecError
from runner.plan.shapes import LINEAR_NAMES, ModelShape
from runner.plan.types import MIB, VramTerm

GIB = 1024**3

QUANT_MODES = ("4bit", "dynamic-4bit", "16bit")
BACKENDS = ("unsloth", "transformers")
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")
# bitsandbytes keeps 32-bit optimizer state for tensors smaller than this (min_8bit_size).
_BNB_MIN_8BIT_SIZE = 4096

# NF4 storage per parameter (QLoRA paper §3): 4 bits of data, plus one absmax per block of 64.
# Without double quant the absmax is fp32 (32/64 bit/param); with it an 8-bit absmax plus one
# fp32 second-level constant per 256 blocks (8/64 + 32/(64*256) bit/param).
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64
NF4_DQ_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class BackendFit:
    """How one backend's step memory departs from the hand count; fitted per backend.

    Attributes:
        activation_factor: Multiplies the hand-counted per-layer activations to give the
            working set of the layer being recomputed and back-propagated (fused kernels save
            less than the count, backward gradients add more).
        dequant_copies: bf16 copies of the largest 4-bit weight alive at once (bitsandbytes
            dequantizes a weight for each matmul, forward and backward).
        slack_fraction: Caching-allocator slack on the checkpoints and the working set.
        fixed_bytes: Workspaces independent of the batch (cuBLAS, the fused loss, kernels).
    """

    activation_factor: float
    dequant_copies: float
    slack_fraction: float
    fixed_bytes: int


@dataclass(frozen=True)
class Calibration:
    """Constants that counting tensors cannot give; fitted to measurements (see VRAM.md).

    Attributes:
        unsloth: Fit for Unsloth (offloaded checkpointing, fused kernels and loss).
        transformers: Fit for transformers + peft + bitsandbytes with checkpointing.
        hf_logits_bytes: Bytes per (token x vocab entry) of the plain HF loss phase. The
            measured grid never had the loss set the peak; this is the largest value that
            agrees with it (Llama-3.2-1B at 65,536 tokens).
        softcap_logits_bytes: Extra bytes per logit element under final-logit soft-capping.
        cuda_context_bytes: CUDA context, kernel images and library handles: outside
            PyTorch's allocator, so not part of ``max_memory_reserved``. Bounded by the H200
            speed runs (see VRAM.md).
        unsloth_gpu_checkpoints: Layer inputs Unsloth keeps on the GPU while the rest are
            offloaded to host RAM (the current one and the one being prefetched).
        uncheckpointed_factor: transformers backend: multiplies the hand count of a layer's
            saved activations for layers left out of partial checkpointing (not measured:
            1.0, the hand count).
        no_checkpoint_factor: The same for every layer when checkpointing is off (not
            measured: 1.0).
        unsloth_kept_factor: Unsloth backend: multiplies :func:`unsloth_kept_bytes_per_token`
            (what Unsloth's fused layers keep, counted) for every layer that is not
            checkpointed (partial or no checkpointing). 1.0, the count as it is: 6-10 % above
            what the H200 runs on realistic rows kept (``bench/speed/run6-data``: 8B with 28
            of 32 layers kept, 1B with 14 of 16, both T = 12,949; VRAM.md).
        dynamic_4bit_allowance: Extra weight bytes of a dynamic 4-bit model when its config
            does not list the skipped modules (Unsloth: "<10 % more VRAM than BnB 4bit").
        unsloth_loss_vocab_share: Share of Unsloth's fixed workspace that is its fused loss,
            which goes through the logits in chunks of a fixed token count, so it grows with
            the vocabulary: the share scales by ``vocab / unsloth_loss_ref_vocab``. 0.75, from
            run8's Gemma-3-1B points (vocab 262,144: its batch-independent part was 0.3 GiB
            above Llama's); Llama's 128,256 is unchanged, Qwen3's 151,936 adds 0.07 GiB.
        unsloth_loss_ref_vocab: The vocabulary :attr:`BackendFit.fixed_bytes` was measured at.
        unsloth_long_sequence_reserve_bytes: Unsloth with a sliding-window model (Gemma 3)
            past its window: reserved memory per (row x seq^2) on top of the 1 B sliding mask.
            Not allocated memory: at equal tokens the allocated peaks are equal
            (bench/speed/run9-data: 2048x8, 8192x2, 16384x1 all 2.81 GiB at Gemma-3-1B) but
            the reserved ones grow with the sequence (3.13, 3.49, 3.53 GiB): the caching
            allocator holds longer sequences' blocks. 2.0, from run8's 8192 x 2 point (-9 %
            without it); run9 checks it on other shapes.
        host_base_bytes: Host RAM of the training process without offload (Python, CUDA
            libraries, tokenizer, dataset, one checkpoint shard while loading).
        host_offload_factor: Host RAM per byte of Unsloth's offloaded activations. PyTorch's
            pinned-memory caching allocator keeps freed buffers, so a job whose batches vary in
            length holds every size it has seen: measured RSS grew by exactly the offload for
            each new, larger size and never shrank; with sizes rounded to powers of two the
            total stays below twice the largest.
        provenance: Where the numbers were measured.
    """

    unsloth: BackendFit = BackendFit(
        activation_factor=1.07, dequant_copies=2.06, slack_fraction=0.0, fixed_bytes=404 * MIB
    )
    transformers: BackendFit = BackendFit(
        activation_factor=1.19, dequant_copies=1.24, slack_fraction=0.21, fixed_bytes=0
    )
    hf_logits_bytes: float = 1.0
    softcap_logits_bytes: float = 6.0
    cuda_context_bytes: int = 1024 * MIB
    unsloth_gpu_checkpoints: int = 2
    dynamic_4bit_allowance: float = 0.10
    uncheckpointed_factor: float = 1.0
    no_checkpoint_factor: float = 1.0
    unsloth_kept_factor: float = 1.0
    unsloth_loss_vocab_share: float = 0.75
    unsloth_long_sequence_reserve_bytes: float = 2.0
    unsloth_loss_ref_vocab: int = 128_256
    host_base_bytes: int = 8 * GIB
    host_offload_factor: float = 2.0
    provenance: str = (
        "bench/vram/results.jsonl: 1x NVIDIA H200, torch 2.11.0, CUDA 13.0, transformers "
        "5.17.0, peft 0.21.0, bitsandbytes 0.50.2, trl 1.15.0, unsloth 2026.10.9"
    )

    def fit(self, backend: str) -> BackendFit:
        """The constants of ``backend``."""
        return self.unsloth if backend == "unsloth" else self.transformers


DEFAULT_CALIBRATION = Calibration()


@dataclass(frozen=True)
class TrainingShape:
    """The training choices that change memory.

    Attributes:
        quant_mode: '4bit', 'dynamic-4bit' or '16bit'.
        backend: 'unsloth' or 'transformers'.
        micro_batch_size: Sequences per forward pass.
        seq_len: Tokens per sequence (the planner uses the maximum: worst case).
        lora_r: LoRA rank.
        target_modules: Linear modules with adapters.
        double_quant: NF4 constants quantized too.
        gradient_checkpointing: Recompute layer activations in backward.
        optimizer: Optimizer name from the spec.
        compute_dtype: 'bfloat16', 'float16', 'float32' or 'auto' (= bfloat16 on GPUs).
        skip_modules: Modules a dynamic 4-bit checkpoint keeps in 16 bit.
        hf_upcast_fp32: The transformers backend runs peft's ``prepare_model_for_kbit_training``
            on 4-bit models (qlora run does), which casts every non-4-bit parameter to fp32.
        padded: Batches carry padding, so the transformers backend builds a 4-D attention
            mask (real data; the benchmark's fixed-length rows have none).
        tokens_per_micro_batch: Padding-free training: the tokens of the largest micro batch
            (from the data's lengths, :mod:`runner.plan.lengths`); None sizes it as
            ``micro_batch_size x seq_len`` (every row at the maximum).
        checkpointed_layers: With checkpointing on, how many decoder layers (the first ones)
            are checkpointed; the others keep their activations for backward (partial
            checkpointing: :func:`partial_checkpointing_layers`). None means all.
        dynamic_reserve_bytes: Dynamic 4-bit on a 16-bit checkpoint whose kept modules the
            runner has not chosen yet: the bytes reserved for them (the planner's budget,
            term ``dynamic_4bit_kept``). None with no skip list: Unsloth's published allowance.
        dynamic_cap_bytes: ``quantization.dynamic_budget_mib`` in bytes: the allowance is never
            more than it.
    """

    quant_mode: str
    backend: str
    micro_batch_size: int
    seq_len: int
    lora_r: int
    target_modules: tuple[str, ...] = LINEAR_NAMES
    double_quant: bool = True
    gradient_checkpointing: bool = True
    optimizer: str = "adamw_8bit"
    compute_dtype: str = "bfloat16"
    skip_modules: tuple[str, ...] = field(default_factory=tuple)
    hf_upcast_fp32: bool = True
    padded: bool = True
    tokens_per_micro_batch: int | None = None
    checkpointed_layers: int | None = None
    dynamic_reserve_bytes: int | None = None
    dynamic_cap_bytes: int | None = None

    @property
    def tokens(self) -> int:
        """Tokens in the largest micro batch."""
        if self.tokens_per_micro_batch is not None:
            return self.tokens_per_micro_batch
        return self.micro_batch_size * self.seq_len


@dataclass(frozen=True)
class Estimate:
    """The estimator's answer.

    Attributes:
        terms: One line per term; they add up to ``total_bytes``.
        total_bytes: Estimated peak GPU memory (reserved + CUDA context).
        context_bytes: The CUDA context part of the total (outside PyTorch's allocator).
        host_bytes: Host RAM the training process needs (offloaded activations included).
    """

    terms: tuple[VramTerm, ...]
    total_bytes: int
    context_bytes: int
    host_bytes: int

    @property
    def reserved_bytes(self) -> int:
        """The part comparable with ``torch.cuda.max_memory_reserved()``."""
        return self.total_bytes - self.context_bytes


def _is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    """Whether module ``name`` (``layers.3.mlp.down_proj``) matches a bitsandbytes skip entry."""
    canon = "." + name
    for entry in skip:
        e = entry
        for prefix in (
            "model.language_model.",
            "language_model.model.",
            "model.",
            "language_model.",
        ):
            e = e.removeprefix(prefix)
        if canon.endswith("." + e) or ("." + e + ".") in canon + ".":
            return True
    return False


def _upcast(t: TrainingShape) -> bool:
    """peft's fp32 upcast applies: transformers backend, 4-bit base."""
    return t.backend == "transformers" and t.hf_upcast_fp32 and t.quant_mode != "16bit"


def _act_bytes(t: TrainingShape) -> int:
    """Bytes per activation element.

    With peft's upcast the embeddings are fp32, so the residual stream and every tensor that
    bitsandbytes casts back to its input dtype are fp32 too; counting all activations at 4 B
    over-states the autocast bf16 parts (attention, MLP internals), on the safe side: that
    path is not in the measured grid.
    """
    return 4 if t.compute_dtype == "float32" or _upcast(t) else 2


def layer_activation_bytes_per_token(shape: ModelShape, t: TrainingShape) -> float:
    """Bytes one decoder layer saves for backward, per token (the hand count in VRAM.md)."""
    a = _act_bytes(t)
    h, f, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    # RMSNorm saves its fp32 input and the normalised tensor (fp32 for Gemma, else compute dtype).
    # Unsloth compiles Gemma's blocks (torch.compile): the fused norm keeps its input in the
    # compute dtype and one fp32 per row, and recomputes the fp32 upcast in backward.
    compiled = t.backend == "unsloth" and shape.fp32_norm
    norm = a * h + 4 if compiled else (8 if shape.fp32_norm else 4 + a) * h
    total = shape.norms_per_layer * norm
    total += 2 * a * h  # input of q/k/v (shared) and of gate/up (shared)
    total += a * (q + 2 * kv)  # q, k, v after RoPE, saved by the attention kernel
    if shape.qk_norm:
        if t.backend == "unsloth":
            # Unsloth norms q and k with its fused RMS kernel (Qwen3) or a compiled one (Gemma
            # 3): input kept in the compute dtype, one fp32 per row (run7's Qwen3-1.7B points).
            total += a * (q + kv)
        else:
            total += (8 if shape.fp32_norm else 4 + a) * (q + kv)
    total += 2 * a * q  # attention output, and its contiguous copy into o_proj
    total += 4 * a * f  # gate out, up out, act(gate), act(gate)*up (input of down_proj)
    total += a * t.lora_r * len(t.target_modules)  # LoRA A outputs
    return float(total)


def unsloth_kept_bytes_per_token(shape: ModelShape, t: TrainingShape) -> float:
    """Bytes one *uncheckpointed* decoder layer keeps for backward under Unsloth, per token.

    Unsloth's fused autograd functions save far less than the generic hand count
    (:func:`layer_activation_bytes_per_token`, which is right for the transformers path and
    sizes the working set of a recomputed layer): ``Fast_RMS_Layernorm`` keeps its input and
    one fp32 reciprocal per row (not an fp32 copy plus the normalised tensor); ``LoRA_QKV``
    and ``LoRA_MLP`` keep their input ``X`` and recompute ``X @ A`` in backward; ``LoRA_MLP``
    keeps the gate and up outputs and recomputes ``act(gate) * up``; RoPE works in place, so
    q, k, v are kept once, by the flash kernel; the attention output is kept once, as the
    input of ``o_proj``. bench/speed/run6-data measured 101 KiB/token/layer at 8B against this
    count's 108 (-6 %), 52 against 58 at 1B (-10 %): :attr:`Calibration.unsloth_kept_factor`.
    """
    a = _act_bytes(t)
    h, f, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    total = shape.norms_per_layer * (a * h + 4)  # each norm's input + fp32 1/rms per row
    total += 2 * a * h  # the pre-norms' outputs: the inputs of LoRA_QKV and LoRA_MLP
    total += a * (q + 2 * kv)  # q, k, v after RoPE, saved by the attention kernel
    if shape.qk_norm:
        total += a * (q + kv)  # q_norm / k_norm inputs
    total += a * q  # attention output = o_proj's input
    total += 2 * a * f  # gate and up outputs
    return float(total)


def _kept_per_token(shape: ModelShape, t: TrainingShape, cal: Calibration, counted: float) -> float:
    """Bytes an uncheckpointed layer keeps per token (backend-specific, see above).

    Gemma (fp32 norms) keeps the generic count under Unsloth too: Unsloth compiles Gemma 3's
    blocks from transformers' code instead of using its fused Llama-style layers, and no
    Gemma point was measured."""
    if t.backend == "unsloth" and not shape.fp32_norm:
        return unsloth_kept_bytes_per_token(shape, t) * cal.unsloth_kept_factor
    return counted * (
        cal.uncheckpointed_factor if t.gradient_checkpointing else cal.no_checkpoint_factor
    )


def _checkpointed(shape: ModelShape, t: TrainingShape) -> int:
    """Decoder layers checkpointed (all when ``checkpointed_layers`` is None)."""
    if t.checkpointed_layers is None:
        return shape.num_layers
    return max(0, min(shape.num_layers, t.checkpointed_layers))


def _uncheckpointed_excess(
    shape: ModelShape,
    t: TrainingShape,
    cal: Calibration,
    counted: float,
    working: int,
    loss: int,
) -> VramTerm:
    """Partial checkpointing: what the last, uncheckpointed layers add at the step's peak.

    The last ``L - k`` layers keep their saved activations through the loss and their own
    backward; the checkpointed first ``k`` layers are recomputed only after those are freed.
    So the peak is the larger of (kept activations + one layer's backward transients, or the
    loss) and the checkpointed phase (one layer recomputed); this term is the excess of the
    first over the second, so the terms still add up.
    """
    n = shape.num_layers - _checkpointed(shape, t)
    tokens = t.tokens
    per = _kept_per_token(shape, t, cal, counted)
    kept = int(n * tokens * per)
    transient = int(tokens * _backward_transient_per_token(shape, t))
    excess = max(0, kept + max(transient, loss) - max(working, loss))
    return VramTerm(
        "uncheckpointed_activations",
        excess,
        f"last {n} layers not checkpointed: {n} x {per / 1024:.0f} KiB/token x "
        f"{tokens} tokens ({t.backend} keeps, partial checkpointing), beyond the recompute "
        "phase",
    )


def partial_checkpointing_layers(
    shape: ModelShape, t: TrainingShape, budget_bytes: int, cal: Calibration | None = None
) -> int:
    """The fewest checkpointed layers whose estimate fits ``budget_bytes`` (total, context
    included): 0 means checkpointing can be off, ``num_layers`` that all are needed."""
    from dataclasses import replace

    c = cal or DEFAULT_CALIBRATION
    off = replace(t, gradient_checkpointing=False, checkpointed_layers=None)
    if estimate(shape, off, c).total_bytes <= budget_bytes:
        return 0
    lo, hi = 1, shape.num_layers
    on = replace(t, gradient_checkpointing=True)
    while lo < hi:
        mid = (lo + hi) // 2
        if estimate(shape, replace(on, checkpointed_layers=mid), c).total_bytes <= budget_bytes:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _backward_transient_per_token(shape: ModelShape, t: TrainingShape) -> float:
    """Gradient tensors alive while one layer's MLP runs backward."""
    a = _act_bytes(t)
    return float(a * (3 * shape.intermediate_size + 2 * shape.hidden_size))


def lora_params(shape: ModelShape, t: TrainingShape) -> int:
    """Number of LoRA parameters (A and B of every targeted module).

    Raises:
        SpecError: a target module is not a linear layer of this architecture.
    """
    dims = shape.linear_dims()
    unknown = [m for m in t.target_modules if m not in dims]
    if unknown:
        raise SpecError(
            f"spec.lora.target_modules: {', '.join(repr(m) for m in unknown)} not a linear "
            f"module of {shape.model_type}; choose from {', '.join(LINEAR_NAMES)}"
        )
    per_layer = sum(dims[m][0] + dims[m][1] for m in t.target_modules)
    total = t.lora_r * shape.num_layers * per_layer
    # PEFT matches target names in a multimodal model's vision tower too (q/k/v there).
    vision_targets = [m for m in t.target_modules if m in ("q_proj", "k_proj", "v_proj")]
    total += t.lora_r * shape.vision_layers * len(vision_targets) * sum(shape.vision_lora_dims)
    return total


def kept_module_extra_bytes(params: int, t: TrainingShape) -> int:
    """Extra GPU bytes of keeping one linear module of ``params`` weights in 16 bit instead of
    nf4: its 16-bit bytes (4 B a weight where peft's upcast makes it fp32) minus its nf4 bytes.
    The same count as :func:`estimate`'s weight terms, so a chosen skip list is what it costs."""
    width = 4 if _upcast(t) or t.compute_dtype == "float32" else 2
    per = NF4_DQ_BYTES_PER_PARAM if t.double_quant else NF4_BYTES_PER_PARAM
    return width * params - int(params * per)


def _weights(shape: ModelShape, t: TrainingShape, cal: Calibration) -> tuple[list[VramTerm], int]:
    """Weight terms and the largest quantized matrix (dequantized on the fly in bf16)."""
    terms: list[VramTerm] = []
    dims = shape.linear_dims()
    rest = shape.embedding_params + shape.lm_head_params + shape.small_params + shape.vision_params
    if t.quant_mode == "16bit":
        n = shape.num_layers * shape.linear_params_per_layer + rest
        terms.append(VramTerm("weights_16bit", 2 * n, f"{n / 1e9:.2f} B params in bf16"))
        return terms, 0
    quantized = skipped = 0
    largest = 0
    for i in range(shape.num_layers):
        for name, (d_in, d_out) in dims.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            if t.skip_modules and _is_skipped(f"layers.{i}.{part}.{name}", t.skip_modules):
                skipped += d_in * d_out
            else:
                quantized += d_in * d_out
                largest = max(largest, d_in * d_out)
    per = NF4_DQ_BYTES_PER_PARAM if t.double_quant else NF4_BYTES_PER_PARAM
    q_bytes = int(quantized * per)
    terms.append(
        VramTerm(
            "weights_4bit",
            q_bytes,
            f"{quantized / 1e9:.2f} B linear params x {per:.4f} B "
            f"(nf4{' + double quant' if t.double_quant else ''}, block 64)",
        )
    )
    upcast = _upcast(t)
    width = 4 if upcast or t.compute_dtype == "float32" else 2
    n16 = rest + skipped
    what = "embeddings" + ("" if shape.tie_word_embeddings else ", lm_head") + ", norms"
    if shape.vision_params:
        what += ", vision tower"
    if skipped:
        what += f", {skipped / 1e9:.2f} B skipped by the dynamic quant"
    dtype = "fp32 (peft prepare_model_for_kbit_training upcast)" if upcast else "bf16"
    terms.append(
        VramTerm("weights_unquantized", width * n16, f"{n16 / 1e9:.2f} B ({what}) in {dtype}")
    )
    dynamic = t.quant_mode == "dynamic-4bit" and not t.skip_modules
    if dynamic and t.dynamic_reserve_bytes is not None:
        terms.append(
            VramTerm(
                "dynamic_4bit_kept",
                t.dynamic_reserve_bytes,
                "budget for the linear modules the runner keeps in 16 bit (chosen from their "
                "measured nf4 sensitivity before training)",
            )
        )
    elif dynamic:
        extra = int(q_bytes * cal.dynamic_4bit_allowance)
        if t.dynamic_cap_bytes is not None:
            extra = min(extra, t.dynamic_cap_bytes)
        terms.append(
            VramTerm(
                "dynamic_4bit_allowance",
                extra,
                f"+{cal.dynamic_4bit_allowance:.0%} of 4-bit weights: the config lists no "
                "skipped modules",
            )
        )
    if upcast:
        # Autocast casts the fp32 lm_head to bf16 each forward and keeps that copy for backward.
        n_head = shape.vocab_size * shape.hidden_size
        terms.append(VramTerm("lm_head_autocast_copy", 2 * n_head, "bf16 copy of the fp32 lm_head"))
    return terms, largest


def _lora(shape: ModelShape, t: TrainingShape) -> list[VramTerm]:
    p = lora_params(shape, t)
    eight_bit = (
        t.optimizer in EIGHT_BIT_OPTIMIZERS
        and t.lora_r * min(shape.hidden_size, shape.intermediate_size) >= _BNB_MIN_8BIT_SIZE
    )
    opt_per = 2 if eight_bit else 8
    opt_note = "8-bit AdamW: 2 x 1 B" if eight_bit else "AdamW: 2 x fp32"
    return [
        VramTerm("lora_params", 4 * p, f"{p / 1e6:.1f} M params (r {t.lora_r}) in fp32"),
        VramTerm("lora_grads", 4 * p, "fp32 gradients, kept across accumulation steps"),
        VramTerm("optimizer_state", opt_per * p, f"{opt_note} per LoRA param"),
    ]


def estimate(
    shape: ModelShape, t: TrainingShape, cal: Calibration = DEFAULT_CALIBRATION
) -> Estimate:
    """Estimate peak GPU memory of training ``shape`` with ``t``, term by term.

    Args:
        shape: Model sizes.
        t: Training choices.
        cal: Fitted constants.

    Returns:
        The breakdown, total, CUDA-context part and host-RAM need.

    Raises:
        SpecError: an invalid mode, backend or target module.
    """
    if t.quant_mode not in QUANT_MODES:
        raise SpecError(f"spec.quantization.mode: '{t.quant_mode}' must be one of {QUANT_MODES}")
    if t.backend not in BACKENDS:
        raise SpecError(f"spec.training.backend: '{t.backend}' must be one of {BACKENDS}")
    a = _act_bytes(t)
    tokens = t.tokens
    b, s, h = t.micro_batch_size, t.seq_len, shape.hidden_size
    terms, largest = _weights(shape, t, cal)
    terms += _lora(shape, t)

    fit = cal.fit(t.backend)
    counted = layer_activation_bytes_per_token(shape, t)
    host_offload = 0
    if not t.gradient_checkpointing:
        # Every layer keeps its saved activations (Unsloth: its own, smaller count, fitted
        # on partial checkpointing); the backward transients of one layer come on top.
        per_layer = _kept_per_token(shape, t, cal, counted)
        kept = int(shape.num_layers * tokens * per_layer + tokens * a * h)
        terms.append(
            VramTerm(
                "activations",
                kept,
                f"all {shape.num_layers} layers kept: "
                f"{per_layer / 1024:.0f} KiB/token/layer x {tokens} tokens",
            )
        )
        working = int(tokens * _backward_transient_per_token(shape, t))
        working_note = "backward gradients of one layer"
    else:
        n_ckpt = _checkpointed(shape, t)
        if t.backend == "unsloth":
            n_gpu = min(cal.unsloth_gpu_checkpoints, n_ckpt)
            kept = n_gpu * tokens * a * h
            host_offload = n_ckpt * tokens * a * h
            note = (
                f"{n_gpu} layer inputs on GPU; {n_ckpt} offloaded to host RAM "
                f"({host_offload / GIB:.2f} GiB)"
            )
        else:
            kept = (n_ckpt + 1) * tokens * a * h
            note = f"{n_ckpt} layer inputs + embeddings, {a * h} B/token each"
        terms.append(VramTerm("checkpoints", int(kept), note))
        working = int(tokens * counted * fit.activation_factor)
        working_note = (
            f"one layer recomputed and back-propagated: {counted / 1024:.0f} KiB/token "
            f"counted x {fit.activation_factor:g}"
        )
    if largest:
        working += int(fit.dequant_copies * 2 * largest)
        working_note += f"; {fit.dequant_copies:g} bf16 copies of the largest 4-bit weight"
    terms.append(VramTerm("layer_working_set", working, working_note))

    if t.backend == "unsloth":
        loss = 0
        loss_note = "Unsloth's fused loss never materialises the logits (in the fixed workspace)"
    else:
        per_elem = cal.hf_logits_bytes + (
            cal.softcap_logits_bytes if shape.final_logit_softcapping else 0.0
        )
        loss = int(tokens * shape.vocab_size * per_elem)
        loss_note = f"{tokens} tokens x {shape.vocab_size} vocab x {per_elem:g} B"
    terms.append(VramTerm("logits_loss", loss, loss_note))
    if loss:
        terms.append(
            VramTerm(
                "loss_backward_overlap",
                -min(loss, working),
                "the loss and a layer's backward are not live at the same time",
            )
        )

    masks = 0
    if t.backend == "transformers" and t.padded:
        masks += b * s * s  # 4-D boolean padding mask for SDPA
    if shape.sliding_window and s > shape.sliding_window:
        masks += b * s * s
    if shape.attn_logit_softcapping:
        # Soft-capped scores need eager attention: tanh out, fp32 softmax, probs, per layer.
        masks += b * shape.num_heads * s * s * (2 * a + 4)
    if masks:
        terms.append(VramTerm("attention_masks", masks, "attention masks / eager scores"))
    if t.backend == "unsloth" and shape.sliding_window and s > shape.sliding_window:
        long_seq = int(b * s * s * cal.unsloth_long_sequence_reserve_bytes)
        terms.append(
            VramTerm(
                "long_sequence_reserve",
                long_seq,
                f"{cal.unsloth_long_sequence_reserve_bytes:g} B x rows x seq^2 past the sliding "
                "window: cached blocks, not in the allocated peak (fitted on Gemma 3)",
            )
        )

    extra = 0
    if t.gradient_checkpointing and _checkpointed(shape, t) < shape.num_layers:
        excess = _uncheckpointed_excess(shape, t, cal, counted, working, loss)
        terms.append(excess)
        extra = excess.bytes
    step = sum(x.bytes for x in terms if x.name in ("checkpoints", "activations"))
    step += max(working, loss) + extra
    slack = int(step * fit.slack_fraction)
    if slack:
        terms.append(
            VramTerm(
                "allocator_slack",
                slack,
                f"{fit.slack_fraction:.0%} of checkpoints and working set (caching allocator)",
            )
        )
    fixed, fixed_note = (
        fit.fixed_bytes,
        f"{t.backend}: cuBLAS, kernel and loss workspaces (measured)",
    )
    if t.backend == "unsloth" and fixed:
        # The fused loss works through the logits in chunks of a fixed token count, so its
        # share of the workspace grows with the vocabulary (fitted at Llama-3's 128,256).
        share = cal.unsloth_loss_vocab_share
        scale = (1 - share) + share * shape.vocab_size / cal.unsloth_loss_ref_vocab
        fixed = int(fixed * scale)
        if shape.vocab_size != cal.unsloth_loss_ref_vocab:
            fixed_note += f"; the loss's {share:.0%} scaled to vocab {shape.vocab_size}"
    terms.append(VramTerm("workspaces", fixed, fixed_note))
    terms.append(
        VramTerm(
            "cuda_context", cal.cuda_context_bytes, "CUDA context, outside the PyTorch allocator"
        )
    )
    total = sum(term.bytes for term in terms)
    host = cal.host_base_bytes + int(host_offload * cal.host_offload_factor)
    return Estimate(tuple(terms), total, cal.cuda_context_bytes, host)
