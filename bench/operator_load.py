"""The operator under load on the real control plane: 1,000 FineTuneJobs in 20 namespaces.

Runs ``tests/test_k8s_operator_load.py`` (which starts etcd, kube-apiserver, the scheduler and
the controller-manager 1.20.2 on 127.0.0.1 and a real ``qlora operator`` process) with a
larger burst, and writes to ``--out``:

- ``results.json``: what the test measured (see its docstring for each number);
- ``env.json``: machine, Python and library versions, the control plane's version, the command;
- ``pytest.log``: the run's output;
- ``loadavg.txt``: the machine's load average every 10 s while it ran.

Usage (from the repository root, after ``scripts/test.sh``'s set-up)::

    QLORA_KUBE_BIN_DIR=... python bench/operator_load.py --n 1000 --namespaces 20 \\
        --out bench/operator
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="FineTuneJobs in the burst")
    p.add_argument("--namespaces", type=int, default=20, help="namespaces they spread over")
    p.add_argument("--rest-s", type=float, default=60.0, help="seconds measured at rest")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "operator")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QLORA_LOAD_N": str(args.n), "QLORA_LOAD_NAMESPACES":
           str(args.namespaces), "QLORA_LOAD_OUT": str(args.out / "results.json"),
           "QLORA_LOAD_REST_S": str(args.rest_s)}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s",
           "tests/test_k8s_operator_load.py"]
    start, load_before = time.time(), os.getloadavg()
    done = threading.Event()

    def sample_load() -> None:  # the machine is shared: say how loaded it was throughout
        with open(args.out / "loadavg.txt", "w", encoding="utf-8") as f:
            while not done.wait(10.0 if f.tell() else 0.0):
                one, five, fifteen = os.getloadavg()
                f.write(f"{time.strftime('%H:%M:%S', time.gmtime())} {one:.2f} {five:.2f} "
                        f"{fifteen:.2f}\n")
                f.flush()

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    with open(args.out / "pytest.log", "w", encoding="utf-8") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            check=False).returncode
    done.set()
    sampler.join(timeout=5)
    bins = Path(os.environ.get("QLORA_KUBE_BIN_DIR", ""))
    version = subprocess.run([str(bins / "kube-apiserver"), "--version"], capture_output=True,
                             text=True, check=False).stdout.strip() if bins.name else "?"
    etcd = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                          check=False).stdout.splitlines()[:1]
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    info = {
        "command": " ".join(["python", "bench/operator_load.py", "--n", str(args.n),
                             "--namespaces", str(args.namespaces), "--rest-s",
                             str(args.rest_s)]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "wall_s": round(time.time() - start, 1),
        "exit_code": rc,
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(),
                    "note": "a 2-core VM shared with other work while this ran"},
        "python": platform.python_version(),
        "kube-apiserver": version, "etcd": etcd[0] if etcd else "?",
        "packages": {n: metadata.version(n) for n in ("kubernetes", "urllib3",
                                                      "prometheus-client", "pydantic")},
    }
    (args.out / "env.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(info, indent=2))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
