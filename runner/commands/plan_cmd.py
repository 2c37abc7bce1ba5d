"""``qlora plan``: show what a spec will need before a GPU is spent.

Prints the VRAM estimate term by term, the GPU class chosen and why, the node affinity the
rendered Job will carry, the batch shape and a runtime estimate; ``--json`` prints the
:class:`~runner.plan.Plan` itself for scripts. Exit 2 for an invalid spec, 3 when nothing fits.
"""

from __future__ import annotations

import argparse

from runner.errors import ExitCode

_EPILOG = """examples:
  qlora plan examples/llama-3.1-8b.yaml
  qlora plan examples/llama-3.3-70b.yaml --json
  qlora plan examples/llama-3.1-8b.yaml --data train.jsonl

exit codes: 0 planned | 2 invalid spec, model config or --data file | 3 fits no GPU class
(the message says by how much and which changes would fit) | 5 object storage unreachable
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qlora plan`` to the CLI."""
    p = sub.add_parser(
        "plan",
        help="estimate VRAM and pick the GPU class, precision and batch shape for a spec",
        description="Plan a job: per-term VRAM estimate, GPU memory class, node affinity, "
        "micro batch x accumulation, tokens per step and a runtime estimate.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="job spec (YAML or JSON)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--data",
        metavar="FILE",
        help="a local JSON Lines / JSON copy of the training data: size micro batches by its "
        "token lengths (the model's tokenizer.json when the model is local, else "
        "characters / 3.6)",
    )
    p.set_defaults(handler=_plan)


def _gib(n: int) -> str:
    return f"{n / 1024**3:8.2f} GiB"


def _format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"~{minutes} min"
    return f"~{minutes / 60:.1f} h"


def _plan(args: argparse.Namespace) -> int:
    from runner.plan import make_plan
    from runner.settings import load_settings
    from runner.spec import load_spec

    spec = load_spec(args.file, hint="pass the spec file as the argument: qlora plan FILE")
    settings = load_settings()
    lengths = None
    if args.data:
        from runner.plan.data_lengths import lengths_for_plan

        lengths = lengths_for_plan(spec, args.data)
    plan = make_plan(spec, settings, lengths=lengths)
    if args.json:
        print(plan.to_json())
        return int(ExitCode.OK)
    c = plan.gpu_class
    width = max(len(t.name) for t in plan.vram_terms)
    print(f"{spec.metadata.name}: {plan.quant_mode} LoRA with {plan.backend}, GPU class {c.name}\n")
    print(
        "VRAM estimate (peak reserved + CUDA context)"
        + (" per GPU:" if plan.world_size > 1 else ":")
    )
    for t in plan.vram_terms:
        print(f"  {t.name:<{width}}  {_gib(t.bytes)}  {t.note}")
    print(
        f"  {'total':<{width}}  {_gib(plan.vram_estimate_bytes)}  of "
        f"{plan.usable_memory_bytes / 1024**3:.2f} GiB usable in {c.name}\n"
    )
    print("Why:")
    for r in plan.reasons:
        print(f"  - {r}")
    print()
    affinity = f"{settings.gpu_memory_label} Gt {c.min_memory_mib - 1}"
    if plan.gpus_per_node > 1:
        affinity += f", nvidia.com/gpu.count Gt {plan.gpus_per_node - 1}"
    for k, v in sorted(c.node_labels.items()):
        affinity += f", {k}={v}"
    print(f"node affinity:     {affinity}")
    if c.tolerations:
        print(f"tolerations:       {len(c.tolerations)} from the class table")
    gpus = c.gpu_count * plan.gpus_per_node
    pods = f"{plan.nodes} pods, each " if plan.nodes > 1 else ""
    print(
        f"resources:         {pods}{gpus} x nvidia.com/gpu, {plan.cpu_cores} CPU, "
        f"{plan.host_memory_bytes / 1024**3:.0f} GiB memory"
    )
    if plan.world_size > 1:
        print(
            f"world size:        {plan.world_size} ranks ({plan.nodes} node(s) x "
            f"{plan.gpus_per_node} GPU(s)); memory per GPU {plan.vram_estimate_bytes / 1024**3:.2f}"
            f" GiB; all-reduce {plan.allreduce_s_per_step * 1e3:.1f} ms per step"
        )
    print(
        f"batch:             micro batch {plan.micro_batch_size} x accumulation "
        f"{plan.gradient_accumulation_steps}"
        + (f" x {plan.world_size} ranks" if plan.world_size > 1 else "")
        + f" = {plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size}"
        " sequences per step"
    )
    print(f"tokens per step:   {plan.tokens_per_step:,} (at max_seq_length)")
    if plan.data_lengths:
        print(f"data:              {plan.data_lengths}")
        print(f"largest micro batch: {plan.peak_micro_batch_tokens:,} tokens (padding-free)")
        if plan.gradient_checkpointing is False:
            print("checkpointing:     off (the class has room)")
        elif plan.checkpointed_layers is not None:
            print(f"checkpointing:     first {plan.checkpointed_layers} layers only")
    if plan.estimated_runtime_s is not None:
        print(f"runtime:           {_format_duration(plan.estimated_runtime_s)}")
    else:
        print(
            "runtime:           unknown (dataset not local; set training.max_steps or plan "
            "with a local copy)"
        )
    return int(ExitCode.OK)
