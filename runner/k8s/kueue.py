"""Which Kueue ResourceFlavors a rendered job can be admitted to.

Kueue picks a flavor for a workload by matching the pod's required node affinity against the
labels *that flavor defines*, and ignores affinity terms on keys the flavor does not define. A
flavor keyed on ``nvidia.com/gpu.product`` therefore passes every job, even one whose
``nvidia.com/gpu.memory Gt 79999`` affinity no node of that flavor satisfies: Kueue admits it,
injects the flavor's nodeSelector, and the pod never schedules. The chart's flavors
(``kueue.flavors`` in helm/qlora-runner/values.yaml) are keyed on the GPU-memory label, and
this module applies Kueue's rule to them, so ``qlora render --queue`` can say which flavors
the job can use before it is submitted. Pure code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runner.errors import SpecError
from runner.k8s.manifests import node_affinity
from runner.plan.types import Plan


@dataclass(frozen=True)
class Flavor:
    """A ResourceFlavor as the chart generates it: its name and node labels."""

    name: str
    node_labels: Mapping[str, str]


def flavors_from_values(doc: Any, memory_label: str, *, source: str) -> list[Flavor]:
    """The flavors of a Helm values document (``kueue.flavors``) or a bare list of entries.

    Raises:
        SpecError: The document holds no flavors or an entry lacks ``name``/``gpuMemoryMiB``.
    """
    entries = doc.get("kueue", {}).get("flavors") if isinstance(doc, Mapping) else doc
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"{source}: no kueue.flavors list (the chart's values shape)")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "name" not in entry or "gpuMemoryMiB" not in entry:
            raise SpecError(f"{source}: kueue.flavors[{i}]: needs name and gpuMemoryMiB")
        labels = {str(k): str(v) for k, v in (entry.get("nodeLabels") or {}).items()}
        labels[memory_label] = str(int(entry["gpuMemoryMiB"]))
        out.append(Flavor(str(entry["name"]), labels))
    return out


def _matches(expression: Mapping[str, Any], value: str) -> bool:
    op, values = expression["operator"], expression.get("values", [])
    if op == "In":
        return bool(value in values)
    if op == "NotIn":
        return bool(value not in values)
    if op in {"Gt", "Lt"}:
        try:
            number, bound = int(value), int(values[0])
        except (ValueError, IndexError):
            return False
        return number > bound if op == "Gt" else number < bound
    return bool(op == "Exists")


def usable(flavor: Flavor, plan: Plan, memory_label: str) -> bool:
    """Kueue's rule: every required affinity term on a key the flavor defines must match."""
    affinity = node_affinity(plan.gpu_class, memory_label)
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms", [{"matchExpressions": []}])
    for term in terms:  # terms are ORed; expressions in a term are ANDed
        if all(
            _matches(e, flavor.node_labels[e["key"]])
            for e in term.get("matchExpressions", [])
            if e["key"] in flavor.node_labels
        ):
            return True
    return False


def usable_flavors(flavors: Sequence[Flavor], plan: Plan, memory_label: str) -> list[str]:
    """Names of the flavors the job can be admitted to, in the ClusterQueue's order."""
    return [f.name for f in flavors if usable(f, plan, memory_label)]


def requirement(plan: Plan, memory_label: str) -> str:
    """What a flavor's node labels must say for this job, in one line."""
    gpu = plan.gpu_class
    if gpu.gpu_count == 0:
        return f"class {gpu.name} needs no GPU: any flavor"
    extra = "".join(f", {k}={v}" for k, v in sorted(gpu.node_labels.items()))
    return f"class {gpu.name}: {memory_label} >= {gpu.min_memory_mib}{extra}"
