"""Carry weight norms: take ``||w||^2`` from the previous step instead of reading ``w`` twice.

Pattern: the batches of ``insert_lars_norms``, when the request asks for it
(``LarsRequest.carry_weight_norms``); runs after ``rewrite_momentum``, so each ``SgdUpdate.new_param``
is the value the step writes back into its parameter.
Rewrite, per batch of float32 or float64 weights (half-precision ones keep reading ``w``): its ``squared_norms([w...])`` node becomes a new graph input (placeholder
``carried_w_sq_norm_<k>``, after the existing inputs, in ``LarsRequest.carried_batches`` order), and
``squared_norms([w'...])`` of the weights the step writes back is appended to the graph's outputs (same
order). The caller feeds step t's outputs to step t+1. Inductor computes those reductions inside the
update's own loop (``fx_norm_after_write_back``), so the step reads ``w`` once instead of twice: 24
instead of 28 bytes per fp32 parameter.
Preconditions: ``rewrite_momentum`` ran. The caller owns the carry's validity: weights written between
two steps (a checkpoint load, an in-place edit, another optimizer) need fresh norms, ``squared_norms``
of the current weights.
"""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .fx_norms import squared_norms
from .fx_spec import PatternMismatch, request_of

__all__ = ["CarryWeightNorms"]


def _stored_dtype(param: torch.fx.Node) -> torch.dtype | None:
    value = param.meta.get("val")
    return value.dtype if value is not None else None


class CarryWeightNorms(PassBase):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        request = request_of(gm, "carry_weight_norms")
        if not request.carry_weight_norms or not request.batches:
            return PassResult(gm, False)
        graph = gm.graph
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        output = next(n for n in graph.nodes if n.op == "output")
        carried_outputs = []
        for batch in request.batches:
            if batch.w_sq_norm is None:
                raise PatternMismatch(None, "LARS batch", "insert_lars_norms must run before carry_weight_norms")
            if any(_stored_dtype(update.param) != batch.compute_dtype for update in batch.updates):
                # Half-precision weights: Inductor would sum w' in float32 before its rounding to the
                # stored dtype, a norm ~1e-4 off the weights' own. They keep reading w.
                continue
            with graph.inserting_after(last_input):
                last_input = graph.placeholder(f"carried_w_sq_norm_{len(request.carried_batches)}")
            batch.w_sq_norm.replace_all_uses_with(last_input)
            graph.erase_node(batch.w_sq_norm)
            batch.w_sq_norm = last_input
            with graph.inserting_before(output):
                new_weights = [update.new_param for update in batch.updates]
                carried_outputs.append(graph.call_function(squared_norms, (new_weights, batch.compute_dtype)))
            request.carried_batches.append(batch)
        if not carried_outputs:
            return PassResult(gm, False)
        existing = output.args[0] if output.args[0] is not None else ()
        output.args = (tuple(existing) + tuple(carried_outputs),)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)
