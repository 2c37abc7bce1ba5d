"""Does a Job's pod fit in its namespace's ResourceQuotas? Pure functions over plain dicts.

A tenant namespace usually carries a ResourceQuota (``requests.nvidia.com/gpu: 4``,
``pods: 10`` ...). When it has no room, the Job controller cannot create the pod and retries
on its own, and the FineTuneJob would only say "waiting for the job's pod". The operator
instead compares the pod's requests with each quota's ``status.hard - status.used`` before it
creates the Job (and while a Job has no pod yet) and, without room, keeps the FineTuneJob
``Pending`` with reason ``QuotaExceeded`` and a message naming the quota and the resource. It
does not retry on a timer: a change of the quota's usage (its watch) or the periodic resync
looks again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

_SUFFIX: dict[str, Decimal | int] = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "Pi": 2**50, "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")


def quantity(text: Any) -> Decimal:
    """A Kubernetes quantity (``500m``, ``4``, ``256Mi``, ``1e3``) as a number.

    Raises:
        ValueError: not a quantity.
    """
    m = _QUANTITY.match(str(text).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    try:
        return Decimal(m.group(1)) * Decimal(_SUFFIX[m.group(2)])
    except InvalidOperation as e:
        raise ValueError(f"not a Kubernetes quantity: {text!r}") from e


def pod_usage(pod_spec: Mapping[str, Any]) -> dict[str, Decimal]:
    """What one pod counts against quotas: ``pods``, ``requests.*`` and ``limits.*``
    (a resource with only a limit is requested at that limit, as the API server defaults it)."""
    out: dict[str, Decimal] = {"pods": Decimal(1), "count/pods": Decimal(1)}
    for c in pod_spec.get("containers") or []:
        res = c.get("resources") or {}
        limits = res.get("limits") or {}
        requests = {**limits, **(res.get("requests") or {})}
        for name, value in requests.items():
            for key in (f"requests.{name}", name):
                out[key] = out.get(key, Decimal(0)) + quantity(value)
        for name, value in limits.items():
            out[f"limits.{name}"] = out.get(f"limits.{name}", Decimal(0)) + quantity(value)
    return out


def _fmt(value: Decimal) -> str:
    return format(value.normalize(), "f")


def no_room(quotas: Sequence[Mapping[str, Any]], pod_spec: Mapping[str, Any]) -> str | None:
    """Why the pod does not fit (one line naming the quota), or None when it fits.

    Args:
        quotas: The namespace's ResourceQuota objects (with ``status.hard`` / ``status.used``).
        pod_spec: The Job's ``spec.template.spec``.
    """
    need = pod_usage(pod_spec)
    for q in sorted(quotas, key=lambda q: str(q["metadata"]["name"])):
        st = q.get("status") or {}
        hard = st.get("hard") or (q.get("spec") or {}).get("hard") or {}
        used = st.get("used") or {}
        for resource, limit in sorted(hard.items()):
            if resource not in need:
                continue
            try:
                cap, have = quantity(limit), quantity(used.get(resource, "0"))
            except ValueError:
                continue
            if have + need[resource] > cap:
                meta = q["metadata"]
                return (f"resourcequota {meta.get('namespace')}/{meta['name']} has no room: "
                        f"{resource} {_fmt(need[resource])} requested, {_fmt(have)} of "
                        f"{_fmt(cap)} used; the job starts when the namespace's running jobs "
                        "free their share")
    return None
