"""Per-micro-batch speed-ups the runner applies on top of the training libraries.

1. **One attention kernel per layer for padding-free rows** (:func:`enable_varlen_attention`).
   Unsloth concatenates a micro batch's rows into one sequence. Without FlashAttention
   installed it attends with PyTorch's variable-length flash kernel only when
   ``torch.nn.attention.varlen.varlen_attn`` takes ``enable_gqa`` (torch 2.12+); on torch 2.11
   it falls back to one SDPA launch (with its slicing, copies and a final concatenation) per
   run of equal row lengths, per layer, in forward, recompute and backward. Real chat rows
   almost all differ in length, so a 16-row micro batch made ~16 attention launches per layer
   per pass. The flash kernel PyTorch itself ships (``aten._flash_attention_forward`` /
   ``_backward`` with ``cu_seqlens``) takes grouped-query heads and variable lengths directly;
   Unsloth already wraps exactly that call (``_LeanFlashVarlen``) for newer torch. This
   points Unsloth's varlen hook at that wrapper when its own detection found nothing. The GPU
   check in ``bench/speed_data.py`` compares outputs and gradients with the per-segment path.
2. **Partial gradient checkpointing** (:func:`partial_checkpointing_callback`): the planner
   may checkpoint only the first ``k`` decoder layers (:mod:`runner.plan.layout`). Each layer
   of transformers 5 is a ``GradientCheckpointingLayer`` that calls its
   ``_gradient_checkpointing_func`` when checkpointing is on; for layers ``k..L-1`` that
   function is replaced, when training begins, by a plain call, so those layers keep their
   activations and are not recomputed. Unsloth re-arms the *flags* of every module on each
   ``model.train()``, never the function, so the choice holds for the whole run.
3. **Kernel caches a pod can reuse** (:func:`compile_cache_env`): Triton's and Inductor's
   on-disk caches, pointed at ``QLORA_COMPILE_CACHE_DIR`` (a volume the chart can mount) so a
   second job on the node skips the first step's compilation.
4. **Expandable allocator segments** (:func:`allocator_env`). Padding-free micro batches
   differ in tokens from step to step, so every activation differs in size; PyTorch's
   default caching allocator keeps each freed block at its size and cudaMallocs new
   segments for larger requests. On realistic rows (bench/speed/run6-data) a 1B run reserved
   54.9 GiB while never more than 11.3 GiB was allocated, and run5's 8B run 20.6 GiB for
   12.9: the reserved peak then says nothing about what the class needs, and the allocator
   spends time in cudaMalloc. ``expandable_segments:True`` (PyTorch's own advice in its
   out-of-memory message) maps pages into one growing segment, so freed memory of any size
   is reused. Set unless the user configured the allocator (``PYTORCH_ALLOC_CONF`` /
   ``PYTORCH_CUDA_ALLOC_CONF``) or ``QLORA_EXPANDABLE_SEGMENTS=0``. PyTorch reads the
   variable when torch is imported, so it is set first thing (:func:`apply_allocator_env`);
   until session 7 it was set too late and never took effect (bench/speed run7 to run9 ran
   the default allocator; the 8B example by hand reserved 91 GiB for 47 allocated,
   bench/new-user-8b). The "training done" log record carries the allocator's report
   (:mod:`runner.train.allocator`), which says whether the segments were expandable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

COMPILE_CACHE_ENV = "QLORA_COMPILE_CACHE_DIR"
"""Directory for Triton / Inductor caches; unset leaves the libraries' defaults."""


def compile_cache_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The cache variables to set for ``QLORA_COMPILE_CACHE_DIR`` (those not already set)."""
    root = environ.get(COMPILE_CACHE_ENV, "").strip()
    if not root:
        return {}
    wanted = {
        "TRITON_CACHE_DIR": os.path.join(root, "triton"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor"),
        "UNSLOTH_COMPILE_LOCATION": os.path.join(root, "unsloth_compiled_cache"),
    }
    return {k: v for k, v in wanted.items() if not environ.get(k)}


def apply_compile_cache_env() -> dict[str, str]:
    """Set the cache variables in this process before the training libraries import."""
    found = compile_cache_env(os.environ)
    for k, v in found.items():
        os.makedirs(v, exist_ok=True)
        os.environ[k] = v
    if found:
        log.info("kernel caches under %s", os.environ[COMPILE_CACHE_ENV], extra={"caches": found})
    return found


EXPANDABLE_ENV = "QLORA_EXPANDABLE_SEGMENTS"
"""``0`` keeps PyTorch's default allocator (the behaviour before issue 13's fix)."""
EXPANDABLE = "expandable_segments:True"
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
"""PyTorch's allocator variable: the name from torch 2.9, and the older one."""


def allocator_env(environ: Mapping[str, str], torch_version: str | None) -> dict[str, str]:
    """The allocator variable to set (see the module docstring); {} when it is not ours to set.

    ``torch_version`` picks the name: ``PYTORCH_ALLOC_CONF`` from torch 2.9 (the older name
    warns there), ``PYTORCH_CUDA_ALLOC_CONF`` before; None (torch absent) sets nothing.
    """
    if environ.get(EXPANDABLE_ENV, "1").strip() == "0" or torch_version is None:
        return {}
    if any(environ.get(k, "").strip() for k in ALLOC_CONF_VARS):
        return {}
    try:
        major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    except ValueError:
        return {}
    name = ALLOC_CONF_VARS[0] if (major, minor) >= (2, 9) else ALLOC_CONF_VARS[1]
    return {name: EXPANDABLE}


def apply_allocator_env(modules: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Set :func:`allocator_env`'s variable in this process, before CUDA is first used.

    PyTorch reads the variable once, when ``torch`` is imported, not when CUDA starts: set
    after that import it does nothing. Runs 7 to 9 of ``bench/speed`` ran that way (the
    watchdog's ``TrainerCallback`` import had loaded torch first) and kept the default
    allocator; ``bench/new-user-8b/call4-allocator`` shows the cost: 91.1 GiB reserved for
    46.8 allocated. So :func:`runner.recipe.run` calls this first, and where torch is already
    imported the setting also goes through ``torch.cuda.memory._set_allocator_settings``,
    which applies to every segment allocated after it.

    Args:
        modules: ``sys.modules`` (tests pass a stand-in).
    """
    import sys
    from importlib import metadata

    try:
        version: str | None = metadata.version("torch")
    except metadata.PackageNotFoundError:
        version = None
    found = allocator_env(os.environ, version)
    os.environ.update(found)
    if not found:
        return found
    torch = (sys.modules if modules is None else modules).get("torch")
    how = "environment, before torch is imported"
    if torch is not None:
        try:
            torch.cuda.memory._set_allocator_settings(EXPANDABLE)
            how = "torch.cuda.memory._set_allocator_settings (torch was already imported)"
        except (AttributeError, RuntimeError) as e:
            how = f"environment only; torch was already imported and refused the setting: {e}"
            log.warning("CUDA allocator: %s may not take effect: %s", EXPANDABLE, how)
    log.info("CUDA allocator: %s (%s)", EXPANDABLE, how, extra={"allocator": found, "how": how})
    return found


def expandable_requested(environ: Mapping[str, str]) -> bool:
    """Whether the allocator variable in ``environ`` asks for expandable segments."""
    conf = ",".join(environ.get(k, "") for k in ALLOC_CONF_VARS)
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def enable_varlen_attention(dispatch: Any | None = None) -> str:
    """Route Unsloth's padding-free attention through PyTorch's flash varlen kernel.

    Args:
        dispatch: ``unsloth.utils.attention_dispatch`` (imported when None; tests pass a
            stand-in).

    Returns:
        What happened, for the run's notes: ``'patched'``, ``'native'`` (Unsloth found a
        varlen kernel itself) or why not.
    """
    if os.environ.get("QLORA_VARLEN_ATTENTION", "1") == "0":
        return "not patched: QLORA_VARLEN_ATTENTION=0"
    if dispatch is None:
        try:
            import importlib

            dispatch = importlib.import_module("unsloth.utils.attention_dispatch")
        except Exception as e:
            return f"not patched: {type(e).__name__}"
    if getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None:
        return "native"
    lean = getattr(dispatch, "_LeanFlashVarlen", None)
    needed = ("_varlen_attn_call", "_torch_varlen_takes", "_LEAN_VARLEN")
    if lean is None or not all(hasattr(dispatch, n) for n in needed):
        return "not patched: this Unsloth has no lean varlen wrapper"
    if not _flash_available():
        return "not patched: PyTorch's flash kernel is not available"

    def varlen(
        q: Any,
        k: Any,
        v: Any,
        cu_q: Any,
        cu_k: Any,
        max_q: int,
        max_k: int,
        *,
        scale: float | None = None,
        window_size: tuple[int, int] = (-1, -1),
        enable_gqa: bool = False,
    ) -> Any:
        causal = tuple(window_size) == (-1, 0)
        return lean.apply(q, k, v, cu_q, max_q, causal, scale, window_size[0], window_size[1])

    setattr(dispatch, "_TORCH_VARLEN_ATTN", varlen)  # noqa: B010 - a foreign module's global
    setattr(dispatch, "_LEAN_VARLEN", True)  # noqa: B010
    setattr(dispatch, "_varlen_can_use_cudnn", lambda *a, **k: False)  # noqa: B010
    return "patched"


def _flash_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    check = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    return bool(torch.cuda.is_available() and (check() if check else True))


def decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers, in order (transformers' ``GradientCheckpointingLayer``s).

    Not every module with a ``gradient_checkpointing`` flag: ``gradient_checkpointing_enable``
    gives the backbone (``LlamaModel``) one too, and counting it shifted the split by one.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: the layers' class names
        return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _plain_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def limit_checkpointing(model: Any, checkpointed_layers: int) -> int:
    """Leave layers ``checkpointed_layers..L-1`` uncheckpointed; returns how many were changed."""
    layers = decoder_layers(model)
    changed = 0
    for layer in layers[checkpointed_layers:]:
        layer._gradient_checkpointing_func = _plain_call
        changed += 1
    return changed


def speed_callbacks(shape: Any) -> list[Any]:
    """The trainer callbacks a batch shape asks for (partial checkpointing)."""
    out: list[Any] = []
    layers = getattr(shape, "checkpointed_layers", None)
    if shape.gradient_checkpointing and layers is not None:
        out.append(partial_checkpointing_callback(layers))
    if os.environ.get(PROFILE_ENV):
        out.append(profile_callback(os.environ[PROFILE_ENV]))
    return out


PROFILE_ENV = "QLORA_TORCH_PROFILE"
"""Write a torch.profiler key-averages table of two steady steps to this file (benchmarks)."""


def profile_callback(path: str, first_step: int = 5, steps: int = 2) -> Any:
    """A ``TrainerCallback`` that profiles steps ``first_step+1 .. first_step+steps``.

    The table is written when training ends, so exporting it does not slow a timed step
    (run5's profiled step took 14 s because the table was built inside it). GPU busy time
    counts device events without CPU time of their own (kernels and copies), not the ops
    that launched them, which would count each kernel twice.
    """
    from transformers import TrainerCallback

    class Profile(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.prof: Any = None
            self.wall = 0.0
            self.t0 = 0.0

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            import time

            import torch

            if state.global_step == first_step:
                torch.cuda.synchronize()
                self.prof = torch.profiler.profile(
                    activities=[
                        torch.profiler.ProfilerActivity.CPU,
                        torch.profiler.ProfilerActivity.CUDA,
                    ]
                )
                self.prof.__enter__()
                self.t0 = time.perf_counter()
            elif self.prof is not None and state.global_step == first_step + steps:
                torch.cuda.synchronize()
                self.wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.prof is None or not self.wall:
                return
            ka = self.prof.key_averages()
            busy_us = sum(
                e.self_device_time_total
                for e in ka
                if e.self_device_time_total and not e.self_cpu_time_total
            )
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(
                    f"steps {first_step + 1}..{first_step + steps}: wall {self.wall:.3f} s, "
                    f"GPU kernels and copies {busy_us / 1e6:.3f} s "
                    f"({100 * busy_us / 1e6 / self.wall:.0f}% busy)\n\n"
                )
                fh.write(ka.table(sort_by="self_device_time_total", row_limit=40))
                fh.write("\n\n")
                fh.write(ka.table(sort_by="self_cpu_time_total", row_limit=25))
            self.prof = None

    return Profile()


def partial_checkpointing_callback(checkpointed_layers: int) -> Any:
    """A ``TrainerCallback`` that applies :func:`limit_checkpointing` when training begins.

    At ``on_train_begin`` the trainer (transformers backend) has already called
    ``gradient_checkpointing_enable()``, which installs the function on every layer.
    """
    from transformers import TrainerCallback

    class PartialCheckpointing(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.changed = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            model = kw.get("model")
            if model is not None:
                self.changed = limit_checkpointing(model, checkpointed_layers)
                log.info(
                    "partial checkpointing: first %d layers checkpointed, %d not",
                    checkpointed_layers,
                    self.changed,
                )

    return PartialCheckpointing()
