"""Data parallelism in the plan: world size, per-GPU memory terms and the all-reduce cost.

DDP (``torchrun`` + ``DistributedDataParallel``) does not shard anything: every rank holds
the whole (4-bit) model, its own activations for its micro batch, its own LoRA parameters,
gradients and optimizer state, plus DDP's gradient buckets. So more GPUs shorten the run;
they never make a model fit that does not fit one GPU. What the planner adds for a world
size above one:

* ``ddp_gradient_buckets``: DDP copies every trainable gradient into flat buckets for the
  all-reduce (``gradient_as_bucket_view`` is off in the trainer), one more copy of the LoRA
  gradients;
* ``nccl_buffers``: NCCL's communicator buffers outside PyTorch's allocator (an assumption of
  the order NCCL documents for ``NCCL_BUFFSIZE`` x channels; not yet measured on several
  GPUs, see the multi-GPU run issue);
* the optimisation stays the same: micro batch x accumulation x world size equals
  ``training.target_effective_batch_size`` exactly, or the plan is refused with the fix;
* the all-reduce of the LoRA gradients once per optimizer step (accumulation steps run under
  ``no_sync``): a ring all-reduce moves ``2 (w-1)/w`` of the gradient bytes over the slowest
  link.

Pure code, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.plan.types import MIB, VramTerm

NCCL_BUFFER_BYTES = 512 * MIB
"""NCCL communicator buffers per rank (assumed: 4 MiB x up to 32 channels x 2 directions x a
few peers, plus its work FIFO); outside PyTorch's allocator, so seen only by nvidia-smi."""

INTRA_NODE_BUS_BYTES_PER_S = 20e9
"""All-reduce bus bandwidth between GPUs of one node: the PCIe 4.0 x16 order (NVLink nodes
are 10-20x faster, so this is the pessimistic end)."""

INTER_NODE_BUS_BYTES_PER_S = 10e9
"""Between nodes: a 100 Gb/s network after protocol overhead."""

ALLREDUCE_LATENCY_S = 50e-6
"""Per ring hop (NCCL's small-message latency order)."""

WORLD_SIZE_CHOICES = (1, 2, 4, 8, 16)
"""GPU counts per node the planner tries with ``gpus_per_node: auto`` (capped by settings)."""


@dataclass(frozen=True)
class Layout:
    """Where the ranks run.

    Attributes:
        gpus_per_node: Ranks per node (one per GPU).
        nodes: Nodes (one pod each).
    """

    gpus_per_node: int
    nodes: int

    @property
    def world_size(self) -> int:
        """Ranks in all."""
        return self.gpus_per_node * self.nodes

    def describe(self) -> str:
        """``'1 GPU'``, ``'2 GPUs on one node'``, ``'2 nodes x 4 GPUs'``."""
        if self.world_size == 1:
            return "1 GPU"
        if self.nodes == 1:
            return f"{self.gpus_per_node} GPUs on one node"
        return f"{self.nodes} nodes x {self.gpus_per_node} GPU" + (
            "s" if self.gpus_per_node > 1 else ""
        )


def candidate_layouts(
    gpus_per_node: int | str, nodes: int | str, *, max_gpus_per_node: int, max_nodes: int
) -> list[Layout]:
    """Layouts to try, fewest GPUs first: fixed values are kept, 'auto' ones grow.

    GPUs per node grow before nodes: NVLink/PCIe inside a node is faster than the network.
    """
    gpn_opts = (
        [g for g in WORLD_SIZE_CHOICES if g <= max_gpus_per_node]
        if gpus_per_node == "auto"
        else [int(gpus_per_node)]
    )
    node_opts = list(range(1, max_nodes + 1)) if nodes == "auto" else [int(nodes)]
    out = [Layout(g, n) for n in node_opts for g in gpn_opts]
    if nodes == "auto":
        # A second node only once the first is full.
        out = [lay for lay in out if lay.nodes == 1 or lay.gpus_per_node == gpn_opts[-1]]
    return out


def ddp_terms(lora_grad_bytes: int, layout: Layout) -> list[VramTerm]:
    """The per-GPU memory DDP adds; none on one GPU."""
    if layout.world_size == 1:
        return []
    return [
        VramTerm(
            "ddp_gradient_buckets",
            lora_grad_bytes,
            "DDP's flat copy of the LoRA gradients for the all-reduce",
        ),
        VramTerm(
            "nccl_buffers",
            NCCL_BUFFER_BYTES,
            "NCCL communicator buffers, outside the PyTorch allocator (assumed)",
        ),
    ]


def allreduce_seconds(grad_bytes: int, layout: Layout) -> float:
    """Wall time of one ring all-reduce of ``grad_bytes`` over ``layout`` (0 on one GPU)."""
    w = layout.world_size
    if w == 1:
        return 0.0
    bus = INTER_NODE_BUS_BYTES_PER_S if layout.nodes > 1 else INTRA_NODE_BUS_BYTES_PER_S
    return 2 * (w - 1) / w * grad_bytes / bus + 2 * (w - 1) * ALLREDUCE_LATENCY_S


def per_rank_batch(target: int, layout: Layout) -> int | None:
    """Sequences each rank contributes to one optimizer step, or None when not whole."""
    w = layout.world_size
    return target // w if target % w == 0 else None


def batch_fix(target: int, world: int) -> str:
    """The nearest targets that ``world`` divides, as a suggestion."""
    lower, upper = target - target % world, target + world - target % world
    return f"{lower} or {upper}" if lower else str(upper)
