"""Value types the planner produces and the renderer, runner and operator consume.

Pure data: no I/O, no heavy imports. The planner (:mod:`runner.plan`) fills these in; the
Kubernetes renderer turns a :class:`Plan` into node affinity, resource requests and the
``plan.json`` key of the job's ConfigMap; ``qlora run`` reads that key back so the pod trains
with exactly the batch shape and precision that were planned.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class GpuClass:
    """A GPU memory class: the nodes whose one GPU has at least ``min_memory_mib``.

    Attributes:
        name: Class name used in specs and labels, e.g. ``"24GB"``.
        min_memory_mib: Smallest ``nvidia.com/gpu.memory`` label value (MiB) in the class;
            node affinity is ``Gt min_memory_mib - 1``.
        gpu_count: GPUs per pod.
        node_labels: Extra node labels to require (e.g. a node pool).
        tolerations: Extra pod tolerations for tainted pools (Kubernetes dicts).
        cpu_cores: CPU request of a pod in this class.
        reference_card: The slowest common card of the class (for runtime estimates).
        peak_bf16_tflops: That card's dense BF16 peak, TFLOP/s (0 = unknown).
    """

    name: str
    min_memory_mib: int
    gpu_count: int = 1
    node_labels: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    cpu_cores: int = 4
    reference_card: str = ""
    peak_bf16_tflops: float = 0.0


@dataclass(frozen=True)
class VramTerm:
    """One line of the VRAM estimate, in bytes, with a short note on how it was computed."""

    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """What the planner decided for one spec.

    Fields used by the renderer and the runner must keep their names; the planner may add more.

    Attributes:
        spec_hash: sha256 of the spec the plan was made for.
        gpu_class: The chosen class.
        backend: Resolved backend for the GPU pod ('unsloth' or 'transformers').
        quant_mode: Resolved precision ('4bit', 'dynamic-4bit' or '16bit'; never 'auto').
        micro_batch_size: Sequences per forward pass.
        gradient_accumulation_steps: Micro batches per optimizer step.
        vram_terms: Per-term estimate.
        vram_estimate_bytes: Estimated peak GPU memory (reserved + context), bytes.
        host_memory_bytes: Pod memory request (includes Unsloth's activation offload).
        cpu_cores: Pod CPU request.
        tokens_per_step: micro batch x accumulation x max_seq_length.
        estimated_runtime_s: Rough wall time, or None when the dataset size is unknown.
        reasons: Human-readable lines on why this class, precision and batch.
        usable_memory_bytes: The class's memory after the safety margin.
        tokens_per_second: Throughput assumed for the runtime estimate.
        model_config_origin: Where the model's config.json was found.
        trust_remote_code: The model's own Python code will run in the pod.
        prefer_below_mib: The next larger class's floor: the renderer adds a *preferred* node
            affinity ``Lt`` this value, so the scheduler picks the smallest fitting card when
            larger ones are free too. None when the chosen class is the largest.
        gpus_per_node: GPUs (ranks) per node; one pod per node.
        nodes: Nodes (pods); ``gpus_per_node * nodes`` is the DDP world size, and
            micro batch x accumulation x world size is the effective batch.
        allreduce_s_per_step: Estimated time of the LoRA-gradient all-reduce per optimizer
            step (0 on one GPU).
        gradient_checkpointing: The planner's checkpointing decision; None = the spec's.
        checkpointed_layers: Partial checkpointing: the first this many decoder layers are
            checkpointed, the rest keep their activations; None = all (when on).
        peak_micro_batch_tokens: Tokens of the largest micro batch under the runner's row
            order, when planned from the data's lengths (None: sized at max_seq_length).
        data_lengths: One line on the lengths the plan was made from, or None.
        dynamic_4bit_budget_bytes: Dynamic 4-bit on a 16-bit checkpoint: the GPU bytes the
            runner may spend on linear modules kept in 16 bit (counted in the estimate as
            ``dynamic_4bit_kept``); None otherwise.
    """

    spec_hash: str
    gpu_class: GpuClass
    backend: str
    quant_mode: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    vram_terms: tuple[VramTerm, ...]
    vram_estimate_bytes: int
    host_memory_bytes: int
    cpu_cores: int
    tokens_per_step: int
    estimated_runtime_s: float | None = None
    reasons: tuple[str, ...] = ()
    usable_memory_bytes: int = 0
    tokens_per_second: float | None = None
    model_config_origin: str = ""
    trust_remote_code: bool = False
    prefer_below_mib: int | None = None
    gradient_checkpointing: bool | None = None
    checkpointed_layers: int | None = None
    peak_micro_batch_tokens: int | None = None
    data_lengths: str | None = None
    gpus_per_node: int = 1
    nodes: int = 1
    allreduce_s_per_step: float = 0.0
    dynamic_4bit_budget_bytes: int | None = None

    @property
    def world_size(self) -> int:
        """Training processes (ranks): GPUs per node x nodes."""
        return self.gpus_per_node * self.nodes

    def to_json(self) -> str:
        """Serialise for ``plan.json`` and ``qlora plan --json``."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse what :meth:`to_json` wrote."""
        d = json.loads(text)
        d["gpu_class"] = GpuClass(
            **{**d["gpu_class"], "tolerations": tuple(d["gpu_class"].get("tolerations", ()))}
        )
        d["vram_terms"] = tuple(VramTerm(**t) for t in d["vram_terms"])
        d["reasons"] = tuple(d.get("reasons", ()))
        return cls(**d)
