"""The planner: job spec + model config → VRAM estimate → GPU class, batch shape, precision.

Pure code: it imports no torch, kubernetes or boto3, so ``qlora plan`` runs anywhere.
"""

from runner.plan.types import GpuClass, Plan, VramTerm

__all__ = ["GpuClass", "Plan", "VramTerm"]
