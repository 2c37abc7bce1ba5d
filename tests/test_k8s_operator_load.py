"""A burst of FineTuneJobs on the real control plane, against a real ``qlora operator``
process, with the numbers of the committed 1,000-job run (bench/operator/) as regression
bounds for a 200-job burst.

``bench/operator_load.py`` runs this same test with ``QLORA_LOAD_N=1000`` and 20 namespaces
and writes what it measured to ``bench/operator/``; CI runs it with 200 jobs in 4 namespaces
and checks the bounds below. Measured:

- time from the first create until every FineTuneJob is Planned and has its Job;
- reconcile duration p50/p99 (``histogram_quantile`` over the operator's own histogram) and
  creation-to-Planned latency p50/p99 (per FineTuneJob, from the server's timestamps);
- the operator process's peak resident memory (VmHWM);
- API requests per second the operator sends during the burst and at rest (its own counter
  ``qlora_operator_api_requests_total``), and all clients' (``apiserver_request_total``);
- then every Job's pod completed (pod status patched as a kubelet would, the real Job
  controller completes the Job): time until every FineTuneJob is Succeeded.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from runner.k8s import names
from runner.k8s.status import termination_message
from tests.fixtures.kube import ControlPlane
from tests.test_k8s_operator import crd, example, ftj_path  # noqa: F401 - fixture reuse

N = int(os.environ.get("QLORA_LOAD_N", "200"))
NAMESPACES = int(os.environ.get("QLORA_LOAD_NAMESPACES", "4"))
OUT = os.environ.get("QLORA_LOAD_OUT")
REST_S = float(os.environ.get("QLORA_LOAD_REST_S", "20"))

# Regression bounds for the 200-job CI burst, from the committed runs in bench/operator/ on a
# shared 2-core machine (load average 8-23), about twice the worst 200-job figure:
#   200 jobs (run3 / run4 / run6): Planned in 79 / 43 / 29 s, reconcile p99 5.7 / 2.3 / 2.0 s,
#   peak RSS 83 / 84 / 85 MiB, at rest 1.0 request/s, none but the Lease's, Succeeded in 33 /
#   26 / 25 s, `qlora status -A` 5.7 / 4.6 / 3.6 s, 5.9 / 6.1 / 6.0 requests per FineTuneJob,
#   at rest 3.2 / 1.1 / 5.1 s after the last Planned;
#   1,000 jobs (run5, after the at-rest fix): Planned in 187 s, p99 2.4 s, 189 MiB, at rest
#   0.97 request/s (all the Lease), Succeeded in 123 s, status -A 7.3 s, 5.75 requests per job.
BOUNDS = {
    "planned_s": 160.0,
    "reconcile_p99_s": 10.0,  # the histogram's bucket edge above the worst (5.7 s)
    "peak_rss_mib": 160.0,
    "rest_operator_rps": 1.2,  # the Lease renewal (a get and an update every 2 s) is 1/s
    "rest_operator_rps_without_lease": 0.1,  # nothing else: one request in 20 s is 0.05
    "settle_after_planned_s": 60.0,  # a hot loop never comes to rest (run2)
    "succeeded_s": 90.0,
    "qlora_status_all_namespaces_s": 12.0,
    "qlora_status_during_burst_s": 12.0,  # run7: 2.3 s (measured there first)
    # per FineTuneJob: a fresh read of it and of its Job, the ConfigMap and Job applies, and
    # the status writes (Planned, then the pod's Pending message): 5 to 6
    "burst_operator_requests_per_job": 8.0,
}

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.slow,
              pytest.mark.timeout(1800 if N > 200 else 600)]


def _metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        out: dict[str, float] = {}
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


def _requests(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("qlora_operator_api_requests_total{"))


def _quantile(m: dict[str, float], q: float) -> float:
    """Prometheus' histogram_quantile over qlora_operator_reconcile_duration_seconds."""
    buckets: dict[float, float] = {}
    for k, v in m.items():
        if k.startswith("qlora_operator_reconcile_duration_seconds_bucket{"):
            le = k.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + v
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if b == float("inf"):
                return prev_bound
            span = buckets[b] - prev_count
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / span if span else 1)
        prev_bound, prev_count = b, buckets[b]
    return prev_bound


def _rss_peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ts(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").timestamp()


def _phase_count(cp: ControlPlane, nss: list[str], phase: str) -> tuple[int, list[dict[str, Any]]]:
    items = []
    for ns in nss:  # one list per namespace, like `qlora status`
        items += cp.request("GET", ftj_path(ns))["items"]
    done = [i for i in items if (i.get("status") or {}).get("phase") == phase
            and (i.get("status") or {}).get("jobName")]
    return len(done), items


def test_a_burst_of_finetunejobs_is_planned_and_completed_within_bounds(
    kube_control_plane: ControlPlane, crd: None,  # noqa: F811
) -> None:
    cp = kube_control_plane
    home = cp.create_namespace("load-op")
    nss = [cp.create_namespace("load") for _ in range(NAMESPACES)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update(KUBECONFIG=str(cp.kubeconfig), QLORA_NAMESPACE=home,
               QLORA_OPERATOR_NAMESPACES=json.dumps(nss), QLORA_OPERATOR_METRICS_PORT="0",
               QLORA_OPERATOR_BIND_ADDRESS="127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "runner", "--log-format", "json",
                             "operator"], env=env, text=True, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    port_box: list[int] = []
    errors: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if '"operator endpoint listening"' in line:
                port_box.append(int(json.loads(line)["port"]))
            elif '"level": "error"' in line:
                errors.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc_env_logging = {"QLORA_LOAD_N": N, "namespaces": NAMESPACES}
    try:
        cp.wait_for("the operator's endpoint", lambda: port_box, timeout_s=60)
        port = port_box[0]
        cp.wait_for("the operator to lead", lambda: _metrics(port).get(
            "qlora_operator_leader") == 1.0, timeout_s=60)
        base_ops, base_all = _requests(_metrics(port)), sum(cp.apiserver_requests().values())

        docs = []
        for i in range(N):
            doc = example(f"burst-{i:04d}")
            docs.append((nss[i % NAMESPACES], doc))
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda d: cp.request("POST", ftj_path(d[0]), d[1]), docs))
        created_s = time.monotonic() - t0
        # `qlora status -A` during the burst, as a user watching it would (one list call).
        status_env = {k: v for k, v in env.items() if not k.startswith("QLORA_OPERATOR")}
        during: list[tuple[float, subprocess.CompletedProcess[str]]] = []

        def status_now() -> None:
            t = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "runner", "status", "-A"],
                                 env=status_env, text=True, capture_output=True, timeout=120,
                                 check=False)
            during.append((time.monotonic() - t, out))

        watcher = threading.Thread(target=status_now, daemon=True)
        watcher.start()
        _, items = cp.wait_for(
            f"all {N} FineTuneJobs Planned", lambda: (lambda c: c if c[0] >= N else None)(
                _phase_count(cp, nss, "Planned")), timeout_s=BOUNDS["planned_s"] * 4,
            every_s=1.0)
        planned_s = time.monotonic() - t0
        watcher.join(timeout=130)
        ((status_burst_s, seen),) = during
        assert seen.returncode == 0, seen.stderr
        assert sum(" burst-" in f" {ln}" for ln in seen.stdout.splitlines()) == N
        jobs = sum(len(cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"])
                   for ns in nss)
        assert jobs == N, f"{jobs} Jobs for {N} FineTuneJobs"
        burst = _metrics(port)
        burst_ops, burst_all = _requests(burst), sum(cp.apiserver_requests().values())
        lat = sorted(_ts(next(c["lastTransitionTime"] for c in i["status"]["conditions"]
                              if c["type"] == "Planned")) - _ts(i["metadata"]["creationTimestamp"])
                     for i in items)

        # At rest: once the queue is empty and no status write happened for 5 s (the pods'
        # Pending messages still arrive after every FineTuneJob is Planned).
        settle0, quiet = time.monotonic(), [time.monotonic(), -1.0]

        def settled() -> bool:
            m = _metrics(port)
            writes = m.get('qlora_operator_api_requests_total{resource="finetunejobs",'
                           'verb="patch"}', 0.0)
            if writes != quiet[1] or m.get("qlora_operator_queue_depth", 0.0) > 0:
                quiet[:] = [time.monotonic(), writes]
            return time.monotonic() - quiet[0] >= 5

        cp.wait_for("the operator to come to rest", settled, every_s=1.0,
                    timeout_s=BOUNDS["settle_after_planned_s"] * (15 if N > 200 else 2))
        settle_s = time.monotonic() - settle0 - 5
        rest0, rest0_all, r0 = _metrics(port), sum(cp.apiserver_requests().values()), \
            time.monotonic()
        time.sleep(REST_S)
        rest_s = time.monotonic() - r0
        rest1 = _metrics(port)
        rest_ops = (_requests(rest1) - _requests(rest0)) / rest_s
        rest_all = (sum(cp.apiserver_requests().values()) - rest0_all) / rest_s
        rest_by = {k.split("{", 1)[1].rstrip("}"): v - rest0.get(k, 0.0)
                   for k, v in rest1.items()
                   if k.startswith("qlora_operator_api_requests_total{") and v > rest0.get(k, 0)}
        rest_lease = sum(v for k, v in rest_by.items() if '"leases"' in k) / rest_s

        # `qlora status -A` at rest: one list call for all of them.
        t_status = time.monotonic()
        shown = subprocess.run([sys.executable, "-m", "runner", "status", "-A"], env=status_env,
                               text=True, capture_output=True, timeout=120, check=False)
        status_s = time.monotonic() - t_status
        assert shown.returncode == 0, shown.stderr
        assert sum(" burst-" in f" {ln}" for ln in shown.stdout.splitlines()) >= N

        # Completions: each Job's pod succeeds (as a kubelet reports it); the real Job
        # controller completes the Job, the operator mirrors it.
        def complete(ns: str) -> None:
            for pod in cp.pods(ns, f"{names.LABEL_MANAGED_BY}=qlora-operator"):
                job = pod["metadata"]["labels"][names.LABEL_JOB]
                cp.play_kubelet(ns, pod["metadata"]["name"], phase="Succeeded",
                                message=termination_message(succeeded=True,
                                                            adapter_uri=f"s3://a/{job}"))

        t1 = time.monotonic()
        with ThreadPoolExecutor(min(8, NAMESPACES)) as pool:
            list(pool.map(complete, nss))
        cp.wait_for(f"all {N} FineTuneJobs Succeeded", lambda: _phase_count(
            cp, nss, "Succeeded")[0] >= N, timeout_s=BOUNDS["succeeded_s"] * 4, every_s=1.0)
        succeeded_s = time.monotonic() - t1
        final = _metrics(port)
        done_items = _phase_count(cp, nss, "Succeeded")[1]
        assert all(i["status"]["adapterURI"] == f"s3://a/{i['metadata']['name']}"
                   for i in done_items)
        result = {
            "n": N, "namespaces": NAMESPACES, "create_s": round(created_s, 2),
            "planned_s": round(planned_s, 2),
            "reconcile_p50_s": round(_quantile(burst, 0.5), 4),
            "reconcile_p99_s": round(_quantile(burst, 0.99), 4),
            "create_to_planned_p50_s": statistics.median(lat),
            "create_to_planned_p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "reconciles_during_burst": sum(v for k, v in burst.items() if k.startswith(
                "qlora_operator_reconcile_duration_seconds_count")),
            "operator_requests_during_burst": burst_ops - base_ops,
            "burst_operator_rps": round((burst_ops - base_ops) / planned_s, 2),
            "burst_operator_requests_per_job": round((burst_ops - base_ops) / N, 2),
            "burst_apiserver_rps_all_clients": round((burst_all - base_all) / planned_s, 2),
            "settle_after_planned_s": round(settle_s, 1),
            "rest_window_s": round(rest_s, 1),
            "rest_operator_rps": round(rest_ops, 3),
            "rest_operator_rps_without_lease": round(rest_ops - rest_lease, 3),
            "rest_requests_by_verb_resource": rest_by,
            "rest_apiserver_rps_all_clients": round(rest_all, 2),
            "succeeded_s": round(succeeded_s, 2),
            "qlora_status_all_namespaces_s": round(status_s, 2),
            "qlora_status_during_burst_s": round(status_burst_s, 2),
            "retries_total": final.get("qlora_operator_queue_retries_total", 0.0),
            "errors_total": final.get("qlora_operator_reconcile_errors_total", 0.0),
            "peak_rss_mib": round(_rss_peak_mib(proc.pid), 1),
            "requests_by_verb_resource": {k.split("{", 1)[1].rstrip("}"): v for k, v in
                                          final.items()
                                          if k.startswith("qlora_operator_api_requests_total{")},
        }
        print(json.dumps(result, indent=2))
        if OUT:
            Path(OUT).write_text(json.dumps({**result, "settings": proc_env_logging},
                                            indent=2) + "\n", encoding="utf-8")
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                Path(OUT).with_name("metrics.txt").write_bytes(r.read())
        if N <= 200:
            for key, bound in BOUNDS.items():
                assert result[key] <= bound, f"{key} = {result[key]} > {bound}: {result}"
        assert not errors, errors[:5]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        reader.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()
        for ns in nss:  # collections at once: no GPU stays held for later tests
            cp.request("DELETE", f"/apis/batch/v1/namespaces/{ns}/jobs",
                       {"propagationPolicy": "Orphan"})
            cp.request("DELETE", f"/api/v1/namespaces/{ns}/pods", {"gracePeriodSeconds": 0})
