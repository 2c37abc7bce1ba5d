"""The GPU memory class table: hardware facts as data, not ``if`` chains.

The bundled ``runner/data/gpu_classes.yaml`` describes the common 24 / 48 / 80 / 141 GB
classes; an installation replaces it with its own file (``QLORA_GPU_CLASSES_FILE``; the Helm
chart's ``gpuClasses`` value renders to the same shape) to add node pool labels, tolerations or
classes. The file is validated here and every problem is reported as ``path: message``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runner.errors import SpecError
from runner.plan.types import MIB, GpuClass
from runner.settings import Settings
from runner.spec.bounds import load_yaml_file


class _ClassEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$")
    min_memory_mib: int = Field(ge=1024)
    gpu_count: int = Field(1, ge=1, le=16)
    cpu_cores: int = Field(4, ge=1, le=256)
    node_labels: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    reference_card: str = ""
    peak_bf16_tflops: float = Field(0.0, ge=0)


class _Table(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    safety_margin: float = Field(0.05, ge=0, lt=0.5)
    classes: list[_ClassEntry] = Field(min_length=1)

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[_ClassEntry]) -> list[_ClassEntry]:
        names = [c.name for c in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate class names: {', '.join(dup)}")
        return v


@dataclass(frozen=True)
class GpuClassTable:
    """The classes, smallest first, and the safety margin on their memory.

    Attributes:
        classes: Sorted by ``min_memory_mib``.
        safety_margin: Fraction of a class's floor kept free.
        origin: The file the table came from.
    """

    classes: tuple[GpuClass, ...]
    safety_margin: float
    origin: str

    def usable_bytes(self, gpu_class: GpuClass) -> int:
        """Memory the estimate may use on one GPU of ``gpu_class``."""
        return int(gpu_class.min_memory_mib * MIB * (1 - self.safety_margin))

    def by_name(self, name: str) -> GpuClass | None:
        """The class called ``name`` (case-insensitive), if any."""
        for c in self.classes:
            if c.name.lower() == name.lower():
                return c
        return None

    @property
    def names(self) -> list[str]:
        """Class names, smallest first."""
        return [c.name for c in self.classes]


def parse_gpu_classes(data: object, origin: str) -> GpuClassTable:
    """Validate a parsed class table.

    Raises:
        SpecError: listing every problem as ``path: message``.
    """
    try:
        table = _Table.model_validate(data)
    except ValidationError as e:
        lines = [
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in e.errors()
        ]
        raise SpecError(f"{origin}: invalid GPU class table", lines) from e
    classes = sorted(
        (
            GpuClass(
                name=c.name,
                min_memory_mib=c.min_memory_mib,
                gpu_count=c.gpu_count,
                node_labels=dict(c.node_labels),
                tolerations=tuple(c.tolerations),
                cpu_cores=c.cpu_cores,
                reference_card=c.reference_card,
                peak_bf16_tflops=c.peak_bf16_tflops,
            )
            for c in table.classes
        ),
        key=lambda c: (c.min_memory_mib, c.gpu_count),
    )
    return GpuClassTable(tuple(classes), table.safety_margin, origin)


def load_gpu_classes(settings: Settings | None = None) -> GpuClassTable:
    """The class table from ``settings.gpu_classes_file``, or the bundled one.

    Raises:
        SpecError: the file is missing, not YAML, or invalid (exit code 2).
    """
    path = settings.gpu_classes_file if settings else None
    if path:  # bounded and read as YAML 1.2, like a spec
        data = load_yaml_file(
            Path(path), what="GPU class table", label=f"{path} (QLORA_GPU_CLASSES_FILE)"
        )
        return parse_gpu_classes(data, path)
    text = resources.files("runner").joinpath("data/gpu_classes.yaml").read_text("utf-8")
    origin = "bundled gpu_classes.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{origin}: not valid YAML: {e}") from e
    return parse_gpu_classes(data, origin)
