"""Summarise a CUDA memory snapshot (``QLORA_CUDA_MEMORY_HISTORY``) as text.

    python3 bench/memory_snapshot_summary.py SNAPSHOT.pickle [--top 40]

Prints the segments the allocator holds at the end (how many, expandable or not, sizes, how
much of each is allocated), then every event that changed reserved memory (a segment allocated
or mapped, freed or unmapped) with the running reserved total and the Python frames that asked
for it, then the largest single allocations. Reserved memory that grows while allocated does
not is explained by the second list: which requests found no free block big enough.
"""

from __future__ import annotations

import argparse
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

GIB = 1024**3
GROW = {"segment_alloc": 1, "segment_map": 1, "segment_free": -1, "segment_unmap": -1}


def frames(event: dict[str, Any], n: int = 4) -> str:
    """The innermost ``n`` frames outside torch itself, innermost first."""
    out = []
    for f in event.get("frames", []):
        name = str(f.get("filename", ""))
        if not name.endswith(".py"):  # C++ frames of a snapshot recorded with stacks="all"
            continue
        if "/torch/" in name and "/_dynamo/" not in name and "/_inductor/" not in name:
            continue
        out.append(f"{Path(name).name}:{f.get('line')}:{f.get('name')}")
        if len(out) == n:
            break
    return " < ".join(out) or "(no python frame)"


def summarize(snapshot: dict[str, Any], top: int) -> list[str]:
    lines = []
    segs = snapshot.get("segments", [])
    exp = Counter(bool(s.get("is_expandable", False)) for s in segs)
    lines.append(
        f"segments: {len(segs)}, expandable {dict(exp)}, "
        f"{sum(s['total_size'] for s in segs) / GIB:.2f} GiB reserved, "
        f"{sum(s.get('allocated_size', 0) for s in segs) / GIB:.2f} GiB allocated"
    )
    for s in sorted(segs, key=lambda s: -s["total_size"])[:top]:
        lines.append(
            f"  segment {s['total_size'] / GIB:8.3f} GiB, allocated "
            f"{s.get('allocated_size', 0) / GIB:8.3f}, stream {s.get('stream')}, "
            f"blocks {len(s.get('blocks', []))}, pool {s.get('segment_pool_id')}"
        )
    for dev, trace in enumerate(snapshot.get("device_traces", [])):
        if not trace:
            continue
        lines.append(f"device {dev}: {len(trace)} events, {Counter(e['action'] for e in trace)}")
        reserved = 0
        t0 = trace[0].get("time_us", 0)
        for e in trace:
            sign = GROW.get(e["action"])
            if sign is None:
                continue
            reserved += sign * e["size"]
            if e["size"] >= 64 * 1024**2 or e["action"] in ("segment_free", "segment_unmap"):
                lines.append(
                    f"  t+{(e.get('time_us', 0) - t0) / 1e6:7.2f}s {e['action']:14s} "
                    f"{e['size'] / GIB:7.3f} GiB -> reserved {reserved / GIB:7.2f} GiB, "
                    f"stream {e.get('stream')}  {frames(e)}"
                )
        allocs = sorted((e for e in trace if e["action"] == "alloc"), key=lambda e: -e["size"])
        lines.append(f"  largest allocations ({len(allocs)} in the trace):")
        for e in allocs[:top]:
            lines.append(f"    {e['size'] / GIB:7.3f} GiB stream {e.get('stream')}  {frames(e)}")
        ooms = [e for e in trace if e["action"] == "oom"]
        if ooms:
            lines.append(f"  {len(ooms)} oom events")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ns = ap.parse_args()
    try:
        with ns.snapshot.open("rb") as fh:
            snapshot = pickle.load(fh)  # our own run's snapshot
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        ap.error(f"{ns.snapshot}: not a readable snapshot pickle: {e}")  # exit 2
    if not isinstance(snapshot, dict) or "segments" not in snapshot:
        ap.error(f"{ns.snapshot}: not a CUDA memory snapshot (no 'segments')")
    print("\n".join(summarize(snapshot, ns.top)))


if __name__ == "__main__":
    main()
