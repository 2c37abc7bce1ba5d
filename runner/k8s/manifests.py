"""Spec + plan + settings → the ConfigMap and ``batch/v1`` Job that run one fine-tuning job.

Pure code: plain dicts in, plain dicts out, no Kubernetes client. ``qlora render`` prints
them for ``kubectl apply -f -``; the submitter applies them with server-side apply; the
operator passes an ``owner`` so both are garbage-collected with their FineTuneJob. All three
therefore see exactly the same objects, and tests check them against the Kubernetes OpenAPI
schemas without a cluster.

How the Job is shaped, and why:

* Placement is data, not code: the plan's :class:`~runner.plan.GpuClass` becomes a required
  node affinity ``<gpu_memory_label> Gt <min_memory_mib - 1>`` (GPU Feature Discovery labels
  one GPU's memory in MiB; there is no ``Ge``), plus the class's extra node labels and
  tolerations. ``nvidia.com/gpu`` is requested in limits, because affinity only filters nodes.
* ``podFailurePolicy`` turns the runner's exit codes (:class:`runner.errors.ExitCode`) into
  Job decisions: deterministic failures fail the Job at once (retrying cannot help; a CUDA OOM
  is re-planned by the submitter/operator with a smaller micro batch), a preemption that wrote
  its checkpoint and any ``DisruptionTarget`` eviction do not count against ``backoffLimit``.
* The pod runs as a non-root UID with a read-only root filesystem; every path the training
  stack writes to (Hugging Face, Triton and XDG caches, ``/tmp``, the work directory,
  ``/dev/shm``) is an ``emptyDir``. S3 credentials come only from a Secret by
  ``secretKeyRef``; the endpoint is a plain setting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from runner import __version__
from runner.deadline import DEADLINE_ENV, POD_NAME_ENV
from runner.errors import ExitCode, SpecError
from runner.k8s import jobset, multinode, names, trainjob
from runner.k8s.pod_fit import config_map_problems, volume_sizes
from runner.plan.types import MIB, GpuClass, Plan
from runner.settings import Settings
from runner.spec import JobSpec, dump_spec, spec_hash

CONTAINER_NAME = "train"
CONFIG_MOUNT_DIR = "/etc/qlora"
SPEC_KEY = "job.yaml"
PLAN_KEY = "plan.json"
SPEC_PATH = f"{CONFIG_MOUNT_DIR}/{SPEC_KEY}"
PLAN_PATH = f"{CONFIG_MOUNT_DIR}/{PLAN_KEY}"
CACHE_DIR = "/var/cache/qlora"
WORK_DIR = "/var/lib/qlora"
RUN_AS_UID = 10001
"""The image's ``qlora`` user (see the Dockerfile)."""
GPU_RESOURCE = "nvidia.com/gpu"
S3_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
S3_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
MAX_SHM_BYTES = 16 * 1024**3

# Exit codes that fail the Job at once: retrying the same pod cannot help.
FAIL_JOB_EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode.INVALID_INPUT,  # the spec or data is wrong
    ExitCode.DOES_NOT_FIT,  # the node's GPU is smaller than planned
    ExitCode.VERIFICATION_FAILED,  # the adapter did not train; the same seed would repeat it
    ExitCode.CUDA_OOM,  # the plan was wrong: re-plan with a smaller micro batch, not retry
    ExitCode.MISSING_DEPENDENCY,  # the image lacks an extra
    ExitCode.DEADLINE_EXCEEDED,  # activeDeadlineSeconds is used up: the Job has failed anyway
    ExitCode.STOPPED,  # a user's stop outside a pod: cannot occur here; never retried if it did
)
# Not listed, so counted against backoffLimit: 1 (a bug), 5 (storage), 13 (a phase stuck past
# its watchdog budget: a hung download or device may not hang again on another pod).
IGNORE_EXIT_CODES: tuple[ExitCode, ...] = (ExitCode.PREEMPTED,)


@dataclass(frozen=True)
class JobPolicy:
    """Lifetime knobs of the rendered Job.

    Attributes:
        backoff_limit: Pod retries for failures not covered by ``podFailurePolicy`` (internal
            errors, storage outages); they resume from the last checkpoint.
        termination_grace_s: Time between SIGTERM and SIGKILL. 300 s covers finishing the
            current optimizer step (tens of seconds for a 70B model at 16 sequences per step)
            plus writing the LoRA weights, 8-bit optimizer state and RNG state (a few hundred
            MB for rank 16) and mirroring them to object storage at ~50 MB/s.
        ttl_after_finished_s: How long a finished Job (and its pod logs) stays readable.
        active_deadline_s: Hard limit on the Job's wall time; None derives it from the plan.
    """

    backoff_limit: int = 3
    termination_grace_s: int = 300
    ttl_after_finished_s: int = 7 * 86400
    active_deadline_s: int | None = None


DEFAULT_POLICY = JobPolicy()
_DEADLINE_UNKNOWN_S = 3 * 86400
_DEADLINE_MIN_S = 2 * 3600
_DEADLINE_MAX_S = 14 * 86400


def render_objects(
    spec: JobSpec,
    plan: Plan,
    settings: Settings,
    *,
    queue_name: str | None = None,
    owner: Mapping[str, Any] | None = None,
    namespace: str | None = None,
    attempt: int = 0,
    policy: JobPolicy = DEFAULT_POLICY,
    managed_by: str = "qlora-runner",
) -> list[dict[str, Any]]:
    """Render the ConfigMap and Job for one spec, in apply order.

    Args:
        spec: The validated job spec.
        plan: The planner's decision for ``spec`` (class, precision, batch, host resources).
        settings: Deployment settings (image, S3 endpoint and Secret, node label key, ...).
        queue_name: Kueue LocalQueue; when set the Job carries the queue label and is
            created suspended so Kueue admits it.
        owner: The owning object, either a full object (``apiVersion``, ``kind``,
            ``metadata.name/uid/namespace``) or an ownerReference-shaped mapping
            (``apiVersion``, ``kind``, ``name``, ``uid``). Both objects get a controller
            ownerReference to it.
        namespace: Target namespace; default the owner's, else ``settings.namespace``.
        attempt: Re-plan attempt, part of the object names (see :func:`names.job_name`).
        policy: Backoff, deadline, TTL and grace period.
        managed_by: Value of ``app.kubernetes.io/managed-by``.

    Returns:
        ``[ConfigMap, Job]`` as plain dicts; over several nodes ``[ConfigMap, Service, Job]``
        (``settings.multi_node_target`` indexed-job), ``[ConfigMap, JobSet]`` (jobset) or
        ``[ConfigMap, TrainJob]`` (trainjob).

    Raises:
        SpecError: ``metadata.labels`` holds an invalid or reserved label, or ``queue_name``
            cannot be a label value (exit code 2; the operator reports it as a condition).
        ValueError: ``owner`` lacks apiVersion, kind, name or uid (a programming error).
    """
    name = names.job_name(spec, attempt)
    ns = namespace or _owner_namespace(owner) or settings.namespace
    if queue_name is not None and not (queue_name and names.is_label_value(queue_name)):
        raise SpecError(
            f"{names.LABEL_KUEUE_QUEUE}: '{queue_name}' is not a valid queue name "
            "(a LocalQueue name: a-z 0-9 -, at most 63 characters)"
        )
    labels = _labels(spec, plan, managed_by, attempt)
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels}
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    full_hash = spec_hash(spec)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**meta, "annotations": {names.ANNOTATION_SPEC_HASH: full_hash}},
        "data": {SPEC_KEY: dump_spec(spec), PLAN_KEY: plan.to_json() + "\n"},
    }
    too_big = config_map_problems(config_map)
    if too_big:
        raise SpecError("the rendered ConfigMap is too large for the API server", too_big)
    job_labels = dict(labels)
    if queue_name is not None:
        job_labels[names.LABEL_KUEUE_QUEUE] = queue_name
    job_spec: dict[str, Any] = {
        "backoffLimit": policy.backoff_limit,
        "activeDeadlineSeconds": active_deadline_s(plan, policy),
        "ttlSecondsAfterFinished": policy.ttl_after_finished_s,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": {"labels": labels, "annotations": _pod_annotations(spec)},
            "spec": _pod_spec(spec, plan, settings, config_map_name=name, policy=policy),
        },
    }
    target = settings.multi_node_target if plan.nodes > 1 else None
    if target is not None:  # one pod per node: an Indexed Job (alone or in a JobSet/TrainJob)
        job_spec.update(multinode.indexed_job_fields(plan))
        pod = job_spec["template"]["spec"]
        train = pod["containers"][0]
        if target == "indexed-job":
            pod["subdomain"] = multinode.service_name(name)
            train["env"] += multinode.rank_env(multinode.master_host(name, ns))
        elif target == "jobset":
            train["env"] += multinode.rank_env(jobset.master_host(name, ns))
        # a TrainJob's runtime gives torchrun's PET_* environment itself
        train.setdefault("ports", []).append(
            {
                "name": multinode.RENDEZVOUS_PORT_NAME,
                "containerPort": multinode.MASTER_PORT,
                "protocol": "TCP",
            }
        )
    if queue_name is not None:
        job_spec["suspend"] = True
    annotations = {
        names.ANNOTATION_SPEC_HASH: full_hash,
        names.ANNOTATION_VRAM_ESTIMATE: str(plan.vram_estimate_bytes),
        names.ANNOTATION_QUANT_MODE: plan.quant_mode,
    }
    if plan.world_size > 1:  # qlora logs --rank R finds the pod of rank R by it
        annotations[names.ANNOTATION_RANKS_PER_POD] = str(plan.gpus_per_node)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**meta, "labels": job_labels, "annotations": annotations},
        "spec": job_spec,
    }
    if target == "jobset":
        return [config_map, jobset.render_jobset(job, restarts=policy.backoff_limit)]
    if target == "trainjob":
        trainer_job = trainjob.render_trainjob(
            job,
            nodes=plan.nodes,
            gpus_per_node=plan.gpus_per_node,
            runtime=settings.trainer_runtime,
        )
        return [config_map, trainer_job]
    if target == "indexed-job":
        return [config_map, multinode.headless_service(name, meta), job]
    return [config_map, job]



def job_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``batch/v1`` Job among rendered objects.

    Raises:
        SpecError: a JobSet or TrainJob was rendered (``QLORA_MULTI_NODE_TARGET``); ``qlora
            submit`` and the operator create and follow the Indexed Job only, the other
            targets are for ``qlora render`` | ``kubectl apply``.
    """
    for obj in objects:
        if obj["kind"] == "Job":
            return obj
    kinds = ", ".join(o["kind"] for o in objects if o["kind"] != "ConfigMap")
    raise SpecError(
        f"QLORA_MULTI_NODE_TARGET: a {kinds} is rendered for 'qlora render | kubectl apply "
        "-f -' only; qlora submit and the operator create the Indexed Job (indexed-job)"
    )


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """A controller ownerReference to ``owner`` (full object or reference-shaped mapping)."""
    meta = owner.get("metadata", owner)
    try:
        ref = {
            "apiVersion": str(owner["apiVersion"]),
            "kind": str(owner["kind"]),
            "name": str(meta["name"]),
            "uid": str(meta["uid"]),
        }
    except KeyError as e:
        raise ValueError(f"owner needs apiVersion, kind, name and uid; missing {e}") from e
    return {**ref, "controller": True, "blockOwnerDeletion": True}


def pod_failure_policy() -> dict[str, Any]:
    """Rules mapping the runner's exit codes and pod disruptions to Job actions.

    Rules are checked in order; the first that matches decides. Disruptions come first so an
    evicted pod is never counted as a failure whatever its exit code.
    """
    return {
        "rules": [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": sorted(int(c) for c in FAIL_JOB_EXIT_CODES),
                },
            },
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": sorted(int(c) for c in IGNORE_EXIT_CODES),
                },
            },
        ]
    }


def active_deadline_s(plan: Plan, policy: JobPolicy = DEFAULT_POLICY) -> int:
    """The Job's wall-time limit: the policy's, else 4x the plan's runtime estimate.

    Estimates are rough, so the deadline is generous (never under 2 h, never over 14 days);
    without an estimate (unknown dataset size) it is 3 days.
    """
    if policy.active_deadline_s is not None:
        return policy.active_deadline_s
    if plan.estimated_runtime_s is None:
        return _DEADLINE_UNKNOWN_S
    return int(min(_DEADLINE_MAX_S, max(_DEADLINE_MIN_S, 4 * plan.estimated_runtime_s)))


def uses_s3(spec: JobSpec) -> bool:
    """Whether the job reads or writes object storage (and so needs the S3 Secret)."""
    body = spec.spec
    uris = [body.model.source, body.output.uri, *body.dataset.sources]
    return any(u.startswith("s3://") for u in uris)


def shm_size_bytes(plan: Plan) -> int:
    """Size of the ``/dev/shm`` tmpfs: a quarter of host memory, 1 GiB to 16 GiB, MiB-aligned.

    Several GPUs in a pod get at least 1 GiB each: NCCL's intra-node transport and the
    DataLoader keep their buffers there."""
    floor = max(1, multinode.gpus_per_pod(plan)) * 1024 * MIB
    size = min(MAX_SHM_BYTES, max(floor, plan.host_memory_bytes // 4))
    return size // MIB * MIB


def _owner_namespace(owner: Mapping[str, Any] | None) -> str | None:
    if owner is None:
        return None
    meta = owner.get("metadata")
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    return str(ns) if ns else None


def label_problems(spec: JobSpec) -> list[str]:
    """``path: message`` lines for ``metadata.labels`` the API server (or we) would refuse.

    ``qlora validate`` reports the same lines as ``qlora render``.
    """
    problems = []
    for key, value in spec.metadata.labels.items():
        path = f'metadata.labels["{key}"]'
        if not names.is_label_key(key):
            problems.append(f"{path}: not a valid label key ([prefix/]name, name <= 63 chars)")
        elif key.startswith(names.RESERVED_LABEL_PREFIXES):
            problems.append(f"{path}: reserved for qlora-runner; choose another key")
        if not names.is_label_value(value):
            problems.append(
                f"{path}: '{value}' is not a valid label value "
                "(<= 63 of A-Z a-z 0-9 - _ ., alphanumeric at both ends)"
            )
    return problems


def _labels(spec: JobSpec, plan: Plan, managed_by: str, attempt: int) -> dict[str, str]:
    problems = label_problems(spec)
    if problems:
        raise SpecError("invalid metadata.labels", problems)
    ours = {
        names.LABEL_NAME: names.APP_NAME,
        names.LABEL_INSTANCE: spec.metadata.name,
        names.LABEL_COMPONENT: "trainer",
        names.LABEL_PART_OF: names.APP_NAME,
        names.LABEL_MANAGED_BY: names.label_value(managed_by),
        names.LABEL_VERSION: names.label_value(__version__),
        names.LABEL_JOB: spec.metadata.name,
        names.LABEL_SPEC_HASH: names.spec_hash_label(spec),
        names.LABEL_GPU_CLASS: names.label_value(plan.gpu_class.name),
        names.LABEL_ATTEMPT: str(attempt),
    }
    return {**dict(sorted(spec.metadata.labels.items())), **ours}


def _pod_annotations(spec: JobSpec) -> dict[str, str]:
    metrics = spec.spec.metrics
    if not metrics.enabled:
        return {}
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(metrics.port),
        "prometheus.io/path": "/metrics",
    }


def _pod_spec(
    spec: JobSpec, plan: Plan, settings: Settings, *, config_map_name: str, policy: JobPolicy
) -> dict[str, Any]:
    gpu = plan.gpu_class
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": policy.termination_grace_s,
        "automountServiceAccountToken": False,  # the trainer never calls the Kubernetes API
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_UID,
            "runAsGroup": RUN_AS_UID,
            "fsGroup": RUN_AS_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(spec, plan, settings)],
        "volumes": _volumes(spec, plan, config_map_name) + _compile_cache_volume(settings),
    }
    # The runner tells a deadline's SIGTERM from preemption by it (runner.train.preemption).
    pod["containers"][0]["env"].append(
        {"name": DEADLINE_ENV, "value": str(active_deadline_s(plan, policy))}
    )
    if settings.host_network:
        pod["hostNetwork"] = True
        pod["dnsPolicy"] = "ClusterFirstWithHostNet"
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    affinity = node_affinity(gpu, settings.gpu_memory_label, plan.prefer_below_mib)
    count = multinode.gpu_count_expression(plan)
    if count is not None:  # one node must hold every GPU of the pod
        terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        terms[0]["matchExpressions"].append(count)
    if affinity:
        pod["affinity"] = {"nodeAffinity": affinity}
    pod["tolerations"] = tolerations(gpu)
    return pod


def node_affinity(
    gpu: GpuClass, memory_label: str, prefer_below_mib: int | None = None
) -> dict[str, Any]:
    """Node affinity for a GPU class.

    Required: the memory threshold plus the class's node labels. Preferred (weight 100):
    memory below the next class's floor, so that when a 24 GB and an 80 GB card are both free
    the scheduler binds the job to the 24 GB one and keeps the big card for jobs that need it.
    A class with ``gpu_count == 0`` (CPU-only) gets no memory terms.
    """
    expressions: list[dict[str, Any]] = []
    if gpu.gpu_count > 0:
        expressions.append(
            {"key": memory_label, "operator": "Gt", "values": [str(gpu.min_memory_mib - 1)]}
        )
    expressions += [
        {"key": k, "operator": "In", "values": [v]} for k, v in sorted(gpu.node_labels.items())
    ]
    if not expressions:
        return {}
    affinity: dict[str, Any] = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": expressions}]
        }
    }
    if gpu.gpu_count > 0 and prefer_below_mib is not None:
        affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
            {
                "weight": 100,
                "preference": {
                    "matchExpressions": [
                        {"key": memory_label, "operator": "Lt", "values": [str(prefer_below_mib)]}
                    ]
                },
            }
        ]
    return affinity


def tolerations(gpu: GpuClass) -> list[dict[str, Any]]:
    """The usual ``nvidia.com/gpu`` taint's toleration (GPU classes) plus the class's own."""
    out: list[dict[str, Any]] = []
    if gpu.gpu_count > 0:
        out.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    out += [dict(t) for t in gpu.tolerations if dict(t) not in out]
    return out


def resources(plan: Plan, ephemeral_bytes: int | None = None) -> dict[str, Any]:
    """CPU, memory and disk requests from the plan; GPUs and memory (+ /dev/shm) as limits.

    Memory's limit adds the ``/dev/shm`` tmpfs, which is charged to the container. CPU has no
    limit: throttling a data loader only slows the GPU down. ``ephemeral_bytes`` (the sum of
    the emptyDirs' size limits, :func:`runner.k8s.pod_fit.volume_sizes`) is requested as
    ``ephemeral-storage`` so the scheduler picks a node with that much free disk.
    """
    memory_mib = math.ceil(plan.host_memory_bytes / MIB)
    limit_mib = memory_mib + shm_size_bytes(plan) // MIB
    out: dict[str, Any] = {
        "requests": {"cpu": str(plan.cpu_cores), "memory": f"{memory_mib}Mi"},
        "limits": {"memory": f"{limit_mib}Mi"},
    }
    if ephemeral_bytes is not None:
        out["requests"]["ephemeral-storage"] = f"{math.ceil(ephemeral_bytes / MIB)}Mi"
    if plan.gpu_class.gpu_count > 0:
        out["requests"][GPU_RESOURCE] = str(multinode.gpus_per_pod(plan))
        out["limits"][GPU_RESOURCE] = str(multinode.gpus_per_pod(plan))
    return out


def _container(spec: JobSpec, plan: Plan, settings: Settings) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": WORK_DIR,  # Unsloth writes its compiled-kernel cache into the cwd
        "env": _env(spec, settings),
        "resources": resources(plan, volume_sizes(spec, plan).total),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "work", "mountPath": WORK_DIR},
            *(
                [{"name": "compile-cache", "mountPath": COMPILE_CACHE_DIR}]
                if settings.compile_cache_claim
                else []
            ),
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.spec.metrics.enabled:
        container["ports"] = [
            {"name": "metrics", "containerPort": spec.spec.metrics.port, "protocol": "TCP"}
        ]
    return container


def _env(spec: JobSpec, settings: Settings) -> list[dict[str, Any]]:
    plain: dict[str, str | None] = {
        "QLORA_SPEC": SPEC_PATH,
        "QLORA_PLAN": PLAN_PATH,
        "QLORA_WORK_DIR": f"{WORK_DIR}/work",
        "QLORA_STORAGE_RETRIES": str(settings.storage_retries),
        "QLORA_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "QLORA_S3_REGION": settings.s3_region,
        "QLORA_S3_ADDRESSING_STYLE": settings.s3_addressing_style,
        "QLORA_PUSHGATEWAY_URL": settings.pushgateway_url,
        "AWS_DEFAULT_REGION": settings.s3_region,
        # The root filesystem is read-only: every cache goes to the `cache` emptyDir.
        "HOME": CACHE_DIR,
        "XDG_CACHE_HOME": f"{CACHE_DIR}/xdg",
        "HF_HOME": f"{CACHE_DIR}/huggingface",
        "TRITON_CACHE_DIR": f"{_compile_dir(settings)}/triton",
        "TORCHINDUCTOR_CACHE_DIR": f"{_compile_dir(settings)}/torchinductor",
        "QLORA_COMPILE_CACHE_DIR": _compile_dir(settings) if settings.compile_cache_claim else None,
        "CUDA_CACHE_PATH": f"{CACHE_DIR}/nv",
        "PYTHONUNBUFFERED": "1",
        # Fault injection for tests (runner.train.faults): off unless the deployment sets it.
        "QLORA_FAULT_OOM_AT_STEP": str(settings.fault_oom_at_step)
        if settings.fault_oom_at_step else None,
        "QLORA_FAULT_STEP_DELAY_S": f"{settings.fault_step_delay_s:g}"
        if settings.fault_step_delay_s else None,
    }
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain.items() if v]
    if uses_s3(spec):
        env += [
            {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": settings.s3_secret_name, "key": key}},
            }
            for key in (S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY)
        ]
    # The re-plan attempt from the pod's own label, so the runner's metrics show every retry.
    label = f"metadata.labels['{names.LABEL_ATTEMPT}']"
    env.append({"name": "QLORA_ATTEMPT", "valueFrom": {"fieldRef": {"fieldPath": label}}})
    # The pod's own namespace: the Pushgateway groups the job's final metrics by it.
    env.append(
        {"name": "QLORA_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    )
    # The pod's identity: a SIGTERM with it is preemption, without it a user's stop.
    env.append({"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    return env


COMPILE_CACHE_DIR = f"{CACHE_DIR}/compile"
"""Where ``settings.compile_cache_claim`` is mounted (kernel caches shared between jobs)."""


def _compile_dir(settings: Settings) -> str:
    return COMPILE_CACHE_DIR if settings.compile_cache_claim else CACHE_DIR


def _compile_cache_volume(settings: Settings) -> list[dict[str, Any]]:
    if not settings.compile_cache_claim:
        return []
    return [
        {
            "name": "compile-cache",
            "persistentVolumeClaim": {"claimName": settings.compile_cache_claim},
        }
    ]


def _volumes(spec: JobSpec, plan: Plan, config_map_name: str) -> list[dict[str, Any]]:
    shm_mib = shm_size_bytes(plan) // MIB
    sizes = volume_sizes(spec, plan)
    return [
        {
            "name": "config",
            "configMap": {
                "name": config_map_name,
                "items": [{"key": SPEC_KEY, "path": SPEC_KEY}, {"key": PLAN_KEY, "path": PLAN_KEY}],
            },
        },
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_mib}Mi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": f"{sizes.tmp // MIB}Mi"}},
        {"name": "cache", "emptyDir": {"sizeLimit": f"{sizes.cache // MIB}Mi"}},
        {"name": "work", "emptyDir": {"sizeLimit": f"{sizes.work // MIB}Mi"}},
    ]


class _BlockDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (the mounted job.yaml) as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML stream for ``kubectl apply -f -``."""
    docs = [
        yaml.dump(o, Dumper=_BlockDumper, sort_keys=False, width=100, allow_unicode=True)
        for o in objects
    ]
    return "---\n" + "---\n".join(docs)
