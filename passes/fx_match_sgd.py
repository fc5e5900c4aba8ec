"""Match: find each parameter's ``torch.optim.SGD`` update in a canonical graph.

Pattern (canonical ATen from ``fx_canonicalize``; ``w``, ``g``, ``b`` placeholders of a parameter, its
gradient and its momentum buffer; brackets are optional, ``|`` alternatives)::

    g'  = [neg](g)                                   # maximize
    d   = add(g', w, alpha=wd) | g'                  # weight decay
    b'  = add(mul(b, m), d, alpha=1-dampening)       # momentum, existing buffer (b' copied into b)
        | clone([detach](d))                         # momentum, first step (b' a graph output)
    dir = add(d, b', alpha=m) | b' | d               # nesterov | momentum | none
    w'  = add(w, mul(dir, neg(lr))) | add(mul(dir, neg(lr)), w) | add(w, dir, alpha=-lr)
    copy_(w, w')   [copy_(b, b')]   [copy_(g, dir)  # foreach nesterov writes into .grad]

A hyperparameter is a number, or a 0-d tensor node: a tensor lr, or a float that changes between
steps, which ``fx_canonicalize`` made a tensor; there ``add(x, y, alpha=s)`` reads ``add(x, mul(y, s))``
(``s`` tagged ``lars_fx_scalar``) and ``1 - dampening`` is ``rsub(dampening, 1)``.

Rewrite: none; records one ``SgdUpdate`` per parameter on its placeholder (``meta["lars_fx.update"]``) and
tags the writes into gradients ``meta["lars_fx.grad_write"]`` (the momentum pass drops them).
Preconditions (``requires``): the request names parameter placeholders of this graph. Raises
``PatternMismatch`` (node, pattern, why) when a parameter is written by anything else, or when a graph input
other than a parameter, its buffer or its gradient is written: the passes never guess.
"""

from __future__ import annotations

from typing import TypeGuard

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .fx_canonicalize import is_scalar_tensor
from .fx_spec import (
    GRAD_WRITE,
    UPDATE,
    Hyperparameter,
    ParamRole,
    PatternMismatch,
    SgdUpdate,
    request_of,
    require_parameter_placeholders,
)

__all__ = ["MatchSgdUpdate"]

aten = torch.ops.aten
_TRANSPARENT = (aten.detach.default, aten.detach_copy.default, aten.alias.default, aten.alias_copy.default)


def _is(node: object, target: object) -> TypeGuard[torch.fx.Node]:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _arg(node: torch.fx.Node, index: int, pattern: str) -> torch.fx.Node:
    """``node.args[index]``, which ``pattern`` reads as a tensor: a node of the graph."""
    value = node.args[index]
    if not isinstance(value, torch.fx.Node):
        raise PatternMismatch(node, pattern, f"argument {index} is {value!r}, not a tensor of the graph")
    return value


def _alpha(node: torch.fx.Node) -> object:
    return node.kwargs.get("alpha", 1)


def _hyperparameter(value: object, node: torch.fx.Node, what: str) -> Hyperparameter:
    if isinstance(value, torch.fx.Node) and is_scalar_tensor(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PatternMismatch(
            node, what,
            f"expected a number or a 0-d hyperparameter tensor, got {value!r}, which SGD does not compute",
        )
    return float(value)


def _scaled_addend(add: torch.fx.Node) -> tuple[torch.fx.Node, object, object]:
    """``add(x, y, alpha=a)`` -> (the node reading y, y, a); ``add(x, mul(y, s))`` with a hyperparameter
    tensor ``s`` -> (the mul, y, s)."""
    addend = add.args[1]
    if "alpha" not in add.kwargs and _is(addend, aten.mul.Tensor) and is_scalar_tensor(addend.args[1]):
        return addend, addend.args[0], addend.args[1]
    return add, addend, _alpha(add)


def _one_minus(value: Hyperparameter, node: torch.fx.Node, what: str) -> Hyperparameter:
    if not isinstance(value, torch.fx.Node):
        return 1 - value
    if _is(value, aten.rsub.Scalar) and value.args[1] == 1:  # 1 - dampening of a changing dampening
        return _arg(value, 0, what)
    raise PatternMismatch(node, what, f"{value.name} is not 1 - dampening")


class MatchSgdUpdate(PassBase):
    name = "match_sgd_update"

    def requires(self, gm: torch.fx.GraphModule) -> None:
        require_parameter_placeholders(gm, self.name)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        request = request_of(gm, self.name)
        placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        output = next(n for n in gm.graph.nodes if n.op == "output")
        outputs = set(output.all_input_nodes)
        writes = _writes(gm.graph)

        updates: list[SgdUpdate] = []
        explained: set[torch.fx.Node] = set()
        for name, role in request.params.items():
            param = placeholders[name]
            if param not in writes:
                continue  # a parameter this step does not update (no gradient)
            new_param = _arg(writes[param], 1, "SGD update")
            update = _match_update(param, new_param, writes, outputs, role)
            explained.add(writes[param])
            if update.new_buffer is not None and update.buffer_mul is not None:
                explained.add(writes[_arg(update.buffer_mul, 0, "momentum buffer mul(buf, momentum)")])
            updates.append(update)
        for destination, copy in writes.items():
            if copy in explained:
                continue
            if any(copy.args[1] is u.direction and destination is _strip_neg(u.grad) for u in updates):
                copy.meta[GRAD_WRITE] = True
                continue
            raise PatternMismatch(
                copy, "SGD update",
                f"graph input {destination.name} is written but is no parameter, momentum buffer or gradient "
                "of the optimizer; a LARS rewrite would leave it unexplained",
            )
        if request.params and not updates:
            raise PatternMismatch(None, "SGD update", "no parameter of the optimizer is written by the graph")
        for update in updates:
            update.param.meta[UPDATE] = update
        return PassResult(gm, False)


def _writes(graph: torch.fx.Graph) -> dict[torch.fx.Node, torch.fx.Node]:
    """copy_ destination placeholder -> the copy_ node writing it."""
    writes: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        if not _is(node, aten.copy_.default):
            continue
        destination = _arg(node, 0, "SGD update")
        if destination.op != "placeholder":
            continue
        if destination in writes:
            raise PatternMismatch(node, "SGD update", f"{destination.name} is written twice")
        writes[destination] = node
    return writes


def _strip_neg(node: object) -> object:
    return node.args[0] if _is(node, aten.neg.default) else node


def _match_update(
    param: torch.fx.Node,
    new_param: torch.fx.Node,
    writes: dict[torch.fx.Node, torch.fx.Node],
    outputs: set[torch.fx.Node],
    role: ParamRole,
) -> SgdUpdate:
    # w' = w - lr * dir, in one of three spellings; `reader` is the node that reads dir.
    lr: Hyperparameter
    if _is(new_param, aten.add.Tensor) and _alpha(new_param) == 1 and param in new_param.args[:2]:
        reader = new_param.args[1] if new_param.args[0] is param else new_param.args[0]
        what = "SGD parameter update w + dir * (-lr)"
        if not (_is(reader, aten.mul.Tensor) and _is(reader.args[1], aten.neg.default)):
            raise PatternMismatch(new_param, what, f"{reader} is not mul(dir, neg(lr))")
        direction, lr = _arg(reader, 0, what), _arg(_arg(reader, 1, what), 0, what)
    elif _is(new_param, aten.add.Tensor) and new_param.args[0] is param:
        what = "SGD parameter update add(w, dir, alpha=-lr)"
        reader, direction = new_param, _arg(new_param, 1, what)
        negative_lr = _hyperparameter(_alpha(new_param), new_param, what)
        if isinstance(negative_lr, torch.fx.Node):
            raise PatternMismatch(
                new_param, what,
                f"alpha {negative_lr.name} is a tensor: fx_canonicalize spells it mul(dir, neg(lr))",
            )
        lr = -negative_lr
    else:
        raise PatternMismatch(
            new_param, "SGD parameter update w' = w - lr * dir",
            f"the value written into parameter {param.name} is not add(w, ...) of the parameter",
        )

    def first_reader(node: torch.fx.Node) -> torch.fx.Node | None:
        """clone([detach](d)) -> the node that reads d; None if `node` is no new first-step buffer."""
        if node not in outputs or not _is(node, aten.clone.default):
            return None
        while any(_is(node.args[0], t) for t in _TRANSPARENT):
            node = _arg(node, 0, "momentum buffer clone([detach](d))")
        return node

    def steady_buffer_mul(node: torch.fx.Node) -> torch.fx.Node | None:
        """add(mul(b, m), ...) written into the buffer b -> the mul; None if `node` is no such new buffer."""
        if not _is(node, aten.add.Tensor):
            return None
        mul = node.args[0]
        if not _is(mul, aten.mul.Tensor):
            return None
        buffer = mul.args[0]
        is_own = isinstance(buffer, torch.fx.Node) and buffer in writes and writes[buffer].args[1] is node
        return mul if is_own else None

    def is_new_buffer(node: object) -> TypeGuard[torch.fx.Node]:
        return isinstance(node, torch.fx.Node) and (
            first_reader(node) is not None or steady_buffer_mul(node) is not None
        )

    momentum: Hyperparameter | None = 0.0
    dampening: Hyperparameter = 0.0
    new_buffer: torch.fx.Node | None = None
    buffer_mul: torch.fx.Node | None = None
    nesterov_add: torch.fx.Node | None = None
    decayed: object  # a node of the graph once the gradient is matched below
    consumers: set[torch.fx.Node] = set()
    may_be_nesterov = _is(direction, aten.add.Tensor) and len(direction.args) == 2
    nesterov = _scaled_addend(direction) if may_be_nesterov else None
    if nesterov is not None and is_new_buffer(nesterov[1]):
        nesterov_add, new_buffer = direction, nesterov[1]
        momentum = _hyperparameter(nesterov[2], direction, "nesterov add(d, buf, alpha=momentum)")
        consumers.add(nesterov_add)
    elif is_new_buffer(direction):
        new_buffer, momentum = direction, None
    else:
        consumers.add(reader)
        decayed = direction
    if new_buffer is not None:
        buffer_mul = steady_buffer_mul(new_buffer)
        if buffer_mul is not None:
            momentum = _hyperparameter(buffer_mul.args[1], buffer_mul, "momentum buffer mul(buf, momentum)")
            buffer_reader, decayed, alpha = _scaled_addend(new_buffer)
            what = "momentum buffer add(m*buf, d, alpha=1-dampening)"
            dampening = _one_minus(_hyperparameter(alpha, new_buffer, what), new_buffer, what)
        else:
            first = first_reader(new_buffer)
            assert first is not None  # a new buffer that is no steady one is a first-step one
            buffer_reader, decayed = first, first.args[0]
        consumers.add(buffer_reader)
        if nesterov_add is not None and nesterov_add.args[0] is not decayed:
            raise PatternMismatch(
                nesterov_add, "nesterov SGD add(d, buf, alpha=momentum)",
                "the momentum buffer and the nesterov step read different gradients",
            )

    grad: object = decayed
    weight_decay: Hyperparameter = 0.0
    if _is(decayed, aten.add.Tensor) and len(decayed.args) == 2:
        _, addend, alpha = _scaled_addend(decayed)
        if addend is param:
            grad = decayed.args[0]
            weight_decay = _hyperparameter(alpha, decayed, "weight decay add(g, w, alpha=weight_decay)")
    raw_grad = _strip_neg(grad)
    if not isinstance(raw_grad, torch.fx.Node) or raw_grad.op != "placeholder" or raw_grad is param:
        raise PatternMismatch(
            decayed if isinstance(decayed, torch.fx.Node) else new_param,
            "SGD gradient [neg](g) [+ weight_decay * w]",
            f"the update of {param.name} does not read a gradient input (found {raw_grad})",
        )
    # grad is raw_grad or neg(raw_grad); decayed is grad or add(grad, ...)
    assert isinstance(grad, torch.fx.Node) and isinstance(decayed, torch.fx.Node)
    return SgdUpdate(
        role=role, param=param, grad=grad, decayed=decayed, weight_decay=weight_decay, lr=lr,
        new_param=new_param, direction=direction, consumers=consumers, momentum=momentum,
        dampening=dampening, new_buffer=new_buffer, buffer_mul=buffer_mul, nesterov_add=nesterov_add,
    )
