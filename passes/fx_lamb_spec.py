"""What the LAMB passes add to ``fx_spec``: the request of a LAMB pipeline and the record of an Adam update.

``LambRequest`` tells the shared trust-ratio pass to insert ``lars_fx.functional.lamb_trust_ratio`` with
LAMB's options. ``AdamUpdate`` is what ``match_adam_update`` records on a parameter placeholder: its ``grad``
is LAMB's update direction ``r`` (the tensor the trust ratio scales and takes the norm of), the other fields
the nodes and constants of the matched ``torch.optim.Adam``/``AdamW`` step that ``rewrite_lamb_update`` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from lars_fx.functional import LambOptions, lamb_trust_ratio

from .fx_spec import LayerUpdate, LayerwiseRequest

__all__ = ["LambRequest", "AdamUpdate"]


@dataclass(frozen=True)
class LambRequest(LayerwiseRequest):
    """LAMB over a captured ``torch.optim.Adam``/``AdamW`` step (the ``LAMB_ADAM`` pipeline)."""

    options: LambOptions = field(default_factory=LambOptions)

    def trust_ratio_call(self, update: LayerUpdate) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
        return lamb_trust_ratio, self.options.trust_ratio_options()


@dataclass(kw_only=True)
class AdamUpdate(LayerUpdate):
    """One parameter's matched Adam/AdamW update (see ``fx_match_adam``).

    ``grad`` is the node computing LAMB's ``r = m_hat / (sqrt(v_hat) + eps) [+ weight_decay * w]`` (the decay
    term only for trust-ratio parameters), inserted by the matcher. ``new_param`` is the value Adam writes
    into the parameter (the node the update pass replaces); ``exp_avg``, ``exp_avg_sq`` and ``step`` are the
    new moments and step count Adam writes into its state, kept as they are. ``weight_decay`` is AdamW's
    decoupled one (0.0 for Adam, whose coupled decay the matcher refuses).
    """

    new_param: torch.fx.Node
    exp_avg: torch.fx.Node
    exp_avg_sq: torch.fx.Node
    step: torch.fx.Node
    beta1: float
    beta2: float
    eps: float
