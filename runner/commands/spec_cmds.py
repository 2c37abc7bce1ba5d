"""``qlora validate`` and ``qlora schema``."""

from __future__ import annotations

import argparse
import json
import sys

from runner.errors import ExitCode, SpecError
from runner.k8s.manifests import label_problems
from runner.spec import JobSpec, json_schema, load_spec, spec_hash
from runner.spec.model_checks import ModelFindings, check_against_model


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the spec commands to the CLI."""
    p = sub.add_parser(
        "validate",
        help="check job spec files; every problem is listed as 'path: message'",
        description="Validate job specs. Exit 0 if all are valid, 2 otherwise.\n\n"
        "example: qlora validate examples/*.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(handler=_validate)

    p = sub.add_parser(
        "schema",
        help="print the JSON Schema of the job spec",
        description="Print the JSON Schema of a FineTuneJob document (for editors and CI).",
    )
    p.add_argument("--spec-only", action="store_true", help="only the 'spec' section")
    p.set_defaults(handler=_schema)


def _validate(args: argparse.Namespace) -> int:
    failed: list[SpecError] = []
    for f in args.files:
        try:
            spec = load_spec(f, hint="pass existing spec files: qlora validate FILE...")
            findings = _model_findings(spec)
        except SpecError as e:
            failed.append(e)
            print(f"error: {e.message}", file=sys.stderr)
            for line in e.details:
                print(line, file=sys.stderr)
            continue
        labels = label_problems(spec)
        if labels:
            failed.append(SpecError(f"{f}: invalid metadata.labels", labels))
            print(f"error: {f}: invalid metadata.labels", file=sys.stderr)
            for line in labels:
                print(line, file=sys.stderr)
            continue
        for line in findings.warnings:
            print(f"warning: {line}", file=sys.stderr)
        if findings.errors:
            failed.append(SpecError(f"{f}: does not fit its model"))
            print(f"error: {f}: does not fit its model", file=sys.stderr)
            for line in findings.errors:
                print(line, file=sys.stderr)
            continue
        print(f"{f}: ok ({spec.metadata.name}, spec hash {spec_hash(spec)[:12]})")
    return int(ExitCode.INVALID_INPUT) if failed else int(ExitCode.OK)


def _model_findings(spec: JobSpec) -> ModelFindings:
    """What the model's config says about the spec, when it is known offline (else nothing)."""
    from runner.plan.model_config import offline_model_config

    found = offline_model_config(spec)
    if found is None:
        return ModelFindings()
    return check_against_model(spec, found.config, found.origin)


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(body_only=args.spec_only), indent=2))
    return int(ExitCode.OK)
