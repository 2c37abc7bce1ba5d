"""What a rendered Job can really do in a pod: where its paths point, and how much disk it needs.

``qlora run`` on a workstation happily reads ``./data.jsonl`` and writes ``file://out``; the
same spec rendered into a Job cannot. The pod has no view of the submitting machine, and its
only writable places are emptyDirs that vanish with it. So ``qlora render`` and ``qlora
submit`` refuse specs whose model, data or output would only exist on the submitting machine
or in the pod's own emptyDirs (:func:`local_path_problems`).

Decision on absolute local paths (``/data/x.jsonl``, ``file:///data/adapters``): the rendered
Job mounts no hostPath or PersistentVolume, so such a path cannot exist in the pod either and is
refused as well; ``s3://`` (and ``hf://`` for models) is what a pod can reach. A team that
mounts shared storage into its pods by other means (a mutating webhook, a patched manifest)
renders with ``qlora render --allow-local-paths`` and owns that mount.

The API server rejects a ConfigMap above 1 MiB, and Kubernetes evicts a pod whose emptyDirs
outgrow the node's free disk, so the disk the job needs is part of the plan too
(:func:`volume_sizes`): the model download (in 16-bit, as published) lands in the work
directory (``s3://``) or the Hugging Face cache (``hf://``), checkpoints (LoRA weights and
optimizer state, the last two kept) in the work directory. Pure code: no Kubernetes client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from runner.errors import SpecError
from runner.plan.estimator import NF4_DQ_BYTES_PER_PARAM
from runner.plan.types import GIB, MIB, Plan
from runner.spec import JobSpec

# The API server's limit on one object (etcd's request limit): data + metadata of a ConfigMap.
MAX_CONFIG_MAP_BYTES = 1024 * 1024
# Checkpoints kept at once: the last complete one while the next is written.
CHECKPOINTS_KEPT = 2
# Room for what is not planned: the published adapter, logs, Triton/Inductor caches, tokenizer.
WORK_HEADROOM_BYTES = 2 * GIB
CACHE_HEADROOM_BYTES = 2 * GIB
TMP_BYTES = 2 * GIB
# The pod's emptyDir mount points (runner.k8s.manifests mounts them; kept here to stay acyclic).
POD_EMPTY_DIRS = ("/tmp", "/var/cache/qlora", "/var/lib/qlora", "/dev/shm")


@dataclass(frozen=True)
class VolumeSizes:
    """Size limits of the pod's writable emptyDirs, bytes (MiB-aligned)."""

    tmp: int
    cache: int
    work: int

    @property
    def total(self) -> int:
        """What the pod requests as ``ephemeral-storage``."""
        return self.tmp + self.cache + self.work


def local_path_problems(spec: JobSpec, *, work_dirs: tuple[str, ...] = ()) -> list[str]:
    """``path: message`` lines for the spec's paths a pod cannot reach.

    Args:
        spec: The job spec.
        work_dirs: The pod's emptyDir mount points (writes there vanish with the pod).
    """
    body = spec.spec
    fields = [("spec.model.source", body.model.source)]
    fields += [(f"spec.dataset.sources[{i}]", s) for i, s in enumerate(body.dataset.sources)]
    fields.append(("spec.output.uri", body.output.uri))
    problems = []
    for path, value in fields:
        if value.startswith(("s3://", "hf://")):
            continue
        local = value.removeprefix("file://")
        where = "the submitting machine"
        if any(local == d or local.startswith(d.rstrip("/") + "/") for d in work_dirs):
            where = "the pod's own emptyDir, which is deleted with the pod"
        elif not local.startswith("/"):
            where = "the submitting machine (a relative path)"
        problems.append(
            f"{path}: '{value}' is a path on {where}; a Kubernetes pod cannot read or keep it. "
            "Use an s3:// URI"
            + (" (or hf:// for the model)" if path.endswith("model.source") else "")
        )
    return problems


def model_download_bytes(plan: Plan) -> int:
    """Bytes of the model's 16-bit weights, as downloaded, from the plan's weight terms."""
    terms = {t.name: t.bytes for t in plan.vram_terms}
    if "weights_16bit" in terms:
        return terms["weights_16bit"]
    # nf4 with double quantization is the smallest per-param size: dividing by it never
    # under-counts the parameters
    quantized = terms.get("weights_4bit", 0) / NF4_DQ_BYTES_PER_PARAM
    unquantized = terms.get("weights_unquantized", 0)  # 2 or 4 B/param; the file holds 2
    return int(2 * quantized + unquantized)


def checkpoint_bytes(plan: Plan) -> int:
    """One resumable checkpoint: LoRA weights plus optimizer state."""
    terms = {t.name: t.bytes for t in plan.vram_terms}
    return terms.get("lora_params", 0) + terms.get("optimizer_state", 0)


def volume_sizes(spec: JobSpec, plan: Plan) -> VolumeSizes:
    """emptyDir size limits sized from the plan (see the module docstring)."""
    download = model_download_bytes(plan)
    source = spec.spec.model.source
    in_work = download if source.startswith("s3://") else 0
    in_cache = download if source.startswith("hf://") else 0
    work = in_work + CHECKPOINTS_KEPT * checkpoint_bytes(plan) + WORK_HEADROOM_BYTES
    cache = in_cache + CACHE_HEADROOM_BYTES
    return VolumeSizes(tmp=_mib(TMP_BYTES), cache=_mib(cache * 1.1), work=_mib(work * 1.1))


def config_map_problems(config_map: dict[str, Any]) -> list[str]:
    """A line when the ConfigMap is larger than the API server accepts."""
    size = sum(len(k) + len(v.encode()) for k, v in config_map.get("data", {}).items())
    if size <= MAX_CONFIG_MAP_BYTES - 16 * 1024:  # room for metadata
        return []
    name = config_map["metadata"]["name"]
    return [
        f"ConfigMap {name}: its data is {size / MIB:.2f} MiB; the API server refuses objects "
        "over 1 MiB. Keep the spec small: put chat templates and data in files on s3://"
    ]


def _mib(n: float) -> int:
    return math.ceil(n / MIB) * MIB


def refuse_local_paths(spec: JobSpec, *, allow: bool = False) -> None:
    """Raise :class:`SpecError` (exit 2) listing the paths a pod cannot reach.

    Args:
        spec: The job spec about to be rendered into a Job.
        allow: ``--allow-local-paths``: absolute paths are the user's own mounts; relative
            paths and paths into the pod's emptyDirs are refused even then.
    """
    problems = local_path_problems(spec, work_dirs=POD_EMPTY_DIRS)
    if allow:
        problems = [p for p in problems if "a relative path" in p or "emptyDir" in p]
    if problems:
        raise SpecError("the spec names paths a Kubernetes pod cannot reach", problems)
