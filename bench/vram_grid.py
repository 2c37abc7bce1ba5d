"""Peak VRAM of QLoRA training over a grid of shapes, sequence lengths and micro batches.

The planner (``runner.plan``) estimates peak GPU memory from a spec; this script produces the
measurements it is calibrated and tested against. For each model shape and backend one worker
process loads the randomly initialised checkpoint in 4 bit (nf4, double quant, bf16 compute),
adds LoRA r 16 on all seven projections, and for each (seq, micro batch) point trains a few
optimizer steps through TRL's ``SFTTrainer`` (the path ``qlora run`` takes), recording
``torch.cuda.max_memory_reserved``/``max_memory_allocated`` (peaks reset and cache emptied
between points), the host RSS peak (Unsloth offloads checkpointed activations to host RAM) and
step time. An out-of-memory error is a data point (``oom: true``), not a failure.

Backends:
  * ``unsloth``: ``FastLanguageModel.from_pretrained(load_in_4bit=True)`` +
    ``get_peft_model(use_gradient_checkpointing="unsloth")``.
  * ``hf``: transformers + bitsandbytes nf4 double quant + SDPA + peft + TRL with non-reentrant
    gradient checkpointing (no ``prepare_model_for_kbit_training``: it upcasts the unquantized
    weights to fp32, which recent TRL recipes no longer do).

Usage (GPU host): ``python3 bench/vram_grid.py --out DIR --models DIR [--lanes ...]``; the
driver writes ``DIR/env.json`` and appends one JSON line per point to ``DIR/results.jsonl``.
``python3 bench/vram_grid.py worker ...`` is the per-(model, backend) process.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQS = [512, 2048, 8192]
BATCHES = [1, 2, 4, 8]
BIG_POINT_TOKENS = 32768  # points at least this large run one at a time on the card
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTORCH_ALLOC_CONF": "",
}


# ----------------------------------------------------------------------------- worker side


class RssSampler:
    """Samples this process's resident set size in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval_s: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def load_model(backend: str, model_dir: str, max_seq: int, r: int) -> tuple[Any, Any]:
    """Load ``model_dir`` in nf4 and attach LoRA on all seven projections."""
    import torch

    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(
            model_name=model_dir,
            max_seq_length=max_seq,
            dtype=torch.bfloat16,
            load_in_4bit=True,
            local_files_only=True,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=r,
            lora_alpha=r,
            lora_dropout=0.0,
            target_modules=TARGETS,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=3407,
            max_seq_length=max_seq,
        )
        return model, tok
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device_map: Any = {"": 0} if torch.cuda.is_available() else None
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quant,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        device_map=device_map,
    )
    model.config.use_cache = False
    lora = LoraConfig(
        r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model, tok


def _random_rows(n: int, seq: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    high = min(vocab, 128000)  # stay clear of Llama 3's special-token ids
    return torch.randint(0, high, (n, seq), generator=g).tolist()


def train_trl(model: Any, tok: Any, backend: str, seq: int, mb: int, steps: int) -> list[float]:
    """Run ``steps`` optimizer steps through TRL's SFTTrainer; return per-step wall times."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import torch

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    rows = _random_rows(steps * mb, seq, model.config.vocab_size, seed=seq * 31 + mb)
    data = Dataset.from_dict({"input_ids": rows})
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        cfg: dict[str, Any] = dict(
            output_dir=out,
            per_device_train_batch_size=mb,
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=2e-4,
            lr_scheduler_type="linear",
            warmup_steps=0,
            optim="adamw_8bit",
            weight_decay=0.01,
            max_grad_norm=1.0,
            bf16=torch.cuda.is_available(),
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            max_length=seq,
            packing=False,
            seed=3407,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        if backend == "hf":
            cfg["gradient_checkpointing"] = True
            cfg["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        if not torch.cuda.is_available():
            cfg["use_cpu"] = True
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**cfg),
            train_dataset=data,
            processing_class=tok,
            callbacks=[timer],
        )
        trainer.train()
        del trainer
    return [b - a for a, b in zip(timer.marks, timer.marks[1:], strict=False)]


def train_plain(model: Any, seq: int, mb: int, steps: int) -> list[float]:
    """Fallback: a plain forward/backward/AdamW-8bit loop (used if TRL fails on a backend)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if torch.cuda.is_available():
        import bitsandbytes as bnb

        opt: Any = bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    if hasattr(model, "gradient_checkpointing_enable") and not getattr(
        model, "_unsloth_gradient_checkpointing", None
    ):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    device = next(p.device for p in model.parameters())
    times = []
    for i in range(steps):
        ids = torch.tensor(_random_rows(mb, seq, model.config.vocab_size, seed=i), device=device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del opt
    return times


@contextlib.contextmanager
def big_point_lock(tokens: int, lock_path: str | None) -> Any:
    """Hold a card-wide file lock while a large point runs, so two never overlap."""
    if lock_path is None or tokens < BIG_POINT_TOKENS:
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return "out of memory" in text or "outofmemory" in text


def run_worker(ns: argparse.Namespace) -> int:
    """Load one (model, backend) and measure every requested point, appending JSON lines."""
    if ns.backend == "unsloth":
        import unsloth  # noqa: F401  (must precede transformers, trl and peft)
    import torch

    cuda = torch.cuda.is_available()
    points = [tuple(int(x) for x in p.split("x")) for p in ns.points.split(",")]
    max_seq = max(s for s, _ in points)
    config = json.loads((Path(ns.model_dir) / "config.json").read_text())
    t0 = time.time()
    model, tok = load_model(ns.backend, ns.model_dir, max_seq, ns.r)
    print(f"[{ns.shape}/{ns.backend}] loaded in {time.time() - t0:.1f}s", flush=True)
    trainer_kind = ns.trainer
    for seq, mb in points:
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tokens = seq * mb
        steps = ns.steps if tokens < 65536 else max(2, ns.steps - 1)
        oom, error, times = False, None, []
        with big_point_lock(tokens, ns.lock), RssSampler() as rss:
            rss_before = rss.peak
            try:
                if trainer_kind == "trl":
                    times = train_trl(model, tok, ns.backend, seq, mb, steps)
                else:
                    times = train_plain(model, seq, mb, steps)
            except Exception as exc:  # measured outcome: classify and record it
                if _is_oom(exc):
                    oom = True
                else:
                    error = f"{type(exc).__name__}: {exc}"[:800]
            if cuda:
                torch.cuda.synchronize()
        if error and trainer_kind == "trl" and ns.fallback_plain:
            print(f"[{ns.shape}/{ns.backend}] TRL failed ({error}); plain loop", flush=True)
            trainer_kind = "plain"
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            error = None
            with big_point_lock(tokens, ns.lock), RssSampler() as rss:
                try:
                    times = train_plain(model, seq, mb, steps)
                except Exception as exc:  # measured outcome, as above
                    oom = _is_oom(exc)
                    error = None if oom else f"{type(exc).__name__}: {exc}"[:800]
        steady = times[1:] or times
        rec = {
            "model": ns.shape,
            "config": config,
            "backend": ns.backend,
            "seq": seq,
            "micro_batch": mb,
            "r": ns.r,
            "gradient_checkpointing": True,
            "max_memory_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
            "max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
            "host_rss_bytes": rss.peak,
            "oom": oom,
            "step_time_s": None if (oom or error or not steady) else statistics.median(steady),
            # Extra context (not used by the planner's test):
            "host_rss_before_bytes": rss_before,
            "steps": steps,
            "trainer": trainer_kind,
            "tokens_per_step": tokens,
            "concurrent": ns.concurrent,
            "error": error,
        }
        line = json.dumps(rec, sort_keys=False) + "\n"
        fd = os.open(ns.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        gib = rec["max_memory_reserved_bytes"] / 2**30
        print(
            f"[{ns.shape}/{ns.backend}] seq {seq} mb {mb}: reserved {gib:.2f} GiB oom={oom} "
            f"step={rec['step_time_s']} err={error}",
            flush=True,
        )
    return 0


# ----------------------------------------------------------------------------- driver side


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ["torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate",
                 "datasets", "unsloth", "unsloth_zoo", "triton"]:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def matmul_tflops(n: int = 8192, reps: int = 20) -> float | None:
    """bf16 n×n×n matmul rate on random data (mean over ``reps`` after warm-up), in TFLOP/s."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    secs = start.elapsed_time(end) / 1000 / reps
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / secs / 1e12


def environment(command: str) -> dict[str, Any]:
    """Card, driver, CUDA and library versions, plus the measured bf16 matmul rate."""
    import torch

    env: dict[str, Any] = {"command": command, "versions": _versions(), "python": sys.version}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "card": props.name,
            "total_memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            env["driver"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                text=True,
            ).strip()
        env["bf16_matmul_tflops_8192"] = matmul_tflops()
    import platform

    env["host"] = {"cpus": os.cpu_count(), "machine": platform.machine()}
    return env


def _wait_ready(model_dir: Path, deadline: float) -> bool:
    while time.time() < deadline:
        if (model_dir / "READY").exists():
            return True
        time.sleep(2)
    return False


def run_lane(jobs: list[tuple[str, str, str]], ns: argparse.Namespace, deadline: float,
             log: Any, log_lock: threading.Lock) -> None:
    """Run (shape, backend, points) workers one after another until the deadline."""
    for shape, backend, points in jobs:
        mdir = Path(ns.models) / shape
        if not _wait_ready(mdir, deadline):
            break
        remaining = deadline - time.time()
        if remaining < 30:
            break
        cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--shape", shape,
               "--backend", backend, "--model-dir", str(mdir), "--points", points,
               "--results", str(Path(ns.out) / "results.jsonl"), "--steps", str(ns.steps),
               "--lock", str(Path(ns.models) / "big.lock"), "--fallback-plain"]
        if ns.concurrent:
            cmd.append("--concurrent")
        workdir = Path(tempfile.mkdtemp(prefix=f"w-{shape}-{backend}-"))
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env=os.environ | OFFLINE_ENV)
        timer = threading.Timer(remaining, proc.kill)
        timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            with log_lock:
                log.write(f"{shape}/{backend}| {line}")
                log.flush()
        proc.wait()
        timer.cancel()
        with log_lock:
            log.write(f"{shape}/{backend}| exit {proc.returncode}\n")
            log.flush()


def default_points(shape: str) -> str:
    if "70b" in shape:
        return "512x1,2048x1,8192x1"
    return ",".join(f"{s}x{b}" for s in SEQS for b in BATCHES)


def run_driver(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(ns.models).mkdir(parents=True, exist_ok=True)
    deadline = time.time() + ns.budget_s
    command = " ".join([Path(sys.executable).name, *sys.argv])
    (out / "env.json").write_text(json.dumps(environment(command), indent=2))
    lanes = [[tuple(job.split(":")) for job in lane.split(";")] for lane in ns.lanes]
    shapes: list[str] = []
    for lane in lanes:
        for shape, _ in lane:
            if shape not in shapes:
                shapes.append(shape)
    if ns.build_order:
        shapes = ns.build_order.split(",")
    log = open(out / "log.txt", "a")  # noqa: SIM115 (shared by the lane threads)
    builder = subprocess.Popen(
        [sys.executable, str(HERE / "random_models.py"), ns.models, *shapes],
        stdout=log, stderr=subprocess.STDOUT, env=os.environ | OFFLINE_ENV,
    )
    log_lock = threading.Lock()
    threads = []
    for lane in lanes:
        jobs = [(shape, backend, default_points(shape)) for shape, backend in lane]
        t = threading.Thread(target=run_lane, args=(jobs, ns, deadline, log, log_lock))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    builder.wait(timeout=max(1, deadline - time.time()))
    log.close()
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--shape", required=True)
    w.add_argument("--backend", choices=["unsloth", "hf"], required=True)
    w.add_argument("--model-dir", required=True)
    w.add_argument("--points", required=True, help="comma-separated SEQxMB")
    w.add_argument("--results", required=True)
    w.add_argument("--steps", type=int, default=3)
    w.add_argument("--r", type=int, default=16)
    w.add_argument("--trainer", choices=["trl", "plain"], default="trl")
    w.add_argument("--lock")
    w.add_argument("--fallback-plain", action="store_true")
    w.add_argument("--concurrent", action="store_true")
    d = sub.add_parser("drive")
    d.add_argument("--out", required=True)
    d.add_argument("--models", required=True)
    d.add_argument("--budget-s", type=float, default=540)
    d.add_argument("--steps", type=int, default=3)
    d.add_argument("--build-order", default="")
    d.add_argument("--concurrent", action="store_true")
    d.add_argument(
        "--lane", dest="lanes", action="append", required=True,
        help="SHAPE:BACKEND;SHAPE:BACKEND... run in order; lanes run side by side",
    )
    ns = p.parse_args(argv)
    if ns.cmd == "worker":
        return run_worker(ns)
    if ns.cmd == "drive":
        return run_driver(ns)
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
