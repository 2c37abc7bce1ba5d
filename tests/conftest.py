"""Shared test configuration: tool discovery, strict mode and the GPU marker.

``QLORA_TEST_STRICT=1`` (set by scripts/test.sh and CI) turns "binary not found" into a test
failure instead of a skip, so CI can never pass by skipping its integration tests.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STRICT = os.environ.get("QLORA_TEST_STRICT") == "1"

# Fixture modules, one per outside system; each starts its server on 127.0.0.1.
pytest_plugins: list[str] = [
    "tests.fixtures.kube",
    "tests.fixtures.s3",
    "tests.fixtures.prometheus",
    "tests.fixtures.tiny_model",
    "tests.fixtures.cluster",
    "tests.fixtures.image",
]


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """``runner.cli.main`` points the root logger at the test's captured stderr; undo it after,
    so a later test never logs into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def require_binary(name: str, env_dir: str | None = None) -> str:
    """Path of an executable needed by a test; skip (or fail in strict mode) if absent.

    Args:
        name: Executable name.
        env_dir: Environment variable naming a directory to look in first.
    """
    candidates = []
    if env_dir and os.environ.get(env_dir):
        candidates.append(str(Path(os.environ[env_dir]) / name))
    candidates += [str(REPO / ".tools" / "bin" / name), str(REPO / ".venv" / "bin" / name)]
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found:
        return found
    msg = f"{name} not found (run scripts/test.sh, which installs it)"
    if STRICT:
        pytest.fail(msg)
    pytest.skip(msg)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip @pytest.mark.gpu tests where CUDA is not available."""
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
