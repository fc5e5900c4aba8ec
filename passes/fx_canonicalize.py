"""Capture: trace an optimizer step into the canonical graph the LARS passes read.

Pattern: any Python callable or GraphModule that runs ``torch.optim.SGD``'s update (its for-loop or
foreach form, or the graph Dynamo made of ``SGD.step``).
Rewrite: ``make_fx`` under ``functionalize`` with fake tensors, so the result is ATen ops without
mutation or views, followed by one ``aten.copy_`` per mutated input (parameters, momentum buffers);
``copy(w, v)`` of equal shapes is ``v``; ``add(x, mul(y, c))`` with a number ``c`` is ``add(x, y, alpha=c)``;
the multi-tensor ops (``aten._foreach_*``) and Dynamo's ``prims.fma`` are decomposed into per-tensor
``aten.add/mul/neg`` so both forms of SGD reach the match pass as the same per-parameter chain.
Symbolic scalars become 0-d tensors: Dynamo hands a float that changes between calls (a scheduled lr,
momentum, weight decay or dampening) to the backend as a 0-d float64 tensor read with ``.item()``;
``_local_scalar_dense(t)`` becomes ``t``, scalar arithmetic on it (``-lr``, ``1 - dampening``) the
same arithmetic on the tensor, and a Scalar argument fed by it (``add(x, y, alpha=s)``) a tensor
operand (``add(x, mul(y, s))``). So no SymFloat reaches Inductor, whose tensorify pass would bake a
Scalar argument's current value into the graph behind a guard (and its graph caches could reuse it
for later values). The tensors made this way carry ``meta["lars_fx_scalar"] = True``: the match pass
reads ``mul(y, s)`` with such an ``s`` as the factor ``s``.
Preconditions: the step's Python control flow depends only on hyper-parameters and on which momentum
buffers exist (true of ``torch.optim.SGD``); inputs are the tensors the step reads. Tracing runs on fake
tensors and never touches the real ones.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from lars_fx._compat import as_compiling

from .fx_spec import PatternMismatch

__all__ = ["canonicalize", "SGD_DECOMPOSITIONS", "is_scalar_tensor"]

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
        is_add = node.op == "call_function" and node.target is aten.add.Tensor
        if not is_add or node.kwargs.get("alpha", 1) != 1:
            continue
        x, scaled = node.args
        is_mul = isinstance(scaled, torch.fx.Node) and scaled.target is aten.mul.Tensor
        if not (is_mul and len(scaled.users) == 1):
            continue
        y, factor = scaled.args
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and isinstance(y, torch.fx.Node):
            node.args = (x, y)
            node.kwargs = {**node.kwargs, "alpha": factor}
            gm.graph.erase_node(scaled)
    gm.recompile()


_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)
# Scalar arithmetic on symbolic scalars -> the ATen op on tensors (tensor first; the number or tensor second).
_SCALAR_OPS = {operator.add: aten.add.Tensor, operator.sub: aten.sub.Tensor, operator.mul: aten.mul.Tensor,
               operator.truediv: aten.div.Tensor}
# Ops whose second operand may be a tensor where the graph has a symbolic Scalar.
_TENSOR_OPERAND = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
_SCALAR_OVERLOADS = {aten.add.Scalar: aten.add.Tensor, aten.sub.Scalar: aten.sub.Tensor,
                     aten.mul.Scalar: aten.mul.Tensor, aten.div.Scalar: aten.div.Tensor}


def is_scalar_tensor(node: object) -> bool:
    """Whether ``node`` is a hyperparameter made a 0-d tensor by ``canonicalize`` (see the module
    docstring)."""
    return isinstance(node, torch.fx.Node) and node.meta.get("lars_fx_scalar", False)


def _is_symbolic(value: object) -> bool:
    return isinstance(value, torch.fx.Node) and isinstance(value.meta.get("val"), _SYMBOLIC)


def _tensorify_scalars(gm: torch.fx.GraphModule) -> None:
    graph = gm.graph
    as_tensor: dict[torch.fx.Node, torch.fx.Node] = {}

    def made(target: Any, args: tuple) -> torch.fx.Node:
        node = graph.call_function(target, args)
        node.meta["lars_fx_scalar"] = True
        return node

    def tensor_of(node: torch.fx.Node) -> torch.fx.Node:
        if node in as_tensor:
            return as_tensor[node]
        args: tuple[Any, ...] = node.args
        with graph.inserting_before(node.next):  # in order, right after the scalar
            if node.target is aten._local_scalar_dense.default:
                source = args[0]
                if source.meta["val"].dim() != 0:
                    source = made(aten.squeeze.default, (source,))
                source.meta["lars_fx_scalar"] = True
                tensor = source
            elif node.target is operator.neg:
                tensor = made(aten.neg.default, (tensor_of(args[0]),))
            elif node.target in _SCALAR_OPS and _is_symbolic(args[0]):
                other = tensor_of(args[1]) if _is_symbolic(args[1]) else args[1]
                tensor = made(_SCALAR_OPS[node.target], (tensor_of(args[0]), other))
            elif node.target in (operator.add, operator.mul):
                tensor = made(_SCALAR_OPS[node.target], (tensor_of(args[1]), args[0]))
            elif node.target is operator.sub:
                tensor = made(aten.rsub.Scalar, (tensor_of(args[1]), args[0]))
            elif node.target is operator.truediv:
                divisor = tensor_of(args[1])
                tensor = made(aten.div.Tensor, (made(aten.full_like.default, (divisor, args[0])), divisor))
            else:
                raise PatternMismatch(
                    node, "hyperparameter arithmetic", f"{node.target} of a symbolic scalar: the passes turn "
                    "only +, -, *, / and negation of a changing float hyperparameter into tensor ops",
                )
        as_tensor[node] = tensor
        return tensor

    for node in list(graph.nodes):
        if node.op not in ("call_function", "output") or _is_symbolic(node):
            continue
        alpha = node.kwargs.get("alpha")
        if _is_symbolic(alpha) and node.target in (aten.add.Tensor, aten.sub.Tensor):
            with graph.inserting_before(node):
                scaled = graph.call_function(aten.mul.Tensor, (node.args[1], tensor_of(alpha)))
            node.args = (node.args[0], scaled)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "alpha"}
        target = _SCALAR_OVERLOADS.get(node.target, node.target)
        if target in _TENSOR_OPERAND and len(node.args) == 2 and _is_symbolic(node.args[1]):
            node.target = target
            node.args = (node.args[0], tensor_of(node.args[1]))
        still = [a for a in (*node.args, *node.kwargs.values()) if _is_symbolic(a)]
        if still:
            raise PatternMismatch(
                node, "hyperparameter as a tensor", f"{still[0].name}, a symbolic scalar (a float that "
                f"changes between steps), is an argument of {node.target}, which the passes cannot give a "
                "tensor",
            )
    for node in reversed(list(graph.nodes)):
        if _is_symbolic(node) and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def canonicalize(step: Callable, example_inputs: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """Trace ``step(*example_inputs)`` into the canonical ATen graph (see the module docstring)."""
    functional = torch.func.functionalize(step, remove="mutations_and_views")
    # as_compiling: SGD's foreach form keeps a tensor lr in the graph only when compiling.
    with torch.no_grad(), as_compiling():
        gm = make_fx(functional, decomposition_table=_decompositions(), tracing_mode="fake")(*example_inputs)
    _drop_same_shape_copies(gm)
    _tensorify_scalars(gm)
    _fold_scalar_multipliers(gm)
    return gm
