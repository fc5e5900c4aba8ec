"""Momentum: make SGD's momentum update consume the LARS-scaled gradient.

Pattern: the ``SgdUpdate`` records of ``match_sgd_update`` (with coefficients from
``insert_trust_ratio`` for LARS parameters).
Rewrite, per parameter, where SGD's update read its weight-decayed gradient ``d``:

* LARS parameter: ``u = lars_fx.functional.scaled_gradient(w, g', coeff, weight_decay)``
  = ``coeff * (g' + wd * w)`` in the compute dtype, cast back to the parameter's dtype (``wd`` a number or a
  0-d tensor); other parameters: ``u = g'`` (no weight decay, as ``lars_fx.LARS``).
* MindSpore's form (default): SGD's buffer / nesterov / update nodes read ``u`` instead of ``d``.
* ``lr_inside_momentum`` (the paper's form): they read ``lr * u`` and ``w' = w - dir`` replaces
  ``w' = w - lr * dir``.
* A group with a momentum input (``LarsRequest.momentum_inputs``) multiplies by that tensor instead of
  the constant the graph was traced with, so a momentum schedule does not recompile.
* SGD's foreach nesterov writes its direction into ``.grad``; that write is dropped.
Then dead code (SGD's own weight decay) is removed and the graph is re-sorted topologically, so the
update nodes follow the norms they now depend on.
Preconditions (``requires``): a ``LarsRequest``; ``match_sgd_update`` and ``insert_trust_ratio`` ran.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from lars_fx._compat import stable_topological_sort
from lars_fx.functional import compute_dtype, scaled_gradient

from .fx_norms import write_back_point
from .fx_spec import (
    GRAD_WRITE,
    LarsRequest,
    PatternMismatch,
    SgdUpdate,
    request_of,
    require_on_updates,
    updates_of,
)

__all__ = ["RewriteMomentum"]

aten = torch.ops.aten


def _scaled_gradient_by_tensor(
    param: torch.Tensor, grad: torch.Tensor, coeff: torch.Tensor, weight_decay: torch.Tensor
) -> torch.Tensor:
    """``scaled_gradient`` for a weight decay held in a 0-d tensor (a changing float, see fx_canonicalize),
    which ``scaled_gradient``'s ``weight_decay != 0`` test cannot take under a trace."""
    dtype = compute_dtype(param.dtype)
    decayed = grad.to(dtype) + weight_decay * param.detach().to(dtype)
    return scaled_gradient(param, decayed, coeff, 0.0).to(grad.dtype)


class RewriteMomentum(PassBase):
    name = "rewrite_momentum"

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not isinstance(request_of(gm, self.name), LarsRequest):
            raise PatternMismatch(
                None, "LARS over SGD", f"{self.name} rewrites SGD's update: it needs a LarsRequest"
            )
        require_on_updates(gm, self.name, "insert_trust_ratio", lambda update: update.coefficient is not None)
        others = [u for u in updates_of(gm) if not isinstance(u, SgdUpdate)]
        if others:
            raise PatternMismatch(
                others[0].param, "SGD update", f"{self.name} needs match_sgd_update's records"
            )

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        request = request_of(gm, self.name)
        assert isinstance(request, LarsRequest)
        lr_inside_momentum = request.options.lr_inside_momentum
        graph = gm.graph
        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        for update in updates_of(gm):
            assert isinstance(update, SgdUpdate)
            # Right after the coefficient, so the update follows its own batch's norms (see fx_norms).
            anchor = update.coefficient.next if update.coefficient is not None else write_back_point(graph)
            with graph.inserting_before(anchor):
                if update.role.use_lars:
                    by_tensor = isinstance(update.weight_decay, torch.fx.Node)
                    scaled = graph.call_function(
                        _scaled_gradient_by_tensor if by_tensor else scaled_gradient,
                        (update.param, update.grad, update.coefficient, update.weight_decay),
                    )
                else:
                    scaled = update.grad
                velocity_input = scaled
                if lr_inside_momentum:
                    velocity_input = graph.call_function(torch.mul, (scaled, update.lr))
                momentum = placeholders.get(request.momentum_inputs.get(update.role.group_index, ""))
                if momentum is not None and update.buffer_mul is not None:
                    update.buffer_mul.args = (update.buffer_mul.args[0], momentum)
                if momentum is not None and update.nesterov_add is not None:
                    weighted = graph.call_function(aten.mul.Tensor, (update.new_buffer, momentum))
                    update.nesterov_add.args = (update.nesterov_add.args[0], weighted)
                    update.nesterov_add.kwargs = {}
                if lr_inside_momentum:
                    direction = velocity_input if update.direction is update.decayed else update.direction
                    new_param = graph.call_function(torch.sub, (update.param, direction))
                    update.new_param.replace_all_uses_with(new_param)
                    update.new_param = new_param
            consumers = update.consumers
            for consumer in consumers:
                consumer.replace_input_with(update.decayed, velocity_input)
        for write in [n for n in graph.nodes if n.meta.get(GRAD_WRITE)]:
            graph.erase_node(write)
        stable_topological_sort(graph)
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)
