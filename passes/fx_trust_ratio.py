"""Trust ratio: insert every trust-ratio parameter's coefficient as one small vector computation per batch.

Pattern: the batches of ``insert_lars_norms`` (squared-norm vectors of ``w`` and ``g``).
Rewrite: per batch ``coeff = f(sqrt(w_sq), sqrt(g_sq), **kwargs)`` with the function and arguments the
request names (``LayerwiseRequest.trust_ratio_call``): for LARS ``lars_fx.functional.trust_ratio`` with the
options, SGD's own weight decay (matched from its ``add(g, w, alpha=weight_decay)``) and, with ``use_clip``,
SGD's lr (a graph input when it is a tensor); then one ``coeff[k]`` per parameter, ``update.coefficient``;
for a flat buffer (a batch with ``segments``) ``per_chunk(coeff, segments)``, each chunk's segment's
coefficient as ``[chunks, 1]``, which broadcasts over the buffer's ``[chunks, chunk_size]`` in the update.
With ``telemetry`` the batch's ``(||w||, ||g||, coeff)`` are appended to the graph's outputs, listed in
``output.meta["lars_fx.telemetry"]`` with the batch's parameters' (or segments') indices in their group.
Preconditions (``requires``): ``insert_lars_norms`` ran (and ``reduce_sharded_norms`` when the request names
process groups); all updates of a batch share lr and weight decay.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from lars_fx.functional.flat import per_chunk

from .fx_norms import segments_of
from .fx_spec import TELEMETRY, PatternMismatch, batches_of, request_of, require_on_updates

__all__ = ["InsertTrustRatio"]


class InsertTrustRatio(PassBase):
    name = "insert_trust_ratio"

    def requires(self, gm: torch.fx.GraphModule) -> None:
        require_on_updates(
            gm, self.name, "insert_lars_norms",
            lambda u: u.batch is not None and u.batch.w_sq_norm is not None and u.batch.g_sq_norm is not None,
        )
        groups = tuple(request_of(gm, self.name).norm_process_groups)
        if any(batch.reduced_over != groups for batch in batches_of(gm)):
            raise PatternMismatch(
                None, "sharded norms",
                f"the graph reads sharded parameters: reduce_sharded_norms must run before {self.name}, or "
                "the norms would be this rank's shard's",
            )

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        request = request_of(gm, self.name)
        graph = gm.graph
        telemetry_nodes, telemetry_batches = [], []
        batches = batches_of(gm)
        for batch in batches:
            first = batch.updates[0]
            for update in batch.updates[1:]:
                same_lr = update.lr is first.lr or update.lr == first.lr
                if update.weight_decay != first.weight_decay or not same_lr:
                    raise PatternMismatch(
                        update.param, "param group", f"{update.param.name} and {first.param.name} are in "
                        "one param group but the optimizer updates them with different lr or weight decay",
                    )
            w_sq_norm, g_sq_norm = batch.norm_nodes()
            # Right after the batch's norms, so that (after the momentum pass's topological sort) each
            # batch's updates follow its own reductions: on CPU, w and g are then re-read from cache.
            with graph.inserting_before(g_sq_norm.next):
                w_norm = graph.call_function(torch.sqrt, (w_sq_norm,))
                g_norm = graph.call_function(torch.sqrt, (g_sq_norm,))
                function, kwargs = request.trust_ratio_call(first)
                coeff = graph.call_function(function, (w_norm, g_norm), kwargs)
                if batch.segments is not None:
                    (update,) = batch.updates
                    update.coefficient = graph.call_function(per_chunk, (coeff, segments_of(graph, batch)))
                else:
                    for k, update in enumerate(batch.updates):
                        update.coefficient = graph.call_function(operator.getitem, (coeff, k))
            if request.telemetry:
                telemetry_nodes += [w_norm, g_norm, coeff]
                telemetry_batches.append((batch.group_index, batch.indices_in_group()))
        if telemetry_nodes:
            output = next(n for n in graph.nodes if n.op == "output")
            existing = output.args[0] if output.args[0] is not None else ()
            output.args = (tuple(existing) + tuple(telemetry_nodes),)
            output.meta[TELEMETRY] = telemetry_batches
        gm.recompile()
        return PassResult(gm, bool(batches))
