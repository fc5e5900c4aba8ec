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

Rewrite: none; records one ``SgdUpdate`` per parameter in ``gm.meta["lars_fx"].updates`` and the
writes into gradients in ``grad_writes`` (the momentum pass drops them).
Preconditions: ``gm.meta["lars_fx"]`` names the parameter placeholders. Raises ``PatternMismatch``
(node, pattern, why) when a parameter is written by anything else, or when a graph input other than a
parameter, its buffer or its gradient is written: the passes never guess.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .fx_canonicalize import is_scalar_tensor
from .fx_spec import Hyperparameter, PatternMismatch, SgdUpdate, request_of

__all__ = ["MatchSgdUpdate"]

aten = torch.ops.aten
_TRANSPARENT = (aten.detach.default, aten.detach_copy.default, aten.alias.default, aten.alias_copy.default)


def _is(node: object, target: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _alpha(node: torch.fx.Node) -> object:
    return node.kwargs.get("alpha", 1)


def _hyperparameter(value: object, node: torch.fx.Node, what: str) -> Hyperparameter:
    if is_scalar_tensor(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PatternMismatch(
            node, what, f"expected a number or a 0-d hyperparameter tensor, got {value!r}, which SGD does not compute"
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
        return value.args[0]
    raise PatternMismatch(node, what, f"{value.name} is not 1 - dampening")


class MatchSgdUpdate(PassBase):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        request = request_of(gm, "match_sgd_update")
        placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        unknown = set(request.params) - set(placeholders)
        if unknown:
            raise PatternMismatch(None, "parameter map", f"no placeholders named {sorted(unknown)}")
        output = next(n for n in gm.graph.nodes if n.op == "output")
        outputs = set(output.all_input_nodes)
        writes: dict[torch.fx.Node, torch.fx.Node] = {}  # copy_ destination placeholder -> copy_ node
        for node in gm.graph.nodes:
            if _is(node, aten.copy_.default) and node.args[0].op == "placeholder":
                if node.args[0] in writes:
                    raise PatternMismatch(node, "SGD update", f"{node.args[0].name} is written twice")
                writes[node.args[0]] = node

        updates, explained = [], set()
        for name, role in request.params.items():
            param = placeholders[name]
            if param not in writes:
                continue  # a parameter this step does not update (no gradient)
            update = _match_update(param, writes[param].args[1], writes, outputs, role)
            explained.add(writes[param])
            if update.new_buffer is not None and update.buffer_mul is not None:
                explained.add(writes[update.buffer_mul.args[0]])
            updates.append(update)
        for destination, copy in writes.items():
            if copy in explained:
                continue
            if any(copy.args[1] is u.direction and destination is _strip_neg(u.grad) for u in updates):
                request.grad_writes.append(copy)
                continue
            raise PatternMismatch(
                copy, "SGD update", f"graph input {destination.name} is written but is no parameter, momentum "
                "buffer or gradient of the optimizer; a LARS rewrite would leave it unexplained",
            )
        if request.params and not updates:
            raise PatternMismatch(None, "SGD update", "no parameter of the optimizer is written by the graph")
        request.updates = updates
        return PassResult(gm, False)


def _strip_neg(node: torch.fx.Node) -> torch.fx.Node:
    return node.args[0] if _is(node, aten.neg.default) else node


def _match_update(param, new_param, writes, outputs, role) -> SgdUpdate:
    # w' = w - lr * dir, in one of three spellings; `reader` is the node that reads dir.
    lr: Hyperparameter
    if _is(new_param, aten.add.Tensor) and _alpha(new_param) == 1 and param in new_param.args[:2]:
        reader = new_param.args[1] if new_param.args[0] is param else new_param.args[0]
        if not (_is(reader, aten.mul.Tensor) and _is(reader.args[1], aten.neg.default)):
            raise PatternMismatch(new_param, "SGD parameter update w + dir * (-lr)", f"{reader} is not mul(dir, neg(lr))")
        direction, lr = reader.args[0], reader.args[1].args[0]
    elif _is(new_param, aten.add.Tensor) and new_param.args[0] is param:
        reader, direction = new_param, new_param.args[1]
        lr = -_hyperparameter(_alpha(new_param), new_param, "SGD parameter update add(w, dir, alpha=-lr)")
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
            node = node.args[0]
        return node

    def is_steady_buffer(node: torch.fx.Node) -> bool:
        mul = node.args[0] if _is(node, aten.add.Tensor) else None
        return _is(mul, aten.mul.Tensor) and mul.args[0] in writes and writes[mul.args[0]].args[1] is node

    def is_new_buffer(node: object) -> bool:
        return isinstance(node, torch.fx.Node) and (first_reader(node) is not None or is_steady_buffer(node))

    momentum: Hyperparameter | None = 0.0
    dampening: Hyperparameter = 0.0
    new_buffer = buffer_mul = nesterov_add = None
    consumers: set[torch.fx.Node] = set()
    nesterov = _scaled_addend(direction) if _is(direction, aten.add.Tensor) and len(direction.args) == 2 else None
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
        if is_steady_buffer(new_buffer):
            buffer_mul = new_buffer.args[0]
            momentum = _hyperparameter(buffer_mul.args[1], buffer_mul, "momentum buffer mul(buf, momentum)")
            buffer_reader, decayed, alpha = _scaled_addend(new_buffer)
            what = "momentum buffer add(m*buf, d, alpha=1-dampening)"
            dampening = _one_minus(_hyperparameter(alpha, new_buffer, what), new_buffer, what)
        else:
            buffer_reader = first_reader(new_buffer)
            decayed = buffer_reader.args[0]
        consumers.add(buffer_reader)
        if nesterov_add is not None and nesterov_add.args[0] is not decayed:
            raise PatternMismatch(
                nesterov_add, "nesterov SGD add(d, buf, alpha=momentum)",
                "the momentum buffer and the nesterov step read different gradients",
            )

    decay = _scaled_addend(decayed) if _is(decayed, aten.add.Tensor) and len(decayed.args) == 2 else None
    weight_decay: Hyperparameter
    if decay is not None and decay[1] is param:
        grad = decayed.args[0]
        weight_decay = _hyperparameter(decay[2], decayed, "weight decay add(g, w, alpha=weight_decay)")
    else:
        grad, weight_decay = decayed, 0.0
    raw_grad = _strip_neg(grad)
    if not isinstance(raw_grad, torch.fx.Node) or raw_grad.op != "placeholder" or raw_grad is param:
        raise PatternMismatch(
            decayed if isinstance(decayed, torch.fx.Node) else new_param, "SGD gradient [neg](g) [+ weight_decay * w]",
            f"the update of {param.name} does not read a gradient input (found {raw_grad})",
        )
    return SgdUpdate(
        role=role, param=param, grad=grad, decayed=decayed, weight_decay=weight_decay, lr=lr,
        new_param=new_param, direction=direction, consumers=consumers, momentum=momentum,
        dampening=dampening, new_buffer=new_buffer, buffer_mul=buffer_mul, nesterov_add=nesterov_add,
    )
