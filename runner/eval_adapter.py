"""``qlora eval``: the run's held-out evaluation, re-run on an adapter that is already published.

The adapter is verified first (:func:`runner.publish.verify_published`: manifest, sizes,
sha256), downloaded, and loaded onto its base model - the one its manifest names, in the
precision it was trained in - exactly as ``qlora run`` loads it for verification. The rows of
``--data`` are all held out (the user brings data the adapter never saw) and are scored by
:mod:`runner.train.evaluate`, base and adapter on the one loaded model, with the same gate.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.errors import SpecError
from runner.settings import Settings
from runner.spec.model import DatasetFormat, DatasetSpec, ModelSpec
from runner.train.eval_stats import EvalReport, GateRule


def evaluate_published(
    uri: str,
    data: Sequence[str],
    settings: Settings,
    *,
    dataset_format: str | None = None,
    chat_template: str | None = None,
    scoring: str = "auto",
    choices_field: str = "choices",
    max_rows: int | None = 1000,
    rule: GateRule | None = None,
) -> tuple[EvalReport, dict[str, Any]]:
    """Verify, load and evaluate a published adapter on ``data``.

    Returns:
        The report and the verified run's identity (run id, URI, base model).

    Raises:
        VerificationError: the adapter fails verification (exit 4).
        SpecError, DataError: bad data or options (exit 2).
        StorageError: storage unreachable (exit 5).
    """
    from runner.publish import verify_published
    from runner.storage import fetch
    from runner.train import select_backend
    from runner.train.backend import Precision
    from runner.train.dataset import load_rows
    from runner.train.evaluate import build_items, evaluate, resolve_scoring
    from runner.train.formatting import resolve_chat_template
    from runner.train.model_files import resolve_model

    verified = verify_published(uri, settings)
    manifest = verified.manifest
    try:
        base_source = str(manifest["base_model"]["source"])
        trained = manifest["training"]
        precision = Precision(**trained["precision"])
        max_len = int(trained["max_seq_length"])
        fmt = dataset_format or str(manifest["dataset"]["format"])
    except (KeyError, TypeError, ValueError) as e:
        raise SpecError(f"{verified.manifest_uri}: manifest lacks {e}; cannot evaluate") from e
    try:
        dataset = DatasetSpec(
            sources=list(data), format=DatasetFormat(fmt), chat_template=chat_template
        )
    except ValueError as e:
        raise SpecError(f"--data/--format: {e}") from e
    work = Path(settings.work_dir) / "eval"
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="adapter-", dir=work))
    try:
        adapter_dir = fetch(verified.run_uri, scratch / "adapter", settings)

        def fetch_dir(src: str, sub: Path) -> Path:
            return fetch(src, work / sub, settings)

        cache = Path(settings.model_cache_dir) if settings.model_cache_dir else None
        base = resolve_model(ModelSpec(source=base_source), fetch_dir, cache)
        rows = load_rows(dataset, fetch_dir, seed=0).train
        rows = rows[:max_rows] if max_rows else rows
        backend = select_backend(str(trained.get("backend", "transformers")))
        if backend.name != "unsloth":
            precision = _for_this_machine(precision)
        session = backend.load_for_verification(base.path, adapter_dir, precision)
        template = resolve_chat_template(dataset, session.tokenizer)
        used = resolve_scoring(rows, dataset, scoring, choices_field)
        items = build_items(
            rows,
            dataset,
            session.tokenizer,
            template,
            max_len,
            scoring=used,
            choices_field=choices_field,
        )
        report = evaluate(
            session, items, scoring=used, rule=rule or run_gate(manifest), split=", ".join(data)
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    identity = {
        "run_id": verified.run_id,
        "run_uri": verified.run_uri,
        "base_model": base_source,
        "precision": vars(precision),
    }
    return report, identity


def run_gate(manifest: Mapping[str, Any]) -> GateRule:
    """The gate the run itself was published under (its manifest), else the default."""
    gate = (manifest.get("evaluation") or {}).get("gate") or {}
    try:
        return GateRule(
            str(gate.get("loss", GateRule.loss)),
            str(gate.get("accuracy", GateRule.accuracy)),
            float(gate.get("confidence", GateRule.confidence)),
        )
    except (TypeError, ValueError):
        return GateRule()


def _for_this_machine(precision: Any) -> Any:
    """A CUDA-trained precision evaluated on the CPU computes in float32 (bf16 matmuls on the
    CPU are slow and, for bitsandbytes' 4-bit path, not what the CI measured)."""
    from dataclasses import replace

    from runner.train.backend import cuda_available

    if cuda_available() or precision.compute_dtype == "float32":
        return precision
    return replace(precision, compute_dtype="float32")
