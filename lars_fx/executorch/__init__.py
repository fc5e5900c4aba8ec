"""LARS for ExecuTorch's on-device training: one ``.pte`` program whose ``train_step`` holds the forward, the
backward and the LARS update (``export_program``). Needs ``executorch`` (the ``executorch`` extra); the rest
of lars-fx never imports it. See docs/on_device.md.
"""

from .capture import CapturedStep, capture_step
from .program import METHODS, TrainingProgram, export_program
from .spec import ProgramSpec, TrainedParam

__all__ = ["export_program", "TrainingProgram", "METHODS", "ProgramSpec", "TrainedParam", "capture_step",
           "CapturedStep"]
