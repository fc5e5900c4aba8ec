"""lars-fx: MindSpore-exact LARS for PyTorch, as an optimizer and as graph passes; LAMB built from the same
parts."""

from . import functional
from .functional import LambOptions, LarsOptions
from .lamb import LAMB, default_lamb_filter
from .optimizer import LARS
from .params import ParamInfo, default_lars_filter

__all__ = [
    "LARS", "LAMB", "LarsOptions", "LambOptions", "ParamInfo", "default_lars_filter", "default_lamb_filter",
    "functional",
]
__version__ = "0.1.0"
