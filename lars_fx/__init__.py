"""lars-fx: MindSpore-exact LARS for PyTorch, as an optimizer and as graph passes."""

from . import functional
from .optimizer import LARS, ParamInfo, default_lars_filter

__all__ = ["LARS", "ParamInfo", "default_lars_filter", "functional"]
__version__ = "0.1.0"
