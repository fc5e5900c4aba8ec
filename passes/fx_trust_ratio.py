"""Trust ratio: insert LARS's coefficient of every LARS parameter as one small vector computation.

Pattern: the batches of ``insert_lars_norms`` (squared-norm vectors of ``w`` and ``g``).
Rewrite: per batch ``coeff = lars_fx.functional.trust_ratio(sqrt(w_sq), sqrt(g_sq), weight_decay=...,
coefficient=..., epsilon=..., use_clip=..., lr=..., unit_trust_on_zero_norm=...)`` (clip included),
then one ``coeff[k]`` per parameter for the momentum pass. The weight decay is SGD's own (matched from
its ``add(g, w, alpha=weight_decay)``) and ``lr`` SGD's lr (a graph input when it is a tensor). With
``telemetry`` the batch's ``(||w||, ||g||, coeff)`` are appended to the graph's outputs.
Preconditions: ``insert_lars_norms`` ran; all updates of a batch share lr and weight decay (one group).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from lars_fx.functional import trust_ratio

from .fx_spec import PatternMismatch, request_of

__all__ = ["InsertTrustRatio"]


class InsertTrustRatio(PassBase):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        request = request_of(gm, "insert_trust_ratio")
        graph = gm.graph
        telemetry_nodes = []
        for batch in request.batches:
            if batch.w_sq_norm is None or batch.g_sq_norm is None:
                raise PatternMismatch(None, "LARS batch", "insert_lars_norms must run before insert_trust_ratio")
            first = batch.updates[0]
            for update in batch.updates[1:]:
                if update.weight_decay != first.weight_decay or update.lr is not first.lr and update.lr != first.lr:
                    raise PatternMismatch(
                        update.new_param, "param group", f"{update.param.name} and {first.param.name} are in "
                        "one param group but SGD updates them with different lr or weight decay",
                    )
            # Right after the batch's norms, so that (after the momentum pass's topological sort) each
            # batch's updates follow its own reductions: on CPU, w and g are then re-read from cache.
            with graph.inserting_before(batch.g_sq_norm.next):
                w_norm = graph.call_function(torch.sqrt, (batch.w_sq_norm,))
                g_norm = graph.call_function(torch.sqrt, (batch.g_sq_norm,))
                coeff = graph.call_function(
                    trust_ratio,
                    (w_norm, g_norm),
                    {
                        "weight_decay": first.weight_decay,
                        "coefficient": request.coefficient,
                        "epsilon": request.epsilon,
                        "use_clip": request.use_clip,
                        "lr": first.lr if request.use_clip else None,
                        "unit_trust_on_zero_norm": request.unit_trust_on_zero_norm,
                    },
                )
                for k, update in enumerate(batch.updates):
                    update.coefficient = graph.call_function(operator.getitem, (coeff, k))
            if request.telemetry:
                telemetry_nodes += [w_norm, g_norm, coeff]
                request.telemetry_outputs.append(
                    (batch.group_index, [u.role.index_in_group for u in batch.updates])
                )
        if telemetry_nodes:
            output = next(n for n in graph.nodes if n.op == "output")
            existing = output.args[0] if output.args[0] is not None else ()
            output.args = (tuple(existing) + tuple(telemetry_nodes),)
        gm.recompile()
        return PassResult(gm, bool(request.batches))
