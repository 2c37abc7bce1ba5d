"""``qlora submit | status | logs | cancel | operator``: the commands that talk to a cluster.

Results go to stdout (the Job name, or with ``--wait`` the published adapter's URI), progress
and pod logs to stderr, so ``uri=$(qlora submit --wait job.yaml)`` works in scripts. Exit
codes: 0 ok, 2 invalid spec, 3 fits no GPU class (nothing is created), 8 Kubernetes API error
(forbidden, not found, conflict, unreachable), 9 the job failed (reason printed), 10 the
``kubernetes`` extra is missing.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from runner.errors import ExitCode, SpecError
from runner.settings import load_settings

if TYPE_CHECKING:
    from runner.k8s.client import KubeClient
    from runner.k8s.submitter import Submitter

_EXIT_CODES = (
    "exit codes: 0 ok | 2 invalid spec | 3 fits no GPU class (nothing created) | "
    "8 Kubernetes API error | 9 job failed | 10 missing extra"
)


def _cluster_args(p: argparse.ArgumentParser, namespace: bool = True) -> None:
    p.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: $KUBECONFIG, "
                   "~/.kube/config, else the pod's service account)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    if namespace:
        p.add_argument("--namespace", "-n", help="namespace (default: $QLORA_NAMESPACE)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the cluster commands to the CLI."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "submit",
        help="plan, render and apply a spec as a Job (server-side apply); --wait follows it",
        description="Plan a spec, render its ConfigMap + Job and apply them with server-side "
        "apply. A spec that fits no GPU class is refused before anything is created. "
        "Submitting the same spec again changes nothing. With --wait, stream the pod's log to "
        "stderr and print the published adapter's URI on stdout.\n\n"
        "examples:\n  qlora submit job.yaml\n  uri=$(qlora submit --wait job.yaml)\n\n"
        + _EXIT_CODES,
        formatter_class=fmt,
    )
    p.add_argument("file", metavar="FILE", help="job spec (YAML or JSON)")
    p.add_argument("--wait", action="store_true", help="follow the job to its end")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up waiting after this")
    p.add_argument("--no-logs", action="store_true", help="with --wait: don't stream the log")
    p.add_argument("--max-replans", type=int, default=2, metavar="N",
                   help="with --wait: re-plan at most N times after a CUDA out-of-memory exit "
                   "(half the micro batch, then the next GPU class; default 2)")
    p.add_argument("--queue", metavar="NAME", help="Kueue LocalQueue (the Job starts suspended)")
    p.add_argument("--allow-local-paths", action="store_true",
                   help="allow absolute local paths: you mount them into the pod yourself")
    _cluster_args(p)
    p.set_defaults(handler=_submit)

    p = sub.add_parser("status", help="show the Jobs of a submitted spec and how they ended",
                       description="Show each Job of the spec NAME (its metadata.name): phase, "
                       "GPU class, node, adapter URI or failure reason. Without NAME, list the "
                       "FineTuneJobs of the namespace (-A: of every namespace) with phase, "
                       "class, progress and age, in one API call.\n\n" + _EXIT_CODES,
                       formatter_class=fmt)
    p.add_argument("name", metavar="NAME", nargs="?", help="the spec's metadata.name")
    p.add_argument("--all-namespaces", "-A", action="store_true",
                   help="without NAME: list every namespace's jobs")
    _cluster_args(p)
    p.set_defaults(handler=_status)

    p = sub.add_parser("logs", help="print the log of a submitted job's newest pod",
                       description="Print the log of the newest pod of NAME's newest Job; "
                       "over several nodes, of the pod that runs rank 0 (--rank R: rank R's).")
    p.add_argument("name", metavar="NAME", help="the spec's metadata.name")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing while it runs")
    p.add_argument("--rank", type=int, default=0, metavar="R",
                   help="the pod of global rank R (default 0; a pod of N GPUs holds N ranks)")
    _cluster_args(p)
    p.set_defaults(handler=_logs)

    p = sub.add_parser("cancel", help="stop a submitted job and delete its objects",
                       description="Delete the FineTuneJob NAME if there is one (its Job, pod "
                       "and ConfigMap go with it), else the Jobs and ConfigMaps of spec NAME.")
    p.add_argument("name", metavar="NAME", help="the spec's metadata.name")
    _cluster_args(p)
    p.set_defaults(handler=_cancel)

    p = sub.add_parser(
        "operator",
        help="run the FineTuneJob controller (in the cluster, or against a kubeconfig)",
        description="Watch FineTuneJobs and reconcile each: validate, plan, create the owned "
        "ConfigMap + Job, mirror progress into status conditions, re-plan after a CUDA "
        "out-of-memory exit. Level-triggered: a restarted operator resumes from the cluster.",
        formatter_class=fmt,
    )
    _cluster_args(p)
    p.add_argument("--all-namespaces", "-A", action="store_true",
                   help="watch every namespace (default: $QLORA_OPERATOR_NAMESPACES, else "
                   "--namespace)")
    p.add_argument("--once", action="store_true",
                   help="reconcile every FineTuneJob once and exit")
    p.add_argument("--max-seconds", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--resync", type=float, default=30.0, metavar="S",
                   help="re-check every FineTuneJob at least this often (default 30)")
    p.set_defaults(handler=_operator)




def _client(args: argparse.Namespace) -> KubeClient:
    from runner.errors import missing_extra

    try:
        from runner.k8s.client import load_client
    except ImportError as e:
        raise missing_extra("kubernetes", "k8s") from e
    return load_client(args.kubeconfig, args.context)


def _submit(args: argparse.Namespace) -> int:
    from runner.k8s.submitter import Submitter
    from runner.plan import make_plan
    from runner.spec import load_spec

    if args.max_replans < 0:
        raise SpecError(f"--max-replans: must be 0 or more, got {args.max_replans}")
    spec = load_spec(args.file, hint="pass the spec file as the argument: qlora submit FILE")
    from runner.k8s.pod_fit import refuse_local_paths

    refuse_local_paths(spec, allow=args.allow_local_paths)
    settings = load_settings()
    plan = make_plan(spec, settings)  # refuses a spec that fits nothing: no API call yet
    print(
        f"plan: {plan.gpu_class.name}, {plan.quant_mode}, micro batch {plan.micro_batch_size} "
        f"x {plan.gradient_accumulation_steps}, ~{plan.vram_estimate_bytes / 1024**3:.1f} GiB "
        "VRAM",
        file=sys.stderr,
    )
    submitter = Submitter(_client(args), settings)
    done = submitter.submit(spec, namespace=args.namespace, queue_name=args.queue, plan=plan)
    for applied in done.applied:
        print(f"{done.namespace}: {applied}", file=sys.stderr)
    if not args.wait:
        print(f"job.batch/{done.job_name}")
        return int(ExitCode.OK)
    done, progress = submitter.wait_with_replans(
        spec, done, queue_name=args.queue, follow_logs=not args.no_logs,
        timeout_s=args.timeout, max_replans=args.max_replans,
    )
    print(progress.adapter_uri or f"job.batch/{done.job_name} completed (no adapter URI reported)")
    return int(ExitCode.OK)


def _status(args: argparse.Namespace) -> int:
    from runner.k8s import names
    from runner.k8s.submitter import Submitter

    settings = load_settings()
    ns = args.namespace or settings.namespace
    if args.name is None:
        from runner.k8s import listing

        table = listing.rows(_client(args), None if args.all_namespaces else ns)
        print(listing.format_table(table))
        return int(ExitCode.OK)
    if args.all_namespaces:
        raise SpecError("--all-namespaces: lists jobs only without NAME; pass --namespace "
                        "to look at one job")
    submitter = Submitter(_client(args), settings)
    ftj = submitter.finetunejob(args.name, ns)
    if ftj is not None:
        st = ftj.get("status") or {}
        print(f"finetunejob/{args.name}: {st.get('phase', 'Pending')}  class "
              f"{st.get('gpuClass', '-')}  {st.get('adapterURI') or st.get('message') or ''}")
        if not submitter.jobs_for(args.name, ns):  # e.g. an invalid spec: the status says why
            return int(ExitCode.OK)
    rows = [("JOB", "CLASS", "PHASE", "NODE", "DETAIL")]
    for job, progress in submitter.status(args.name, ns):
        labels = job["metadata"].get("labels") or {}
        detail = progress.adapter_uri or progress.message
        if progress.exit_code not in (None, 0):
            detail += f" (exit code {progress.exit_code})"
        rows.append((job["metadata"]["name"], labels.get(names.LABEL_GPU_CLASS, "-"),
                     progress.phase, progress.node_name or "-", detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    _print_ranks(submitter, [job for job, _ in submitter.status(args.name, ns)])
    return int(ExitCode.OK)


def _print_ranks(submitter: Submitter, jobs: list[dict[str, Any]]) -> None:
    """Per node rank of the newest Job over several pods: pod, phase, node, outcome."""
    if not jobs:
        return
    statuses = submitter.ranks(jobs[-1])
    if len(statuses) < 2 and all(st.node_rank is None for st in statuses):
        return  # one pod: the row above says it all
    rows = [("RANKS", "POD", "PHASE", "NODE", "DETAIL")]
    for st in statuses:
        ranks = f"{st.ranks[0]}" if len(st.ranks) == 1 else f"{st.ranks[0]}-{st.ranks[-1]}"
        detail = st.reason + (f" (exit code {st.exit_code})" if st.exit_code else "")
        rows.append((ranks, st.pod_name, st.phase, st.node_name or "-", detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])


def _logs(args: argparse.Namespace) -> int:
    from runner.k8s.submitter import Submitter

    settings = load_settings()
    if args.rank < 0:
        raise SpecError(f"--rank: must be 0 or more, got {args.rank}")
    Submitter(_client(args), settings).logs(
        args.name, args.namespace or settings.namespace, follow=args.follow, out=sys.stdout,
        rank=args.rank,
    )
    return int(ExitCode.OK)


def _cancel(args: argparse.Namespace) -> int:
    from runner.k8s.submitter import Submitter

    settings = load_settings()
    for what in Submitter(_client(args), settings).cancel(
        args.name, args.namespace or settings.namespace
    ):
        print(f"{what} deleted")
    return int(ExitCode.OK)


def _operator(args: argparse.Namespace) -> int:
    from runner.k8s.operator import Operator
    from runner.k8s.operator_metrics import HealthServer, OperatorMetrics

    settings = load_settings()
    namespaces = None
    if not args.all_namespaces:
        namespaces = settings.operator_namespaces or [args.namespace or settings.namespace]
    client = _client(args)
    metrics = OperatorMetrics()
    client.on_request = metrics.count_request
    op = Operator(client, settings, namespaces=namespaces, resync_s=args.resync,
                  leader_election=settings.operator_leader_election and not args.once,
                  metrics=metrics)
    if args.once:
        op.reconcile_all()
        return int(ExitCode.OK)
    import signal

    # A Deployment rollout sends SIGTERM: finish the reconciles in hand, release the Lease,
    # then leave.
    signal.signal(signal.SIGTERM, lambda *_: op.stop())
    server = HealthServer(metrics, live=op.live, ready=op.ready,
                          port=settings.operator_metrics_port,
                          bind_address=settings.operator_bind_address,
                          port_tries=settings.operator_metrics_port_tries,
                          endpoint_file=settings.operator_endpoint_file).start()
    try:
        op.run(max_seconds=args.max_seconds)
    finally:
        server.stop()
    return int(ExitCode.OK)
