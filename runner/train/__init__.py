"""Training: the backend interface, data preparation, verification and the tiny test model.

Only the modules under this package import the training stack (torch, transformers, peft,
trl, datasets, bitsandbytes, unsloth), and only inside functions, so ``import runner.train``
is cheap and works without the ``train`` extra.
"""

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
