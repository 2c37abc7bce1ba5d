"""The planner: job spec + model config → VRAM estimate → GPU class, batch shape, precision.

Pure code: it imports no torch, kubernetes or boto3, so ``qlora plan`` runs anywhere (the one
exception, reading ``config.json`` from ``s3://``, imports the storage adapter lazily).
"""

from runner.plan.classes import GpuClassTable, load_gpu_classes, parse_gpu_classes
from runner.plan.estimator import (
    DEFAULT_CALIBRATION,
    BackendFit,
    Calibration,
    Estimate,
    TrainingShape,
    estimate,
)
from runner.plan.model_config import ModelConfig, bundled_config, load_model_config
from runner.plan.planner import estimate_run, make_plan, plan_for_card, training_shape
from runner.plan.shapes import SUPPORTED_MODEL_TYPES, ModelShape, shape_from_config
from runner.plan.types import GpuClass, Plan, VramTerm

__all__ = [
    "DEFAULT_CALIBRATION",
    "SUPPORTED_MODEL_TYPES",
    "BackendFit",
    "Calibration",
    "Estimate",
    "GpuClass",
    "GpuClassTable",
    "ModelConfig",
    "ModelShape",
    "Plan",
    "TrainingShape",
    "VramTerm",
    "bundled_config",
    "estimate",
    "estimate_run",
    "load_gpu_classes",
    "load_model_config",
    "make_plan",
    "parse_gpu_classes",
    "plan_for_card",
    "shape_from_config",
    "training_shape",
]
