"""Norm: insert the squared norms of ``w`` and ``g`` of every trust-ratio parameter, batched.

Pattern: the ``LayerUpdate`` records a matcher left on the parameter placeholders (``match_sgd_update``'s for
LARS), those whose parameter gets the trust ratio; ``g`` is the record's ``grad`` (LAMB's: its update ``r``).
Rewrite: per batch (one param group, one device, one compute dtype; float32 for half-precision
parameters, as ``lars_fx.functional.compute_dtype``) two nodes ``squared_norms([w...], dtype)`` and
``squared_norms([g'...], dtype)``, each one horizontal reduction over the batch's tensors producing a
vector (``g'`` is the gradient after ``maximize``; its norm is that of ``g``). Inserted just before the
graph's first write-back (``copy_``), so they read the parameters before the step writes them.
On the devices in ``per_tensor_devices`` (default: CPU) a batch is one tensor: Inductor's C++ backend
emits the whole step as one kernel anyway, and a tensor's update then runs right after its own
reductions and re-reads ``w`` and ``g`` from cache (measured on ResNet-50's shapes, 2 cores: 16.2 ms
against 18.6 ms per step with one batch per group). On GPUs one batch per group keeps the kernels few.
A flat buffer of many parameters (a role with ``segments``, ``LARS(flat=True, fused=True)``) is a batch of its
own whose norms are one per segment: ``segment_squared_norms(x, Segments(chunks, ranges, count, max_chunks),
dtype)`` (``lars_fx.functional.flat``), a masked reduction over the buffer's chunks and a gather-sum per
segment, whatever the number of segments. ``squared_norm_node`` inserts a batch's squared norms of given
tensors, either way (the carry pass uses it for the written weights).
Each update's ``batch`` is set to its ``NormBatch``, which holds the two nodes.
Preconditions (``requires``): a matcher ran; placeholders carry ``meta["val"]`` (``make_fx`` sets it).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from lars_fx.functional import compute_dtype
from lars_fx.functional.flat import Segments, segment_squared_norms

from .fx_spec import NormBatch, PatternMismatch, require_on_updates, updates_of

__all__ = ["InsertLarsNorms", "squared_norms", "squared_norm_node", "segments_of", "write_back_point"]


def squared_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``[sum(t**2) for t in tensors]`` in ``dtype`` as one vector: one horizontal reduction."""
    return torch.stack([torch.sum(torch.square(t.to(dtype))) for t in tensors])


def segments_of(graph: torch.fx.Graph, batch: NormBatch) -> Segments:
    """A flat buffer batch's ``Segments`` as graph arguments: its tensors are the placeholders the role
    names."""
    segments = batch.segments
    assert segments is not None
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    chunks, ranges = placeholders[segments.chunks], placeholders[segments.ranges]
    return Segments(chunks, ranges, segments.num_segments, segments.max_chunks)


def squared_norm_node(graph: torch.fx.Graph, batch: NormBatch, tensors: list[torch.fx.Node]) -> torch.fx.Node:
    """The node of ``batch``'s squared norms of ``tensors`` (its weights, gradients or written weights), at
    the graph's insertion point: ``squared_norms`` of a batch of tensors, ``segment_squared_norms`` of a
    flat buffer's segments."""
    if batch.segments is None:
        return graph.call_function(squared_norms, (tensors, batch.compute_dtype))
    (buffer,) = tensors
    segments = segments_of(graph, batch)
    return graph.call_function(segment_squared_norms, (buffer, segments, batch.compute_dtype))


def write_back_point(graph: torch.fx.Graph) -> torch.fx.Node:
    """The first ``copy_`` into a graph input (or the output): new subgraphs go before it."""
    for node in graph.nodes:
        is_copy = node.op == "call_function" and node.target is torch.ops.aten.copy_.default
        if node.op == "output" or is_copy:
            return node
    raise AssertionError("a graph always has an output node")


class InsertLarsNorms(PassBase):
    name = "insert_lars_norms"

    def __init__(self, per_tensor_devices: tuple[str, ...] = ("cpu",)) -> None:
        super().__init__()
        self.per_tensor_devices = per_tensor_devices

    def requires(self, gm: torch.fx.GraphModule) -> None:
        require_on_updates(gm, self.name, "a matcher", lambda update: True)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        # (param group, device, compute dtype, the placeholder's name on a per-tensor device) -> its batch
        batches: dict[tuple[int, torch.device, torch.dtype, str | None], NormBatch] = {}
        for update in updates_of(gm):
            if not update.role.use_lars:
                continue
            value = update.param.meta.get("val")
            if not isinstance(value, Tensor):
                raise PatternMismatch(
                    update.param, "LARS parameter", "placeholder has no meta['val'] (trace it with make_fx)"
                )
            dtype = compute_dtype(value.dtype)
            segments = update.role.segments
            alone = segments is not None or value.device.type in self.per_tensor_devices
            key = (update.role.group_index, value.device, dtype, update.param.name if alone else None)
            batch = batches.setdefault(key, NormBatch(update.role.group_index, dtype, [], segments=segments))
            batch.updates.append(update)
            update.batch = batch
        with gm.graph.inserting_before(write_back_point(gm.graph)):
            for batch in batches.values():
                batch.w_sq_norm = squared_norm_node(gm.graph, batch, [u.param for u in batch.updates])
                batch.g_sq_norm = squared_norm_node(gm.graph, batch, [u.grad for u in batch.updates])
        gm.recompile()
        return PassResult(gm, bool(batches))
