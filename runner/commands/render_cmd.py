"""``qlora render``: print the ConfigMap + Job for a spec, or the FineTuneJob CRD.

The output is ready for ``kubectl apply -f -``: no operator is needed to run a job. Rendering
is pure (plan, then build objects), so it works on a laptop with no cluster access.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from runner.errors import ExitCode, PlanError, SpecError
from runner.k8s import crd_yaml, render_objects
from runner.k8s.manifests import to_yaml
from runner.k8s.names import is_dns1123_label
from runner.plan import Plan
from runner.settings import Settings, load_settings
from runner.spec import JobSpec, load_spec, spec_hash


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qlora render`` to the CLI."""
    p = sub.add_parser(
        "render",
        help="print the Kubernetes ConfigMap + Job for a spec (or the CRD) as YAML",
        description="Plan a job spec and print the ConfigMap and batch/v1 Job that run it, "
        "ready for 'kubectl apply -f -'. Names are deterministic, so applying the same spec "
        "twice changes nothing. Deployment settings (image, namespace, S3 endpoint and "
        "Secret, GPU node label, class table) come from QLORA_* environment variables.\n\n"
        "examples:\n"
        "  qlora render examples/reference.yaml | kubectl apply -f -\n"
        "  qlora render job.yaml --queue team-a --namespace ml\n"
        "  qlora render --crd | kubectl apply -f -",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="job spec (YAML or JSON)")
    p.add_argument("--crd", action="store_true", help="print the FineTuneJob CRD instead")
    p.add_argument("--namespace", "-n", help="target namespace (default: $QLORA_NAMESPACE)")
    p.add_argument(
        "--queue", metavar="NAME", help="Kueue LocalQueue: label the Job and create it suspended"
    )
    p.add_argument(
        "--plan",
        metavar="PLAN_JSON",
        help="use this plan (from 'qlora plan --json') instead of planning again",
    )
    p.set_defaults(handler=_render)


def _render(args: argparse.Namespace) -> int:
    if args.crd:
        if args.file:
            raise SpecError("give either FILE or --crd, not both")
        sys.stdout.write(crd_yaml())
        return int(ExitCode.OK)
    if not args.file:
        raise SpecError("render needs a spec FILE (or --crd for the CRD)")
    for flag, value in (("--namespace", args.namespace), ("--queue", args.queue)):
        if value is not None and not is_dns1123_label(value):
            raise SpecError(f"{flag}: '{value}' is not a DNS-1123 label (a-z 0-9 -, <= 63)")
    spec = load_spec(args.file)
    settings = _settings()
    if args.plan:
        plan = _load_plan(args.plan)
        if plan.spec_hash != spec_hash(spec):
            raise PlanError(
                f"{args.plan}: the plan was made for another spec (hash {plan.spec_hash[:12]}); "
                f"run 'qlora plan {args.file} --json' again"
            )
    else:
        plan = _make_plan(spec, settings)
    objects = render_objects(spec, plan, settings, queue_name=args.queue, namespace=args.namespace)
    sys.stdout.write(to_yaml(objects))
    return int(ExitCode.OK)


def _settings() -> Settings:
    try:
        return load_settings()
    except ValidationError as e:
        lines = [
            f"QLORA_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in e.errors(include_url=False)
        ]
        raise SpecError("invalid settings in the QLORA_* environment", lines) from e


def _load_plan(path: str) -> Plan:
    try:
        return Plan.from_json(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"{path}: cannot read the plan: {e}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{path}: not a plan written by 'qlora plan --json': {e}") from e


def _make_plan(spec: JobSpec, settings: Settings) -> Plan:
    raise PlanError("the planner is not available yet; pass --plan PLAN_JSON")
