"""Capture: trace an optimizer step into the canonical graph the LARS passes read.

Pattern: any Python callable or GraphModule that runs ``torch.optim.SGD``'s update (its for-loop or
foreach form, or the graph Dynamo made of ``SGD.step``).
Rewrite: ``make_fx`` under ``functionalize`` with fake tensors, so the result is ATen ops without
mutation or views, followed by one ``aten.copy_`` per mutated input (parameters, momentum buffers);
``copy(w, v)`` of equal shapes is ``v``; ``add(x, mul(y, c))`` with a number ``c`` is ``add(x, y, alpha=c)``; the multi-tensor ops (``aten._foreach_*``) and Dynamo's ``prims.fma`` are decomposed into per-tensor
``aten.add/mul/neg`` so both forms of SGD reach the match pass as the same per-parameter chain.
Preconditions: the step's Python control flow depends only on hyper-parameters and on which momentum
buffers exist (true of ``torch.optim.SGD``); inputs are the tensors the step reads. Tracing runs on fake
tensors and never touches the real ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["canonicalize", "SGD_DECOMPOSITIONS"]

aten = torch.ops.aten


def _per_tensor(op: Callable, *, list_args: int) -> Callable:
    def decomposition(*args, **kwargs):
        lists, rest = args[:list_args], args[list_args:]
        return [op(*tensors, *rest, **kwargs) for tensors in zip(*lists, strict=True)]

    return decomposition


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return aten.add.Tensor(aten.mul.Tensor(a, b), c)


# The multi-tensor ops torch.optim.SGD emits, as per-tensor ops.
SGD_DECOMPOSITIONS: dict = {
    aten._foreach_neg.default: _per_tensor(aten.neg.default, list_args=1),
    aten._foreach_add.List: _per_tensor(aten.add.Tensor, list_args=2),
    aten._foreach_add.Scalar: _per_tensor(aten.add.Tensor, list_args=1),
    aten._foreach_add.Tensor: _per_tensor(aten.add.Tensor, list_args=1),
    aten._foreach_mul.List: _per_tensor(aten.mul.Tensor, list_args=2),
    aten._foreach_mul.Scalar: _per_tensor(aten.mul.Tensor, list_args=1),
    aten._foreach_mul.Tensor: _per_tensor(aten.mul.Tensor, list_args=1),
}


def _decompositions() -> dict:
    # Dynamo writes `param.add_(grad, alpha=-lr)` with a tensor lr as prims.fma, an op it registers
    # itself (so it exists only once Dynamo has run, and not in every torch version).
    table = dict(SGD_DECOMPOSITIONS)
    if hasattr(torch.ops.prims, "fma"):
        table[torch.ops.prims.fma.default] = _fma
    return table


@contextlib.contextmanager
def _as_compiling() -> Iterator[None]:
    # SGD's foreach form keeps a tensor lr in the graph only "when compiling"; this trace is a compile.
    previous = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = previous


def _drop_same_shape_copies(gm: torch.fx.GraphModule) -> None:
    # `w.copy_(v)` functionalizes to `copy_(w, copy(w, v))`; with equal shape and dtype copy(w, v) is v.
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.copy.default:
            destination, source = (n.meta.get("val") for n in node.args[:2])
            same = destination is not None and source is not None
            if same and destination.shape == source.shape and destination.dtype == source.dtype:
                node.replace_all_uses_with(node.args[1])
                gm.graph.erase_node(node)
    gm.recompile()


def _fold_scalar_multipliers(gm: torch.fx.GraphModule) -> None:
    # `add(x, mul(y, c))` with a Python number c is `add(x, y, alpha=c)`: Dynamo writes SGD's
    # `add_(d, alpha=1 - dampening)` and `add_(dir, alpha=-lr)` one way or the other across torch
    # versions (2.11 spells them with a mul), and the match pass reads the alpha form.
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.add.Tensor or node.kwargs.get("alpha", 1) != 1:
            continue
        x, scaled = node.args
        if not (isinstance(scaled, torch.fx.Node) and scaled.target is aten.mul.Tensor and len(scaled.users) == 1):
            continue
        y, factor = scaled.args
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and isinstance(y, torch.fx.Node):
            node.args = (x, y)
            node.kwargs = {**node.kwargs, "alpha": factor}
            gm.graph.erase_node(scaled)
    gm.recompile()


def canonicalize(step: Callable, example_inputs: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """Trace ``step(*example_inputs)`` into the canonical ATen graph (see the module docstring)."""
    functional = torch.func.functionalize(step, remove="mutations_and_views")
    with torch.no_grad(), _as_compiling():
        gm = make_fx(functional, decomposition_table=_decompositions(), tracing_mode="fake")(*example_inputs)
    _drop_same_shape_copies(gm)
    _fold_scalar_multipliers(gm)
    return gm
