"""Match: find each parameter's ``torch.optim.Adam``/``AdamW`` update in a canonical graph, and insert LAMB's
update direction ``r`` next to it.

Pattern (canonical ATen from ``fx_canonicalize`` of Adam's per-tensor step as ``adam(..., foreach=False,
capturable=True)`` traces it, or as Dynamo traces ``Adam.step``/``AdamW.step``; ``w``, ``g``, ``m``, ``v``,
``s`` placeholders of a parameter, its gradient, ``exp_avg``, ``exp_avg_sq`` and ``step``; brackets are
optional, ``|`` separates the spellings met)::

    s'   = add(s, 1)
    w_d  = mul(w, rsub(mul(lr, wd), 1)) | mul(w, c) | w       # AdamW's decoupled weight decay (c = 1 - lr wd)
    g'   = [neg](g)                                          # maximize
    m'   = lerp(m, g', 1 - beta1)
    v'   = addcmul(mul(v, beta2), g', g', value=1 - beta2)
         | add(mul(mul(g', g'), 1 - beta2), v, alpha=beta2)   # Dynamo's fma spelling (torch 2.13)
         | add(mul(v, beta2), mul(g', g'), alpha=1 - beta2)   # Dynamo's spelling on torch 2.11
    bc1  = rsub(pow(beta1, s'), 1)
    ss   = neg(div(lr, bc1) | mul(reciprocal(bc1), lr))      # -lr / (1 - beta1^t)
    den  = add(div(sqrt(v'), mul(sqrt(rsub(pow(beta2, s'), 1)), ss)), reciprocal(ss), alpha=eps)
    w'   = addcdiv(w_d, m', den)
    copy_(w, w')  copy_(m, m')  copy_(v, v')  copy_(s, s')

``lr`` is a tensor (a graph input, or a float Dynamo made a 0-d tensor input) or a number the tracer
specialised on; a number becomes a 0-d float64 constant on the parameter's device, and AdamW's decay factor
``c`` folded from two numbers gives ``wd = (1 - c) / lr``.
Adam's coupled weight decay (``g' + wd * w`` before the moments, L2 regularisation) is refused: LAMB's decay
is added to the direction after the moments, which is AdamW's (decoupled) form. ``amsgrad`` is refused (not
LAMB). Adam's foreach (``_foreach_*``) form is refused, naming the capture to use.

Rewrite: none of Adam's nodes change. Per parameter one node ``r = adam_direction(w, m', v', s', beta1=,
beta2=, eps=, weight_decay=)`` is inserted before the write-back: ``m_hat / (sqrt(v_hat) + eps)`` from the new
moments with the bias corrections of the new step count, as ``lars_fx.functional.lamb_reference`` computes it,
plus ``weight_decay * w`` for trust-ratio parameters. One ``AdamUpdate`` per parameter is recorded on its
placeholder (``meta["lars_fx.update"]``), ``grad`` = ``r``.
Preconditions (``requires``): the request names parameter placeholders of this graph. Raises
``PatternMismatch`` (node, pattern, why) when a parameter is written by anything else, or a graph input other
than a parameter or its Adam state is written: the passes never guess.
"""

from __future__ import annotations

from typing import TypeGuard

import torch
import torch.fx
from torch import Tensor
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from lars_fx.functional import bias_corrections, compute_dtype, lamb_direction

from .fx_canonicalize import is_scalar_tensor
from .fx_lamb_spec import AdamUpdate
from .fx_norms import write_back_point
from .fx_spec import (
    UPDATE,
    Hyperparameter,
    ParamRole,
    PatternMismatch,
    request_of,
    require_parameter_placeholders,
)

__all__ = ["MatchAdamUpdate", "adam_direction"]

aten = torch.ops.aten
_ADAM = (
    "Adam update (Adam's per-tensor step: adam(..., foreach=False, capturable=True), or Adam.step under "
    "torch.compile)"
)


def adam_direction(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float | Tensor,
) -> Tensor:
    """LAMB's ``r`` of one tensor in ``compute_dtype``: Adam's bias-corrected direction, plus ``weight_decay *
    w`` (a 0-d tensor ``weight_decay`` is always added)."""
    dtype = compute_dtype(param.dtype)
    corrections = [c.to(device=param.device, dtype=dtype) for c in bias_corrections(step, beta1, beta2)]
    r = lamb_direction(exp_avg, exp_avg_sq, *corrections, eps=eps)
    if isinstance(weight_decay, Tensor) or weight_decay != 0:
        r = r + param.to(dtype) * weight_decay
    return r


def _is(node: object, target: object) -> TypeGuard[torch.fx.Node]:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _expect(node: object, target: object, where: torch.fx.Node, pattern: str) -> torch.fx.Node:
    if not _is(node, target):
        raise PatternMismatch(where, pattern, f"expected {target}, found {node}")
    assert isinstance(node, torch.fx.Node)
    return node


def _number(value: object, where: torch.fx.Node, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PatternMismatch(
            where,
            what,
            f"expected a constant, found {value}: the fused LAMB step bakes betas and eps into the graph",
        )
    return float(value)


def _hyperparameter(value: object, where: torch.fx.Node, what: str) -> Hyperparameter:
    if is_scalar_tensor(value) or (isinstance(value, torch.fx.Node) and value.op == "placeholder"):
        assert isinstance(value, torch.fx.Node)
        return value
    return _number(value, where, what)


class MatchAdamUpdate(PassBase):
    name = "match_adam_update"

    def requires(self, gm: torch.fx.GraphModule) -> None:
        require_parameter_placeholders(gm, self.name)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        request = request_of(gm, self.name)
        graph = gm.graph
        for node in graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("aten._foreach_"):
                raise PatternMismatch(
                    node,
                    _ADAM,
                    "Adam's foreach form is not matched: capture it with foreach=False (Inductor "
                    "fuses the per-tensor loop all the same)",
                )
        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        writes: dict[torch.fx.Node, torch.fx.Node] = {}  # copy_ destination placeholder -> copy_ node
        for node in graph.nodes:
            destination = node.args[0] if _is(node, aten.copy_.default) else None
            if isinstance(destination, torch.fx.Node) and destination.op == "placeholder":
                if destination in writes:
                    raise PatternMismatch(node, _ADAM, f"{destination.name} is written twice")
                writes[destination] = node

        updates: list[AdamUpdate] = []
        explained: set[torch.fx.Node] = set()
        for name, role in request.params.items():
            param = placeholders[name]
            if param not in writes:
                continue  # a parameter this step does not update (no gradient)
            update, state = _match_update(param, writes, role)
            explained |= {writes[param], *(writes[s] for s in state)}
            updates.append(update)
        for destination, copy in writes.items():
            if copy not in explained:
                raise PatternMismatch(
                    copy,
                    _ADAM,
                    f"graph input {destination.name} is written but is no parameter or Adam state of "
                    "the optimizer; a LAMB rewrite would leave it unexplained",
                )
        if request.params and not updates:
            raise PatternMismatch(None, _ADAM, "no parameter of the optimizer is written by the graph")
        for update in updates:
            if not isinstance(update.lr, torch.fx.Node):
                update.lr = _constant_lr(graph, update.param, update.lr)
        with graph.inserting_before(write_back_point(graph)):
            for update in updates:
                decay = update.weight_decay if update.role.use_lars else 0.0
                update.grad = graph.call_function(
                    adam_direction,
                    (update.param, update.exp_avg, update.exp_avg_sq, update.step),
                    {"beta1": update.beta1, "beta2": update.beta2, "eps": update.eps, "weight_decay": decay},
                )
                update.param.meta[UPDATE] = update
        graph.lint()
        gm.recompile()
        return PassResult(gm, bool(updates))


def _constant_lr(graph: torch.fx.Graph, param: torch.fx.Node, lr: float) -> torch.fx.Node:
    """A number lr as a 0-d float64 tensor on ``param``'s device (as the fused step feeds it), at the graph's
    start: the LAMB update reads lr as a tensor."""
    device = param.meta["val"].device if "val" in param.meta else None
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        return graph.call_function(torch.full, ((), lr), {"dtype": torch.float64, "device": device})


def _state_input(
    value: torch.fx.Node, source: object, writes: dict[torch.fx.Node, torch.fx.Node], what: str
) -> torch.fx.Node:
    """``source``, the placeholder whose new value ``value`` is (``value`` reads it and is copied back into
    it)."""
    if not (
        isinstance(source, torch.fx.Node)
        and source.op == "placeholder"
        and source in writes
        and writes[source].args[1] is value
    ):
        raise PatternMismatch(value, _ADAM, f"{what} is not written back into the state input it updates")
    return source


def _second_moment(node: torch.fx.Node) -> tuple[object, object, float]:
    """``v'`` -> (``v``, ``g'``, beta2): ``addcmul(mul(v, beta2), g', g', value=1 - beta2)`` or Dynamo's
    ``add(mul(mul(g', g'), 1 - beta2), v, alpha=beta2)`` (torch 2.13) or ``add(mul(v, beta2), mul(g', g'),
    alpha=1 - beta2)`` (torch 2.11)."""
    if _is(node, aten.addcmul.default):
        decayed = _expect(node.args[0], aten.mul.Tensor, node, "Adam v * beta2")
        beta2 = _number(decayed.args[1], decayed, "Adam beta2")
        if node.kwargs.get("value", 1) != 1 - beta2:
            raise PatternMismatch(node, _ADAM, "the second moment's factors are not beta2 and 1 - beta2")
        if node.args[1] is not node.args[2]:
            raise PatternMismatch(node, _ADAM, "the second moment does not square one gradient")
        return decayed.args[0], node.args[1], beta2
    pattern = "Adam v' = add(mul(g*g, 1 - beta2), v, alpha=beta2)"
    node = _expect(node, aten.add.Tensor, node, pattern)
    square = node.args[1]
    if _is(square, aten.mul.Tensor) and square.args[0] is square.args[1]:  # torch 2.11's spelling
        decayed = _expect(node.args[0], aten.mul.Tensor, node, "Adam v * beta2")
        beta2 = _number(decayed.args[1], decayed, "Adam beta2")
        if node.kwargs.get("alpha", 1) != 1 - beta2:
            raise PatternMismatch(node, _ADAM, "the second moment's factors are not beta2 and 1 - beta2")
        return decayed.args[0], square.args[0], beta2
    beta2 = _number(node.kwargs.get("alpha"), node, "Adam beta2")
    scaled = _expect(node.args[0], aten.mul.Tensor, node, pattern)
    square = _expect(scaled.args[0], aten.mul.Tensor, scaled, pattern)
    if scaled.args[1] != 1 - beta2 or square.args[0] is not square.args[1]:
        raise PatternMismatch(node, _ADAM, "the second moment is not beta2 v + (1 - beta2) g^2")
    return node.args[1], square.args[0], beta2


def _step_size(node: object, where: torch.fx.Node) -> tuple[Hyperparameter, torch.fx.Node]:
    """``neg(div(lr, bc1))`` or ``neg(mul(reciprocal(bc1), lr))`` (``-lr / bc1``) -> (lr, bc1)."""
    negated = _expect(node, aten.neg.default, where, "Adam step size -lr/bc1")
    quotient = negated.args[0]
    if _is(quotient, aten.div.Tensor):
        lr, correction = quotient.args
    else:
        product = _expect(quotient, aten.mul.Tensor, negated, "Adam step size lr/bc1")
        reciprocal = _expect(product.args[0], aten.reciprocal.default, product, "Adam step size lr/bc1")
        lr, correction = product.args[1], reciprocal.args[0]
    if not isinstance(lr, torch.fx.Node):
        lr = _number(lr, negated, "Adam lr")
    return lr, _expect(correction, aten.rsub.Scalar, negated, "Adam bias correction 1 - beta1^t")


def _match_update(
    param: torch.fx.Node, writes: dict[torch.fx.Node, torch.fx.Node], role: ParamRole
) -> tuple[AdamUpdate, tuple[torch.fx.Node, ...]]:
    written = writes[param].args[1]
    pattern = "Adam parameter update addcdiv(w, m', denom)"
    if not (_is(written, aten.addcdiv.default) and written.kwargs.get("value", 1) == 1):
        raise PatternMismatch(
            written if isinstance(written, torch.fx.Node) else writes[param],
            pattern,
            f"the value written into parameter {param.name} is not addcdiv(w, m', denom) (an Adam step with "
            "capturable=True, or Adam's step under torch.compile)",
        )
    new_param = written
    base, exp_avg, denom = new_param.args

    # denom = sqrt(v')/(sqrt(bc2) * ss) + eps/ss with ss = -lr/bc1: Adam's capturable spelling.
    denom = _expect(denom, aten.add.Tensor, new_param, "Adam denominator")
    eps = _number(denom.kwargs.get("alpha"), denom, "Adam eps add(.., reciprocal(ss), alpha=eps)")
    scaled_sqrt = _expect(denom.args[0], aten.div.Tensor, denom, "Adam denominator sqrt(v')/(sqrt(bc2)*ss)")
    root = _expect(scaled_sqrt.args[0], aten.sqrt.default, scaled_sqrt, "Adam sqrt(v')")
    if _is(root.args[0], aten.maximum.default):
        raise PatternMismatch(root, _ADAM, "amsgrad is not LAMB: use amsgrad=False")
    exp_avg_sq = root.args[0]
    if not isinstance(exp_avg_sq, torch.fx.Node):
        raise PatternMismatch(root, _ADAM, "Adam sqrt(v') reads no second moment")
    old_exp_avg_sq, grad, beta2 = _second_moment(exp_avg_sq)
    correction2 = _expect(scaled_sqrt.args[1], aten.mul.Tensor, scaled_sqrt, "Adam sqrt(bc2) * ss")
    step_size = correction2.args[1]
    reciprocal = _expect(denom.args[1], aten.reciprocal.default, denom, "Adam eps / ss")
    if reciprocal.args[0] is not step_size:
        raise PatternMismatch(denom, "Adam denominator", "its two terms read different step sizes")
    lr, correction1 = _step_size(step_size, correction2)
    beta1, new_step = _power_of_step(correction1, correction1)
    sqrt_bc2 = _expect(correction2.args[0], aten.sqrt.default, correction2, "Adam sqrt(bc2)")
    beta2_of_step, step2 = _power_of_step(sqrt_bc2.args[0], sqrt_bc2)
    if step2 is not new_step:
        raise PatternMismatch(sqrt_bc2, _ADAM, "the two bias corrections read different step counts")
    if beta2_of_step != beta2:
        raise PatternMismatch(sqrt_bc2, _ADAM, "the bias correction's beta2 is not the second moment's")
    step_input = _expect(new_step, aten.add.Tensor, correction1, "Adam step s' = s + 1")
    if step_input.args[1] != 1 or step_input.kwargs.get("alpha", 1) != 1:
        raise PatternMismatch(new_step, _ADAM, "the step count is not incremented by 1")

    # m' = lerp(m, g', 1 - beta1)
    exp_avg = _expect(exp_avg, aten.lerp.Scalar, new_param, "Adam m' = lerp(m, g, 1 - beta1)")
    if exp_avg.args[2] != 1 - beta1:
        raise PatternMismatch(exp_avg, _ADAM, f"the first moment's weight {exp_avg.args[2]} is not 1 - beta1")
    if exp_avg.args[1] is not grad:
        raise PatternMismatch(exp_avg_sq, _ADAM, "the two moments read different gradients")
    _check_gradient(grad, param, writes)

    weight_decay = _decoupled_weight_decay(base, param, lr)
    state = (
        _state_input(exp_avg, exp_avg.args[0], writes, "m'"),
        _state_input(exp_avg_sq, old_exp_avg_sq, writes, "v'"),
        _state_input(new_step, new_step.args[0], writes, "s'"),
    )
    update = AdamUpdate(  # grad: replaced by r when the matcher inserts it
        role=role,
        param=param,
        grad=new_param,
        weight_decay=weight_decay,
        lr=lr,
        new_param=new_param,
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
        step=new_step,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
    )
    return update, state


def _power_of_step(correction: object, where: torch.fx.Node) -> tuple[float, torch.fx.Node]:
    """``rsub(pow(beta, s'), 1)`` (``1 - beta^t``) -> (beta, s')."""
    correction = _expect(correction, aten.rsub.Scalar, where, "Adam bias correction 1 - beta^t")
    power = _expect(correction.args[0], aten.pow.Scalar, correction, "Adam bias correction beta^t")
    if correction.args[1] != 1:
        raise PatternMismatch(correction, _ADAM, "the bias correction is not 1 - beta^t")
    beta, step = power.args
    if not isinstance(step, torch.fx.Node):
        raise PatternMismatch(power, _ADAM, "the bias correction's exponent is no step-count tensor")
    return _number(beta, power, "Adam beta"), step


def _check_gradient(
    grad: torch.fx.node.Argument, param: torch.fx.Node, writes: dict[torch.fx.Node, torch.fx.Node]
) -> None:
    """``g' = [neg](g)`` of a gradient input; Adam's coupled decay ``add(g', w, alpha=wd)`` is refused."""
    if _is(grad, aten.add.Tensor):
        assert isinstance(grad, torch.fx.Node)
        addends = grad.all_input_nodes
        reads = set(addends) | {a.args[0] for a in addends if _is(a, aten.mul.Tensor)}  # add(g, mul(w, wd))
        if param in reads:
            raise PatternMismatch(
                grad,
                _ADAM,
                "torch.optim.Adam's weight decay is coupled (added to the gradient before the "
                "moments); LAMB's is decoupled: use torch.optim.AdamW (or "
                "Adam(decoupled_weight_decay=True)), "
                "or "
                "weight_decay=0",
            )
    raw = grad.args[0] if _is(grad, aten.neg.default) else grad
    if not (
        isinstance(raw, torch.fx.Node) and raw.op == "placeholder" and raw is not param and raw not in writes
    ):
        raise PatternMismatch(
            grad if isinstance(grad, torch.fx.Node) else None,
            _ADAM,
            f"the moments of {param.name} do not read a gradient input (found {raw})",
        )


def _decoupled_weight_decay(base: object, param: torch.fx.Node, lr: Hyperparameter) -> Hyperparameter:
    """``w`` -> 0.0; ``mul(w, rsub(mul(lr, wd), 1))`` (AdamW's ``w * (1 - lr * wd)``) -> wd; ``mul(w, c)``
    with numbers ``c`` and ``lr`` -> ``(1 - c) / lr``."""
    if base is param:
        return 0.0
    pattern = "AdamW decoupled weight decay mul(w, 1 - lr * wd)"
    where = base if isinstance(base, torch.fx.Node) else param
    scaled = _expect(base, aten.mul.Tensor, where, pattern)
    if scaled.args[0] is param and not isinstance(scaled.args[1], torch.fx.Node):
        # lr and wd both numbers: the tracer folded 1 - lr * wd into one
        factor_value = _number(scaled.args[1], scaled, pattern)
        if isinstance(lr, torch.fx.Node) or lr == 0:
            raise PatternMismatch(scaled, pattern, "a constant decay factor needs a constant lr > 0")
        return (1 - factor_value) / lr
    factor = _expect(scaled.args[1], aten.rsub.Scalar, scaled, pattern)
    product = _expect(factor.args[0], aten.mul.Tensor, factor, pattern)
    if scaled.args[0] is not param or factor.args[1] != 1 or product.args[0] is not lr:
        raise PatternMismatch(
            scaled, pattern, "it does not scale this parameter by 1 - lr * wd with the step's lr"
        )
    return _hyperparameter(product.args[1], product, pattern)
