"""LARS for ONNX Runtime's on-device training: artifacts the stock runtime trains.

``generate_artifacts`` mirrors ``onnxruntime.training.artifacts.generate_artifacts`` for a PyTorch
model and a ``lars_fx.LARS``; ``convert_artifacts`` turns ORT's own SGD/AdamW artifacts into LARS ones.
Needs ``onnx``, ``onnx-ir`` and ``onnxruntime-training`` (the ``onnx`` extra). See docs/onnx.md.
"""

from .artifacts import ARTIFACT_FILES, convert_artifacts, generate_artifacts
from .spec import LarsSpec, ParamSpec

__all__ = ["generate_artifacts", "convert_artifacts", "LarsSpec", "ParamSpec", "ARTIFACT_FILES"]
