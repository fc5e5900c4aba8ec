"""The math of lars-fx's layer-wise optimizers, written once; imports nothing from the rest of the project.

``options``: each algorithm's options (names, defaults, checks). ``lars``: LARS (the trust ratio, the
per-tensor reference and the multi-tensor paths). ``flat``: LARS over segments of flat buffers. ``lamb``:
LAMB, on LARS's trust ratio and norm helpers.
"""

from .flat import Segments, lars_sgd_flat, per_chunk, segment_norms, segment_squared_norms
from .lamb import (
    adam_moments_,
    bias_corrections,
    lamb_direction,
    lamb_foreach,
    lamb_reference,
    lamb_trust_ratio,
)
from .lars import (
    LarsGradients,
    LarsNorms,
    NormCollector,
    compute_dtype,
    lars_gradient,
    lars_gradients_foreach,
    lars_sgd_foreach,
    lars_sgd_reference,
    momentum_step,
    momentum_update,
    scaled_gradient,
    trust_ratio,
)
from .lars import _graph_inputs as _graph_inputs  # an explicit re-export for the tests; not public API
from .options import LambOptions, LarsOptions

__all__ = [
    "LarsOptions",
    "trust_ratio",
    "compute_dtype",
    "scaled_gradient",
    "lars_gradient",
    "momentum_step",
    "momentum_update",
    "lars_sgd_reference",
    "LarsGradients",
    "lars_gradients_foreach",
    "LarsNorms",
    "NormCollector",
    "lars_sgd_foreach",
    "Segments",
    "segment_squared_norms",
    "segment_norms",
    "per_chunk",
    "lars_sgd_flat",
    "LambOptions",
    "lamb_trust_ratio",
    "adam_moments_",
    "bias_corrections",
    "lamb_direction",
    "lamb_reference",
    "lamb_foreach",
]
