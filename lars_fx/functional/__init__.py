"""The math of lars-fx's layer-wise optimizers, written once; imports nothing from the rest of the project.

``options``: each algorithm's options (names, defaults, checks). ``lars``: LARS (the trust ratio, the per-tensor
reference and the multi-tensor paths).
"""

from .lars import (
    LarsGradients,
    LarsNorms,
    NormCollector,
    _graph_inputs,
    compute_dtype,
    lars_gradient,
    lars_gradients_foreach,
    lars_sgd_foreach,
    lars_sgd_reference,
    momentum_update,
    scaled_gradient,
    trust_ratio,
)
from .options import LarsOptions

__all__ = [
    "LarsOptions",
    "trust_ratio",
    "compute_dtype",
    "scaled_gradient",
    "lars_gradient",
    "momentum_update",
    "lars_sgd_reference",
    "LarsGradients",
    "lars_gradients_foreach",
    "LarsNorms",
    "NormCollector",
    "lars_sgd_foreach",
]
