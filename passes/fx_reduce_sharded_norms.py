"""Reduce sharded norms: the squared norms of sharded (DTensor) parameters summed over the ranks, with one
all-reduce per sharding process group for the whole step.

Pattern: the batches of ``insert_lars_norms`` when the request carries a sharded reduction
(``LayerwiseRequest.norm_process_groups``): the graph reads this rank's pieces of the parameters (see
``lars_fx.sharding``), so each batch's ``w_sq_norm`` and ``g_sq_norm`` hold local sums of squares.
Rewrite: every batch's ``w_sq_norm`` vector, then every batch's ``g_sq_norm`` vector (all param groups, all
per-tensor CPU batches, all dtypes) are concatenated into one vector of their promoted dtype; it is
multiplied by the LARS placeholders' 0/1 weights (``LayerwiseRequest.norm_weights``, a constant; skipped when
all are 1), summed over each process group in order with ``_c10d_functional.all_reduce(vector, "sum", group)``
and ``wait_tensor``, and split back: each batch's ``w_sq_norm``/``g_sq_norm`` becomes its slice of the reduced
vector in the batch's compute dtype, so ``insert_trust_ratio`` and telemetry read the global norms. The new
nodes go before the graph's first write-back, as the norms do (a later Inductor pass,
``norm_after_write_back``, only moves norms of the written weights, which this graph does not carry).
Without a sharded reduction the graph is untouched.
Each batch's ``reduced_over`` records the process groups; ``insert_trust_ratio`` refuses a sharded graph whose
batches were not reduced (this pass switched off).
Preconditions (``requires``): ``insert_lars_norms`` ran, ``insert_trust_ratio`` has not;
``carry_weight_norms`` is off (a carried ``||w'||^2`` of a shard would bypass the reduction); all LARS tensors
on one device.
"""

from __future__ import annotations

import functools

import torch
import torch.fx
from torch import Tensor
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from lars_fx._compat import c10d_all_reduce_ops

from .fx_norms import write_back_point
from .fx_spec import NormBatch, PatternMismatch, batches_of, request_of, require_on_updates

__all__ = ["ReduceShardedNorms", "weighted"]

aten = torch.ops.aten
prims = torch.ops.prims


def weighted(vector: Tensor, weights: tuple[float, ...]) -> Tensor:
    """``vector * weights``: an entry counts on the ranks where its weight is 1 (see ``lars_fx.sharding``)."""
    return vector * torch.tensor(weights, dtype=vector.dtype, device=vector.device)


def _device(batch: NormBatch) -> torch.device:
    return batch.updates[0].param.meta["val"].device


class ReduceShardedNorms(PassBase):
    name = "reduce_sharded_norms"

    def requires(self, gm: torch.fx.GraphModule) -> None:
        request = request_of(gm, self.name)
        if not request.norm_process_groups:
            return
        if request.carry_weight_norms:
            raise PatternMismatch(
                None, "sharded norms",
                "carry_weight_norms would carry the unreduced ||w'||^2 of a shard: switch it off",
            )
        require_on_updates(
            gm, self.name, "insert_lars_norms",
            lambda u: u.batch is not None and u.batch.w_sq_norm is not None and u.batch.g_sq_norm is not None,
        )
        if any(batch.updates[0].coefficient is not None for batch in batches_of(gm)):
            raise PatternMismatch(None, "norm batch", f"{self.name} must run before insert_trust_ratio")
        if any(batch.segments is not None for batch in batches_of(gm)):
            raise PatternMismatch(
                None, "sharded norms",
                "a flat buffer's segments are not sharded parameters (flat=True refuses DTensors): this pass "
                "counts one norm per update",
            )

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        request = request_of(gm, self.name)
        batches = batches_of(gm)
        if not request.norm_process_groups or not batches:
            return PassResult(gm, False)
        devices = {_device(batch) for batch in batches}
        if len(devices) > 1:
            raise PatternMismatch(
                None, "sharded norms",
                f"the LARS tensors are on several devices {sorted(map(str, devices))}; one reduced vector "
                "needs them on one",
            )
        weights = []
        for batch in batches:
            for update in batch.updates:
                if update.param.name not in request.norm_weights:
                    raise PatternMismatch(
                        update.param, "sharded norms", "the request gives this LARS tensor no weight"
                    )
                weights.append(float(request.norm_weights[update.param.name]))
        dtype = functools.reduce(torch.promote_types, [batch.compute_dtype for batch in batches])
        graph = gm.graph
        with graph.inserting_before(write_back_point(graph)):
            pieces = [self._cast(graph, b.norm_nodes()[0], b.compute_dtype, dtype) for b in batches]
            pieces += [self._cast(graph, b.norm_nodes()[1], b.compute_dtype, dtype) for b in batches]
            vector = graph.call_function(aten.cat.default, (pieces,))
            if not all(w == 1.0 for w in weights):
                vector = graph.call_function(weighted, (vector, tuple(weights + weights)))
            all_reduce, wait_tensor = c10d_all_reduce_ops()
            for group_name in request.norm_process_groups:
                vector = graph.call_function(all_reduce, (vector, "sum", group_name))
                vector = graph.call_function(wait_tensor, (vector,))
            start, total = 0, len(weights)
            for batch in batches:
                count = len(batch.updates)
                batch.w_sq_norm = self._slice(graph, vector, start, count, dtype, batch.compute_dtype)
                batch.g_sq_norm = self._slice(graph, vector, total + start, count, dtype, batch.compute_dtype)
                batch.reduced_over = tuple(request.norm_process_groups)
                start += count
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    @staticmethod
    def _cast(
        graph: torch.fx.Graph, node: torch.fx.Node, dtype: torch.dtype, to: torch.dtype
    ) -> torch.fx.Node:
        return node if dtype == to else graph.call_function(prims.convert_element_type.default, (node, to))

    def _slice(
        self,
        graph: torch.fx.Graph,
        vector: torch.fx.Node,
        start: int,
        count: int,
        dtype: torch.dtype,
        to: torch.dtype,
    ) -> torch.fx.Node:
        piece = graph.call_function(aten.slice.Tensor, (vector, 0, start, start + count))
        return self._cast(graph, piece, dtype, to)
