"""What a job spec asks of its model, checked against the model's own ``config.json``.

``qlora validate`` knows the spec only; when the model's config is reachable without
downloading anything (a local directory, the local Hugging Face cache, or a bundled well-known
shape) it also knows what the model says. Two mistakes are cheap to catch here and expensive
later, on a GPU node:

* ``lora.target_modules`` naming layers the architecture does not have (peft fails only after
  the model is loaded). Checked for the families in the ``linear_modules`` table of
  ``runner/data/model_configs.yaml``; a dotted name (``model.layers.0.self_attn.q_proj``) is
  checked by its last part. Other families are not checked.
* ``training.max_seq_length`` beyond ``max_position_embeddings``: an error, because the model
  was not trained on such positions, unless the config has ``rope_scaling``, which may extend
  them: then a warning.

Pure: the config is a mapping handed in, nothing is imported from the training stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import yaml

from runner.spec.model import JobSpec


@dataclass(frozen=True)
class ModelFindings:
    """Problems found by :func:`check_against_model`, as ``path: message`` lines.

    Attributes:
        errors: The spec cannot work with this model (exit code 2).
        warnings: Likely wrong; the message names what to check.
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@cache
def linear_modules() -> dict[str, frozenset[str]]:
    """``{model_type: names of its linear layers}`` from the bundled table."""
    text = resources.files("runner").joinpath("data/model_configs.yaml").read_text("utf-8")
    table = yaml.safe_load(text).get("linear_modules") or {}
    return {str(k): frozenset(str(n) for n in v) for k, v in table.items()}


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a config (multimodal configs nest it in text_config)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def check_against_model(spec: JobSpec, config: Mapping[str, Any], origin: str) -> ModelFindings:
    """Check ``spec`` against the model's ``config``.

    Args:
        spec: A validated job spec.
        config: The model's parsed ``config.json``.
        origin: Where the config came from, for the messages.

    Returns:
        The errors and warnings, each a ``path: message`` line.
    """
    found = ModelFindings()
    text = _text_config(config)
    body = spec.spec
    model_type = text.get("model_type") if "model_type" in text else config.get("model_type")
    known = linear_modules().get(str(model_type)) if isinstance(model_type, str) else None
    if known is None and isinstance(config.get("model_type"), str):
        known = linear_modules().get(str(config["model_type"]))
    if known is not None:
        for i, name in enumerate(body.lora.target_modules):
            if name.rsplit(".", 1)[-1] not in known:
                found.errors.append(
                    f"spec.lora.target_modules[{i}]: '{name}' is not a layer of a "
                    f"'{model_type}' model ({origin}); its linear layers are "
                    f"{', '.join(sorted(known))}"
                )
    positions = text.get("max_position_embeddings", config.get("max_position_embeddings"))
    if positions is None:
        return found
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        found.errors.append(
            f"{origin}: max_position_embeddings must be a positive whole number "
            f"(got {positions!r}); fix the model's config.json"
        )
        return found
    want = body.training.max_seq_length
    if want > positions:
        rope = text.get("rope_scaling", config.get("rope_scaling"))
        where = f"spec.training.max_seq_length: {want} exceeds the model's "
        where += f"max_position_embeddings {positions} ({origin})"
        if rope:
            kind = rope.get("rope_type") or rope.get("type") if isinstance(rope, Mapping) else rope
            found.warnings.append(
                f"{where}; its rope_scaling ({kind}) may extend the positions: check the model "
                f"card, or set training.max_seq_length: {positions} to stay within them"
            )
        else:
            found.errors.append(
                f"{where}; set training.max_seq_length: {positions} or less, or use a model "
                "with longer positions"
            )
    return found
