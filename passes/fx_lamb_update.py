"""LAMB update: make the parameter update of a matched Adam/AdamW step LAMB's.

Pattern: the ``AdamUpdate`` records of ``match_adam_update`` (with coefficients from ``insert_trust_ratio``
for trust-ratio parameters). Rewrite, per parameter, the value Adam writes back into ``w`` (``addcdiv(w_d, m',
denom)``) becomes ``lamb_write(w, r, lr, ratio)`` = ``w - lr * ratio * r`` in the compute dtype, cast to the
parameter's dtype, as ``lars_fx.functional.lamb_reference`` writes it; other parameters get ``w - lr * r`` (a
plain Adam step: their ``r`` has no weight decay, and AdamW's own decay ``w * (1 - lr * wd)`` is dropped for
them too). Adam's moments and step count are kept as matched. Then dead code (Adam's denominator, step size
and decay) is removed.
Preconditions (``requires``): a ``LambRequest``; ``match_adam_update`` and ``insert_trust_ratio`` ran.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .fx_lamb_spec import AdamUpdate, LambRequest
from .fx_norms import write_back_point
from .fx_spec import PatternMismatch, request_of, require_on_updates, updates_of

__all__ = ["RewriteLambUpdate", "lamb_write"]


def lamb_write(param: Tensor, r: Tensor, lr: Tensor, ratio: Tensor | None) -> Tensor:
    """``w - lr * ratio * r`` (``ratio`` None: 1) in ``r``'s dtype (compute dtype), cast to ``param``'s."""
    scale = lr.to(r.dtype) if ratio is None else lr.to(ratio.dtype) * ratio
    return (param.to(r.dtype) - r * scale).to(param.dtype)


class RewriteLambUpdate(PassBase):
    name = "rewrite_lamb_update"

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not isinstance(request_of(gm, self.name), LambRequest):
            raise PatternMismatch(
                None, "LAMB over Adam", f"{self.name} writes LAMB's update: it needs a LambRequest"
            )
        require_on_updates(gm, self.name, "insert_trust_ratio", lambda update: update.coefficient is not None)
        others = [u for u in updates_of(gm) if not isinstance(u, AdamUpdate)]
        if others:
            raise PatternMismatch(
                others[0].param, "Adam update", f"{self.name} needs match_adam_update's records"
            )

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        for update in updates_of(gm):
            assert isinstance(update, AdamUpdate)
            # Right after the coefficient, so the update follows its own batch's norms (see fx_norms).
            anchor = update.coefficient.next if update.coefficient is not None else write_back_point(graph)
            with graph.inserting_before(anchor):
                new_param = graph.call_function(
                    lamb_write, (update.param, update.grad, update.lr, update.coefficient)
                )
            update.new_param.replace_all_uses_with(new_param)
            update.new_param = new_param
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)
