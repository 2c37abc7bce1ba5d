"""ResourceQuota room for a Job's pod, and the `qlora status` table's columns (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from runner.k8s.listing import age, format_table, progress
from runner.k8s.quota import no_room, pod_usage, quantity

POD = {"containers": [{"resources": {"requests": {"cpu": "4", "memory": "24576Mi"},
                                     "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}}}]}


def quota(hard: dict[str, str], used: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": "team", "namespace": "ta"},
            "status": {"hard": hard, "used": used}}


@pytest.mark.parametrize(("text", "value"), [("500m", Decimal("0.5")), ("4", 4),
                                             ("256Mi", 256 * 2**20), ("1G", 10**9),
                                             ("1e3", 1000), ("1.5Gi", Decimal(3 * 2**29))],
                         ids=lambda v: str(v))
def test_quantities(text: str, value: Decimal) -> None:
    assert quantity(text) == value


def test_a_limit_only_resource_counts_as_requested() -> None:
    use = pod_usage(POD)
    assert use["requests.nvidia.com/gpu"] == 1 == use["limits.nvidia.com/gpu"]
    assert use["pods"] == 1 and use["requests.cpu"] == 4 and use["cpu"] == 4


@pytest.mark.parametrize(("hard", "used", "why"), [
    ({"requests.nvidia.com/gpu": "4"}, {"requests.nvidia.com/gpu": "4"},
     "requests.nvidia.com/gpu 1 requested, 4 of 4 used"),
    ({"pods": "10"}, {"pods": "10"}, "pods 1 requested, 10 of 10 used"),
    ({"requests.cpu": "6"}, {"requests.cpu": "2500m"}, "requests.cpu 4 requested, 2.5 of 6 used"),
    ({"limits.memory": "64Gi"}, {"limits.memory": "40Gi"}, "limits.memory"),
], ids=["gpus", "pods", "cpu", "memory"])
def test_no_room_names_the_quota_and_the_resource(hard: dict[str, str], used: dict[str, str],
                                                  why: str) -> None:
    msg = no_room([quota(hard, used)], POD)
    assert msg is not None and msg.startswith("resourcequota ta/team has no room: ") and why in msg


def test_room_left_or_unrelated_quotas_fit() -> None:
    assert no_room([quota({"requests.nvidia.com/gpu": "4"}, {"requests.nvidia.com/gpu": "3"})],
                   POD) is None
    assert no_room([quota({"count/secrets": "1"}, {"count/secrets": "1"})], POD) is None
    assert no_room([], POD) is None


def test_status_columns() -> None:
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    assert [age(t, now) for t in ("2026-12-01T11:59:18Z", "2026-12-01T11:50:00Z",
                                  "2026-12-01T06:00:00Z", "2026-11-20T12:00:00Z", None)] == [
        "42s", "10m", "6h", "11d", "-"]
    assert progress({"reason": "QuotaExceeded"}) == "QuotaExceeded"
    assert progress({"reason": "PodRunning", "progress": {"step": 40, "totalSteps": 200}}) == \
        "40/200"
    assert progress({"reason": "OutOfMemory", "retries": 1}) == "OutOfMemory(r1)"
    assert format_table([("NAME", "PHASE"), ("a-long-name", "Planned")]).splitlines() == [
        "NAME         PHASE", "a-long-name  Planned"]
