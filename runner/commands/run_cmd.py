"""``qlora run``: the container entrypoint; trains, verifies and publishes one adapter."""

from __future__ import annotations

import argparse
import json
import sys

from runner.errors import ExitCode


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qlora run`` to the CLI."""
    p = sub.add_parser(
        "run",
        help="train, verify and publish an adapter (the container entrypoint)",
        description="Run one fine-tuning job: load -> preflight -> train -> verify -> "
        "evaluate -> publish.\n"
        "The spec is --spec FILE, else $QLORA_SPEC, else /etc/qlora/job.yaml; a plan.json "
        "next to it fixes the batch shape and precision. Prints a JSON summary (run id, "
        "manifest URI, first and last loss) on success.\n\n"
        "exit codes: 0 published | 2 invalid spec or data (preflight) | 4 adapter failed "
        "verification or the quality gate, nothing published | 5 storage | 6 CUDA out of "
        "memory | 7 preempted, checkpoint written | 10 training extra missing | 11 deadline "
        "exceeded (SIGTERM at the Job's deadline), checkpoint written\n\n"
        "example: qlora run --spec examples/tiny-cpu.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--spec", metavar="FILE", help="job spec (default: $QLORA_SPEC or /etc/qlora/job.yaml)"
    )
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from runner import launch, termination
    from runner.recipe import _exit_code, run
    from runner.spec import resolve_spec_path
    from runner.train.distributed import current, under_torchrun

    spec_path = resolve_spec_path(args.spec)
    if not under_torchrun():
        layout = launch.layout_for(spec_path)
        if layout.world_size > 1:  # re-execute under torchrun, one rank per GPU
            log_args = ["--log-format", args.log_format] if args.log_format else []
            return launch.run_group(layout, spec_path, log_args)
    rank = current()
    launch.record_pid(rank.rank)
    try:
        result = run(spec_path)
    except BaseException as e:  # every outcome leaves a termination message, then propagates
        launch.record_exit(rank.rank, _exit_code(e))
        if rank.is_main:
            termination.report(termination.failure_message(e))
        raise
    launch.record_exit(rank.rank, 0)
    if not rank.is_main:  # rank 0 verifies, evaluates, publishes and reports
        return int(ExitCode.OK)
    evaluation = result.metadata.get("evaluation") or {}
    termination.report(termination.success_message(result.run_uri, evaluation.get("summary")))
    summary = {
        "run_id": result.run_id,
        "run_uri": result.run_uri,
        "manifest_uri": result.manifest_uri,
        "first_loss": result.metadata["training"]["first_loss"],
        "last_loss": result.metadata["training"]["last_loss"],
        "steps": result.metadata["training"]["steps"],
        "evaluation": evaluation.get("summary"),
    }
    print(json.dumps(summary), file=sys.stdout)
    return int(ExitCode.OK)
