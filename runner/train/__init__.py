"""Training: the backend interface, data preparation, verification and the tiny test model.

Only the modules under this package import the training stack (torch, transformers, peft,
trl, datasets, bitsandbytes, unsloth), and only inside functions, so ``import runner.train``
is cheap and works without the ``train`` extra.
"""

import logging

from runner.train.backend import (
    BatchShape,
    ModelSession,
    Precision,
    TokenizedExample,
    TrainerBackend,
    TrainOutcome,
    select_backend,
)

__all__ = [
    "BatchShape",
    "ModelSession",
    "Precision",
    "TokenizedExample",
    "TrainOutcome",
    "TrainerBackend",
    "select_backend",
]

# bitsandbytes logs, once per process on the CPU, that `pip install kernels` would speed it up;
# that package fetches kernels from a model hub at run time, which a job must never do, and the
# built-in CPU path is the one we want. Set before anything imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
