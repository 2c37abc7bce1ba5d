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
    from runner import termination
    from runner.recipe import run

    try:
        result = run(args.spec)
    except BaseException as e:  # every outcome leaves a termination message, then propagates
        termination.report(termination.failure_message(e))
        raise
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
