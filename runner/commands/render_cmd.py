"""``qlora render``: print the ConfigMap + Job for a spec, or the FineTuneJob CRD.

The output is ready for ``kubectl apply -f -``: no operator is needed to run a job. Rendering
is pure (plan, then build objects), so it works on a laptop with no cluster access.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from runner.errors import ExitCode, PlanError, SpecError
from runner.k8s import crd_yaml, kueue, render_objects
from runner.k8s.manifests import to_yaml
from runner.k8s.names import is_dns1123_label
from runner.k8s.pod_fit import refuse_local_paths
from runner.local_files import is_file, read_file
from runner.plan import Plan, bundled_config, make_plan
from runner.plan.config_schema import read_model_config
from runner.plan.model_config import bundled_shapes
from runner.settings import load_settings
from runner.spec import load_spec, spec_hash
from runner.spec.bounds import load_yaml_file


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
        "  qlora render --crd | kubectl apply -f -\n"
        "  qlora render job.yaml --model-config llama-3.1-8b   # s3:// model, no S3 access",
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
    p.add_argument(
        "--model-config",
        metavar="SHAPE|FILE",
        help="plan with this config.json (a file, or a bundled shape such as llama-3.1-8b) "
        "instead of reading it from spec.model.source, e.g. to render offline",
    )
    p.add_argument(
        "--kueue-flavors",
        metavar="VALUES_YAML",
        help="with --queue: the chart's values file (kueue.flavors); say which of its "
        "ResourceFlavors the job can be admitted to, and refuse the job if none",
    )
    p.add_argument(
        "--allow-local-paths",
        action="store_true",
        help="allow absolute local paths in the spec: you mount them into the pod yourself "
        "(relative paths and paths in the pod's emptyDirs are refused even then)",
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
    spec = load_spec(args.file, hint="pass the spec file as the argument: qlora render FILE")
    refuse_local_paths(spec, allow=args.allow_local_paths)
    settings = load_settings()
    if args.plan:
        plan = _load_plan(args.plan)
        if plan.spec_hash != spec_hash(spec):
            raise PlanError(
                f"{args.plan}: the plan was made for another spec (hash {plan.spec_hash[:12]}); "
                f"run 'qlora plan {args.file} --json' again"
            )
    else:
        model_config = _model_config(args.model_config) if args.model_config else None
        plan = make_plan(spec, settings, model_config=model_config)
    objects = render_objects(spec, plan, settings, queue_name=args.queue, namespace=args.namespace)
    if args.queue is not None:
        _say_flavors(plan, settings.gpu_memory_label, args.kueue_flavors)
    elif args.kueue_flavors:
        raise SpecError("--kueue-flavors: only with --queue")
    sys.stdout.write(to_yaml(objects))
    return int(ExitCode.OK)


def _say_flavors(plan: Plan, memory_label: str, values_file: str | None) -> None:
    """Tell (on stderr) which Kueue flavors the job can use; exit 2 when none can take it."""
    need = kueue.requirement(plan, memory_label)
    if values_file is None:
        print(f"kueue: the job can use flavors whose node labels give {need}", file=sys.stderr)
        return
    doc = load_yaml_file(Path(values_file), what="values file")  # bounded, as a spec
    flavors = kueue.flavors_from_values(doc, memory_label, source=values_file)
    names = kueue.usable_flavors(flavors, plan, memory_label)
    if not names:
        raise SpecError(
            f"--kueue-flavors: no flavor in {values_file} can admit this job ({need}); "
            f"flavors: {', '.join(f.name for f in flavors)}. Kueue would queue it forever or "
            "admit it where it cannot schedule"
        )
    print(f"kueue: the job can use flavors {', '.join(names)} ({need})", file=sys.stderr)


def _load_plan(path: str) -> Plan:
    raw = read_file(Path(path), max_bytes=1024 * 1024, what="plan")
    try:
        return Plan.from_json(raw.decode("utf-8"))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise SpecError(f"{path}: not a plan written by 'qlora plan --json': {e}") from e


def _model_config(value: str) -> dict[str, Any]:
    path = Path(value)
    if is_file(path):  # the same strict check as every config.json (runner.plan.config_schema)
        return read_model_config(path)
    found = bundled_config(value)
    if found is None:
        raise SpecError(
            f"--model-config: '{value}' is neither a file nor a bundled shape; shapes: "
            + ", ".join(sorted(bundled_shapes()))
        )
    return dict(found.config)
