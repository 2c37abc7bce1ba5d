"""qlora-runner: a Kubernetes-native batch runner that fine-tunes LLMs with QLoRA.

The public API is small on purpose: the job spec, its loader, and the error tree. Heavier parts
(planner, renderer, training recipe, storage) live in their own subpackages and are imported
where they are used, so importing :mod:`runner` never pulls in torch, boto3 or kubernetes.
"""

from runner.errors import ExitCode, RunnerError, SpecError
from runner.spec import JobSpec, load_spec, load_spec_text

__all__ = ["ExitCode", "JobSpec", "RunnerError", "SpecError", "load_spec", "load_spec_text"]
__version__ = "0.1.0"
