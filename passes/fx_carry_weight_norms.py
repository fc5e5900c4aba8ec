"""Carry weight norms: take ``||w||^2`` from the previous step instead of reading ``w`` twice.

Pattern: the batches of ``insert_lars_norms``, when the request asks for it (``carry_weight_norms``); runs
after the pass that writes the update, so the value each ``copy_`` writes back into a parameter placeholder is
the step's new weight.
Rewrite, per batch of float32 or float64 weights (half-precision ones keep reading ``w``): its
``squared_norms([w...])`` node becomes a new graph input (placeholder ``carried_w_sq_norm_<k>``, after the
existing inputs, tagged ``meta["lars_fx.carried_batch"]``), and the same squared norms of the weights the
step writes back (``fx_norms.squared_norm_node``: ``squared_norms([w'...])``, or ``segment_squared_norms``
of a flat buffer's segments) are appended to the graph's outputs (same order). The caller feeds step t's
outputs to step t+1. Inductor computes those reductions inside the update's own loop
(``fx_norm_after_write_back``), so the step reads ``w`` once instead of twice: 24 instead of 28 bytes per
fp32 parameter.
Preconditions (``requires``): ``insert_lars_norms`` ran; every batch's weights are written back. The caller
owns the carry's validity: weights written between two steps (a checkpoint load, an in-place edit, another
optimizer) need fresh norms, ``squared_norms`` of the current weights.
"""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .fx_norms import squared_norm_node
from .fx_spec import CARRIED_BATCH, PatternMismatch, batches_of, request_of, require_on_updates

__all__ = ["CarryWeightNorms"]


def _stored_dtype(param: torch.fx.Node) -> torch.dtype | None:
    value = param.meta.get("val")
    return value.dtype if value is not None else None


def _written_values(graph: torch.fx.Graph) -> dict[torch.fx.Node, torch.fx.Node]:
    """Placeholder -> the value the graph's ``copy_`` writes back into it."""
    written: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.copy_.default:
            continue
        destination, value = node.args[0], node.args[1]
        if isinstance(destination, torch.fx.Node) and destination.op == "placeholder":
            assert isinstance(value, torch.fx.Node)  # copy_(Tensor, Tensor)
            written[destination] = value
    return written


class CarryWeightNorms(PassBase):
    name = "carry_weight_norms"

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not request_of(gm, self.name).carry_weight_norms:
            return
        require_on_updates(
            gm, self.name, "insert_lars_norms",
            lambda u: u.batch is not None and u.batch.w_sq_norm is not None,
        )
        written = _written_values(gm.graph)
        unwritten = [u for b in batches_of(gm) for u in b.updates if u.param not in written]
        if unwritten:
            raise PatternMismatch(
                unwritten[0].param, "carried weight norm", "the graph does not write this weight back"
            )

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        batches = batches_of(gm)
        if not request_of(gm, self.name).carry_weight_norms or not batches:
            return PassResult(gm, False)
        graph = gm.graph
        written = _written_values(graph)
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        output = next(n for n in graph.nodes if n.op == "output")
        carried_outputs: list[torch.fx.Node] = []
        for batch in batches:
            if any(_stored_dtype(update.param) != batch.compute_dtype for update in batch.updates):
                # Half-precision weights: Inductor would sum w' in float32 before its rounding to the
                # stored dtype, a norm ~1e-4 off the weights' own. They keep reading w.
                continue
            with graph.inserting_after(last_input):
                last_input = graph.placeholder(f"carried_w_sq_norm_{len(carried_outputs)}")
            last_input.meta[CARRIED_BATCH] = batch
            w_sq_norm = batch.w_sq_norm
            assert w_sq_norm is not None  # requires checked that insert_lars_norms ran
            w_sq_norm.replace_all_uses_with(last_input)
            graph.erase_node(w_sq_norm)
            batch.w_sq_norm = last_input
            with graph.inserting_before(output):
                new_weights = [written[update.param] for update in batch.updates]
                carried_outputs.append(squared_norm_node(graph, batch, new_weights))
        if not carried_outputs:
            return PassResult(gm, False)
        existing = output.args[0] if output.args[0] is not None else ()
        output.args = (tuple(existing) + tuple(carried_outputs),)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)
