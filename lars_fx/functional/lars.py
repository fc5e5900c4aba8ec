"""The LARS math, written once.

Everything else in lars-fx (the ``LARS`` optimizer, the FX passes, the ONNX export) builds on the
functions here, so the eager, fused and exported paths cannot drift apart. ``lars_fx.functional``
imports nothing from the rest of the project.

Notation (MindSpore's ``nn.LARS`` / ``LARSUpdate``; You et al. 2017):

    coeff = coefficient * ||w|| / (||g|| + weight_decay * ||w|| + epsilon)
    coeff = clamp(coeff / lr, 0, 1)                       # only with use_clip
    u     = coeff * (g + weight_decay * w)                # the gradient the inner optimizer sees

and, for momentum SGD (torch's rules: the first step sets v = u; dampening; nesterov):

    v = momentum * v + (1 - dampening) * u,   w = w - lr * v                 # MindSpore / torch form
    v = momentum * v + (1 - dampening) * lr * u,   w = w - v                 # the paper's form

The two momentum forms differ only when lr changes between steps.

Two implementations live here: ``lars_sgd_reference`` is a plain per-tensor loop, the oracle every
fast path is tested against (it runs in float64 as well); ``lars_sgd_foreach`` (and
``lars_gradients_foreach`` for optimizers other than SGD) are the multi-tensor versions that
``LARS.step`` runs. Both call the same ``trust_ratio``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .options import LarsOptions

__all__ = [
    "trust_ratio",
    "compute_dtype",
    "scaled_gradient",
    "lars_gradient",
    "momentum_step",
    "momentum_update",
    "lars_sgd_reference",
    "LarsGradients",
    "lars_gradients_foreach",
    "LarsNorms",
    "lars_norms",
    "NormCollector",
    "lars_sgd_foreach",
]

Number = float | Tensor

_DEFAULTS = LarsOptions()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and trust ratios of half-precision tensors are computed in float32."""
    return torch.promote_types(dtype, torch.float32)


def _graph_inputs(*hyperparameters: Any) -> tuple[Any, ...]:
    """Under ``torch.compile``, Python numbers as 0-d float64 tensors (tensors and None as they are);
    in eager, all unchanged.

    Dynamo makes a float that changes between calls (a scheduled lr or momentum) a SymFloat.
    Inductor's tensorify pass turns one that meets a tensor (``coeff / lr``) into a graph input, but
    specializes one that reaches a Scalar argument (``alpha=-lr``, ``_foreach_mul_(bufs, m)``): a
    recompile for every new value until Dynamo's limit, then a silent fall back to eager; and with
    the AOT autograd / FX graph caches on, a graph that keeps one stale value for every later one
    (torch's bug). Held as tensors they never reach a Scalar argument. ``ones * h`` is the form the
    pass tensorifies (``torch.tensor(h)`` would be specialized too).
    """
    if not torch.compiler.is_compiling():
        return hyperparameters
    return tuple(
        h if h is None or isinstance(h, Tensor) else torch.ones((), dtype=torch.float64) * h
        for h in hyperparameters
    )


def trust_ratio(
    w_norm: Tensor,
    g_norm: Tensor,
    *,
    weight_decay: Number,
    coefficient: float,
    epsilon: float,
    use_clip: bool = False,
    lr: Number | None = None,
    unit_trust_on_zero_norm: bool = False,
) -> Tensor:
    """LARS's layer-wise coefficient from the norms of the weight and of its gradient.

    Works element-wise, so ``w_norm`` and ``g_norm`` may be scalars (one layer) or vectors (many
    layers at once). With ``unit_trust_on_zero_norm`` the coefficient is 1 where either norm is 0
    (timm/apex); MindSpore's formula, the default, gives 0 where ``||w|| = 0``.
    """
    coeff = coefficient * w_norm / (g_norm + weight_decay * w_norm + epsilon)
    # A norm that overflowed its dtype (inf) would give a finite, wrong ratio (0 for ||g|| = inf): make
    # it NaN so the step says so. s - s is 0 for a finite s and NaN for inf (Inductor folds 0 * s to 0).
    norms = w_norm + g_norm
    coeff = coeff + (norms - norms)
    if unit_trust_on_zero_norm:
        coeff = torch.where((w_norm > 0) & (g_norm > 0), coeff, torch.ones_like(coeff))
    if use_clip:
        if lr is None:
            raise ValueError("trust_ratio: use_clip=True needs the learning rate `lr`")
        # 0/0 at lr = 0 for a zero coefficient: take the limit lr -> 0+, which is 0, not NaN.
        ratio = coeff / lr
        coeff = torch.clamp(torch.where(coeff == 0, torch.zeros_like(ratio), ratio), 0.0, 1.0)
    return coeff


def scaled_gradient(param: Tensor, grad: Tensor, coeff: Tensor, weight_decay: Number) -> Tensor:
    """``coeff * (grad + weight_decay * param)`` in the compute dtype, returned in ``grad``'s dtype."""
    dtype = compute_dtype(param.dtype)
    scaled = grad.to(dtype)
    if weight_decay != 0:
        scaled = scaled + weight_decay * param.detach().to(dtype)
    return (coeff * scaled).to(grad.dtype)


def lars_gradient(
    param: Tensor,
    grad: Tensor,
    *,
    weight_decay: Number,
    coefficient: float,
    epsilon: float,
    use_clip: bool = False,
    lr: Number | None = None,
    unit_trust_on_zero_norm: bool = False,
    maximize: bool = False,
    norms: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The trust-ratio-scaled gradient ``coeff * (g + weight_decay * w)`` of one tensor (reference).

    ``norms``: ``(||w||, ||g||)`` when they are not those of ``param`` and ``grad`` (a shard's, of the whole
    tensor); by default computed here.
    """
    dtype = compute_dtype(param.dtype)
    g = -grad if maximize else grad
    if norms is None:
        norms = (
            torch.linalg.vector_norm(param.detach(), dtype=dtype),
            torch.linalg.vector_norm(g, dtype=dtype),
        )
    coeff = trust_ratio(
        norms[0].to(dtype),
        norms[1].to(dtype),
        weight_decay=weight_decay,
        coefficient=coefficient,
        epsilon=epsilon,
        use_clip=use_clip,
        lr=lr,
        unit_trust_on_zero_norm=unit_trust_on_zero_norm,
    )
    return scaled_gradient(param, g, coeff, weight_decay)


def momentum_step(
    param: Tensor,
    update: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: Number,
    momentum: float,
    dampening: float = 0.0,
    nesterov: bool = False,
    lr_inside_momentum: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One momentum-SGD step of one tensor, out of place: ``(new param, new buffer)`` (the buffer None
    without momentum).

    ``momentum_buffer`` is None on the first step (the buffer starts as the update, as in
    ``torch.optim.SGD``). With ``lr_inside_momentum`` the buffer holds ``lr * u`` terms (the paper's form).
    """
    # A 0-d update times a 0-d lr of a wider dtype promotes: keep the update's (and so the buffer's) dtype.
    velocity_input = (lr * update).to(update.dtype) if lr_inside_momentum else update
    if momentum == 0:
        return param - (velocity_input if lr_inside_momentum else lr * velocity_input), None
    if momentum_buffer is None:
        buf = velocity_input.clone()
    else:
        buf = momentum * momentum_buffer + (1 - dampening) * velocity_input
    direction = velocity_input + momentum * buf if nesterov else buf
    return param - (direction if lr_inside_momentum else lr * direction), buf


def momentum_update(
    param: Tensor,
    update: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: Number,
    momentum: float,
    dampening: float = 0.0,
    nesterov: bool = False,
    lr_inside_momentum: bool = False,
) -> Tensor | None:
    """``momentum_step`` in place on ``param``; returns the new buffer (reference)."""
    new_param, buf = momentum_step(
        param.detach(),
        update,
        momentum_buffer,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        lr_inside_momentum=lr_inside_momentum,
    )
    param.copy_(new_param)
    return buf


def lars_sgd_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    lars_mask: Sequence[bool],
    *,
    lr: Number,
    weight_decay: float,
    momentum: float,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    coefficient: float = _DEFAULTS.coefficient,
    epsilon: float = _DEFAULTS.epsilon,
    use_clip: bool = False,
    unit_trust_on_zero_norm: bool = False,
    lr_inside_momentum: bool = False,
    norms: tuple[Tensor, Tensor] | None = None,
) -> list[Tensor | None]:
    """One LARS-over-SGD step of one param group, one tensor at a time: the oracle.

    Updates ``params`` in place and returns the new momentum buffers. Parameters whose
    ``lars_mask`` entry is False get their plain gradient: no trust ratio, no weight decay.
    ``norms``: the ``||w||`` and ``||g||`` vectors of the LARS tensors in order, when the tensors are
    shards of the tensors whose norms count (see ``lars_fx.sharding``); by default each tensor's own.
    """
    new_buffers: list[Tensor | None] = []
    given = _given_norms(norms)
    for param, grad, buf, use_lars in zip(params, grads, momentum_buffers, lars_mask, strict=True):
        if use_lars:
            update = lars_gradient(
                param,
                grad,
                weight_decay=weight_decay,
                coefficient=coefficient,
                epsilon=epsilon,
                use_clip=use_clip,
                lr=lr,
                unit_trust_on_zero_norm=unit_trust_on_zero_norm,
                maximize=maximize,
                norms=next(given) if given is not None else None,
            )
        else:
            update = -grad if maximize else grad
        new_buffers.append(
            momentum_update(
                param,
                update,
                buf,
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                nesterov=nesterov,
                lr_inside_momentum=lr_inside_momentum,
            )
        )
    return new_buffers


def lars_norms(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lars_mask: Sequence[bool],
    *,
    weight_decay: Number,
    coefficient: float,
    epsilon: float,
    use_clip: bool = False,
    lr: Number | None = None,
    unit_trust_on_zero_norm: bool = False,
    norms: tuple[Tensor, Tensor] | None = None,
) -> LarsNorms:
    """``||w||``, ``||g||`` and the trust ratio of the LARS tensors, per tensor as ``lars_gradient`` computes
    them (so the reference given these ``norms`` steps exactly as without). ``norms``: given
    ``(||w||, ||g||)`` vectors (sharded tensors), whose trust ratios only are computed."""
    ratio = functools.partial(
        trust_ratio,
        weight_decay=weight_decay,
        coefficient=coefficient,
        epsilon=epsilon,
        use_clip=use_clip,
        lr=lr,
        unit_trust_on_zero_norm=unit_trust_on_zero_norm,
    )
    if norms is not None:
        return LarsNorms(norms[0], norms[1], ratio(norms[0], norms[1]))
    rows = []
    for p, g, use_lars in zip(params, grads, lars_mask, strict=True):
        if use_lars:
            dtype = compute_dtype(p.dtype)
            w_norm = torch.linalg.vector_norm(p.detach(), dtype=dtype)
            g_norm = torch.linalg.vector_norm(g, dtype=dtype)
            rows.append((w_norm, g_norm, ratio(w_norm, g_norm)))
    if not rows:
        empty = torch.empty(0)
        return LarsNorms(empty, empty, empty)
    device = rows[0][0].device
    dtype = functools.reduce(torch.promote_types, [w.dtype for w, _, _ in rows])
    columns = (torch.stack([row[k].to(device=device, dtype=dtype) for row in rows]) for k in range(3))
    return LarsNorms(*columns)


class LarsNorms(NamedTuple):
    """``||w||``, ``||g||`` and the trust ratio of the LARS tensors of one step, in input order.

    Float32 (float64 for float64 tensors) vectors on the tensors' device; empty when no tensor uses
    LARS. When the tensors span several devices, each vector lives on the first one's device.
    """

    w_norm: Tensor
    g_norm: Tensor
    trust_ratio: Tensor


class LarsGradients(NamedTuple):
    """What ``lars_gradients_foreach`` computes: one update per input tensor, and the norms."""

    updates: list[Tensor]
    norms: LarsNorms


class NormCollector:
    """Gathers norm vectors computed in batches (per device and dtype) and returns them in input order."""

    def __init__(self) -> None:
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.positions: list[int] = []

    def add(self, positions: Sequence[int], w_norm: Tensor, g_norm: Tensor, coeff: Tensor) -> None:
        self.parts.append((w_norm, g_norm, coeff))
        self.positions.extend(positions)

    def result(self) -> LarsNorms:
        if not self.parts:
            empty = torch.empty(0)
            return LarsNorms(empty, empty, empty)
        in_order = self.positions == sorted(self.positions)
        if len(self.parts) == 1 and in_order:
            return LarsNorms(*self.parts[0])
        device = self.parts[0][0].device
        columns = []
        for column in zip(*self.parts, strict=True):
            dtype = functools.reduce(torch.promote_types, [c.dtype for c in column])
            columns.append(torch.cat([c.to(device=device, dtype=dtype) for c in column]))
        if not in_order:
            order = torch.argsort(torch.tensor(self.positions, device=device))
            columns = [c[order] for c in columns]
        return LarsNorms(*columns)


def _by_device_and_dtype(
    tensor_lists: list[list[Tensor]],
) -> dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor]], list[int]]]:
    """The positions of ``tensor_lists`` grouped by the first list's device and dtype, in order of first
    appearance: ``{(device, dtype): ([[tensors of list 0], [of list 1], ...], [positions])}``."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor]], list[int]]] = {}
    for position, first in enumerate(tensor_lists[0]):
        lists, positions = groups.setdefault((first.device, first.dtype), ([[] for _ in tensor_lists], []))
        for column, tensors in zip(lists, tensor_lists, strict=True):
            column.append(tensors[position])
        positions.append(position)
    return groups


def _given_norms(norms: tuple[Tensor, Tensor] | None) -> Iterator[tuple[Tensor, Tensor]] | None:
    return None if norms is None else zip(norms[0].unbind(0), norms[1].unbind(0), strict=True)


def _trust_ratios(
    ws: list[Tensor], gs: list[Tensor], given: tuple[list[Tensor], list[Tensor]] | None = None, **options: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Norms and trust ratios of tensors of one device and dtype: two ``_foreach_norm`` calls (or the
    ``given`` 0-d norms, stacked) and one vector computation."""
    cdtype = compute_dtype(ws[0].dtype)
    if given is None:
        w_norm = torch.stack(torch._foreach_norm(ws, 2, dtype=cdtype))
        g_norm = torch.stack(torch._foreach_norm(gs, 2, dtype=cdtype))
    else:
        w_norm = torch.stack(given[0]).to(device=ws[0].device, dtype=cdtype)
        g_norm = torch.stack(given[1]).to(device=ws[0].device, dtype=cdtype)
    return w_norm, g_norm, trust_ratio(w_norm, g_norm, **options)


def _pick(
    norms: tuple[Tensor, Tensor] | None, ranks: Sequence[int]
) -> tuple[list[Tensor], list[Tensor]] | None:
    """The given norms of the LARS tensors of rank ``ranks`` (positions among the LARS tensors)."""
    if norms is None:
        return None
    w, g = norms[0].unbind(0), norms[1].unbind(0)
    return [w[r] for r in ranks], [g[r] for r in ranks]


def _scaled_gradients(
    ws: list[Tensor], gs: list[Tensor], coeff: Tensor, weight_decay: Number, decays: bool, sign: float
) -> list[Tensor]:
    """``coeff * (sign*g + weight_decay*w)`` per tensor (no weight term unless ``decays``), computed in
    ``compute_dtype`` and cast back."""
    dtype = ws[0].dtype
    cdtype = compute_dtype(dtype)
    if cdtype != dtype:
        ws = [w.to(cdtype) for w in ws]
        gs = [g.to(cdtype) for g in gs]
    scaled = torch._foreach_mul(gs, list((sign * coeff).unbind(0)))
    if decays:
        torch._foreach_addcmul_(scaled, ws, _per_tensor(coeff * weight_decay, ws))
    return [u.to(dtype) for u in scaled]


def lars_gradients_foreach(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lars_mask: Sequence[bool],
    *,
    weight_decay: Number,
    coefficient: float,
    epsilon: float,
    use_clip: bool = False,
    lr: Number | None = None,
    unit_trust_on_zero_norm: bool = False,
    maximize: bool = False,
    norms: tuple[Tensor, Tensor] | None = None,
) -> LarsGradients:
    """The LARS-scaled gradients of a param group with multi-tensor (``torch._foreach_*``) kernels.

    Same math as ``lars_gradient``; for optimizers other than SGD, which need the gradients
    themselves. Tensors are grouped by device and dtype. ``norms`` as in ``lars_sgd_reference``.
    """
    sign = -1.0 if maximize else 1.0
    # decided on the number (a guard under compile); the math may get a tensor
    decays = bool(weight_decay != 0)
    lr, weight_decay = _graph_inputs(lr, weight_decay)
    options = dict(
        weight_decay=weight_decay,
        coefficient=coefficient,
        epsilon=epsilon,
        use_clip=use_clip,
        lr=lr,
        unit_trust_on_zero_norm=unit_trust_on_zero_norm,
    )
    updates = [
        (-g if maximize else g) if not use_lars else g for g, use_lars in zip(grads, lars_mask, strict=True)
    ]
    lars_index = [i for i, use_lars in enumerate(lars_mask) if use_lars]
    collector = NormCollector()
    if lars_index:
        lars_tensors = [[params[i] for i in lars_index], [grads[i] for i in lars_index]]
        grouped = _by_device_and_dtype(lars_tensors)
        for (ws, gs), indices in grouped.values():
            w_norm, g_norm, coeff = _trust_ratios(ws, gs, _pick(norms, indices), **options)
            scaled = _scaled_gradients(ws, gs, coeff, weight_decay, decays, sign)
            for position, u in zip(indices, scaled, strict=True):
                updates[lars_index[position]] = u
            collector.add(indices, w_norm, g_norm, coeff)
    return LarsGradients(updates, collector.result())


def lars_sgd_foreach(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: list[Tensor | None],
    lars_mask: Sequence[bool],
    *,
    lr: Number,
    weight_decay: float,
    momentum: float,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    coefficient: float = _DEFAULTS.coefficient,
    epsilon: float = _DEFAULTS.epsilon,
    use_clip: bool = False,
    unit_trust_on_zero_norm: bool = False,
    lr_inside_momentum: bool = False,
    norms: tuple[Tensor, Tensor] | None = None,
) -> LarsNorms:
    """``lars_sgd_reference`` with multi-tensor kernels, in place: the fast eager path.

    ``momentum_buffers`` is updated in place (None entries, the first step, are filled in). The
    scaled gradient ``u = a*g + b*w`` is never materialised: per tensor, ``a = ±coeff`` and
    ``b = coeff*weight_decay`` for LARS tensors, ``a = ±1`` and ``b = 0`` for the others, and the
    momentum and weight updates take ``a`` and ``b`` as per-tensor scalars. Half-precision LARS
    tensors materialise ``u`` in float32 and cast it, as ``lars_gradient`` does. ``norms`` as in
    ``lars_sgd_reference``.
    """
    sign = -1.0 if maximize else 1.0
    decays, has_momentum = weight_decay != 0, momentum != 0  # decided on the numbers, before _graph_inputs
    lr, weight_decay, momentum, dampening = _graph_inputs(lr, weight_decay, momentum, dampening)
    options = dict(
        weight_decay=weight_decay,
        coefficient=coefficient,
        epsilon=epsilon,
        use_clip=use_clip,
        lr=lr,
        unit_trust_on_zero_norm=unit_trust_on_zero_norm,
    )
    collector = NormCollector()
    lars_rank = {i: rank for rank, i in enumerate(i for i, use_lars in enumerate(lars_mask) if use_lars)}
    grouped = _by_device_and_dtype([list(params), list(grads)])
    for (device, dtype), ((ws, gs), indices) in grouped.items():
        gs = list(gs)
        cdtype = compute_dtype(dtype)
        # Per-tensor scalars as 0-d device tensors, stacked once: no index tensor built from a Python
        # list, which would be a host-to-device copy (and a stream sync on CUDA) every step.
        a_entries = [torch.full((), sign, dtype=cdtype, device=device)] * len(ws)
        b_entries = [torch.zeros((), dtype=cdtype, device=device)] * len(ws)
        lars_positions = [k for k, i in enumerate(indices) if lars_mask[i]]
        has_weight_term = False
        if lars_positions:
            lars_ws, lars_gs = [ws[k] for k in lars_positions], [gs[k] for k in lars_positions]
            given = _pick(norms, [lars_rank[indices[k]] for k in lars_positions])
            w_norm, g_norm, coeff = _trust_ratios(lars_ws, lars_gs, given, **options)
            if cdtype != dtype:
                one = torch.ones((), dtype=cdtype, device=device)  # u already carries the sign
                scaled = _scaled_gradients(lars_ws, lars_gs, coeff, weight_decay, decays, sign)
                for k, u in zip(lars_positions, scaled, strict=True):
                    gs[k], a_entries[k] = u, one
            else:
                a_lars, b_lars = (sign * coeff).unbind(0), (coeff * weight_decay).unbind(0)
                for k, a_k, b_k in zip(lars_positions, a_lars, b_lars, strict=True):
                    a_entries[k], b_entries[k] = a_k, b_k
                has_weight_term = decays
            collector.add([lars_rank[indices[k]] for k in lars_positions], w_norm, g_norm, coeff)
        a, b = torch.stack(a_entries), torch.stack(b_entries)
        buffers = [momentum_buffers[i] for i in indices]
        _momentum_step(
            ws, gs, buffers, a, b if has_weight_term else None,
            # A tensor lr in the compute dtype: products with it (lr * momentum, ...) are 0-d and would
            # otherwise round to the lr's dtype (a float32 lr against float64 parameters).
            lr=lr.to(cdtype) if isinstance(lr, Tensor) else lr,
            momentum=momentum if has_momentum else None, dampening=dampening, nesterov=nesterov,
            lr_inside_momentum=lr_inside_momentum,
        )
        for i, buf in zip(indices, buffers, strict=True):
            momentum_buffers[i] = buf
    return collector.result()


def _per_tensor(
    scalars: Tensor, like: Sequence[Tensor], positions: Sequence[int] | None = None
) -> list[Tensor]:
    """One entry of the vector ``scalars`` per tensor of ``like`` (the entries at ``positions``), broadcast to
    it."""
    entries: Sequence[Tensor] = scalars.unbind(0)
    if positions is not None:
        entries = [entries[k] for k in positions]
    return [s.expand_as(t) for s, t in zip(entries, like, strict=True)]


def _sub_scaled_(targets: list[Tensor], sources: list[Tensor], scale: Number) -> None:
    if isinstance(scale, Tensor):
        torch._foreach_sub_(targets, torch._foreach_mul(sources, scale))
    else:
        torch._foreach_add_(targets, sources, alpha=-scale)


def _momentum_step(
    ws: list[Tensor],
    gs: list[Tensor],
    buffers: list[Tensor | None],
    a: Tensor,
    b: Tensor | None,
    *,
    lr: Number,
    momentum: Number | None,
    dampening: Number,
    nesterov: bool,
    lr_inside_momentum: bool,
) -> None:
    """``momentum_update`` for ``u = a*g + b*w`` (b None: no weight term; momentum None: plain SGD),
    all tensors at once."""
    filled: list[Tensor] = []
    if momentum is not None:
        velocity_scale = lr if lr_inside_momentum else 1.0
        filled = _update_buffers(ws, gs, buffers, a, b, momentum, dampening, velocity_scale)
    weight_scale = 1.0 if lr_inside_momentum else lr
    if momentum is None or nesterov:
        # w -= lr*u (+ weight_scale*m*buf); the weight term folds into one multiply, w *= 1 - lr*b.
        if b is not None:
            torch._foreach_mul_(ws, list((1 - lr * b).unbind(0)))
        torch._foreach_addcmul_(ws, gs, _per_tensor(-lr * a, gs))
        if nesterov and momentum is not None:
            _sub_scaled_(ws, filled, weight_scale * momentum)
    else:
        _sub_scaled_(ws, filled, weight_scale)


def _update_buffers(
    ws: list[Tensor],
    gs: list[Tensor],
    buffers: list[Tensor | None],
    a: Tensor,
    b: Tensor | None,
    momentum: Number,
    dampening: Number,
    velocity_scale: Number,
) -> list[Tensor]:
    """``v = m*v + (1-d)*s*u`` for existing buffers, ``v = s*u`` for new ones (filled into ``buffers``);
    returns ``buffers``, all filled."""
    existing = [k for k, buf in enumerate(buffers) if buf is not None]
    fresh = [k for k, buf in enumerate(buffers) if buf is None]
    if existing:
        bufs = [buf for buf in buffers if buf is not None]
        torch._foreach_mul_(bufs, momentum)
        scale = (1 - dampening) * velocity_scale
        torch._foreach_addcmul_(bufs, [gs[k] for k in existing], _per_tensor(scale * a, bufs, existing))
        if b is not None:
            torch._foreach_addcmul_(bufs, [ws[k] for k in existing], _per_tensor(scale * b, bufs, existing))
    if fresh:
        fresh_gs = [gs[k] for k in fresh]
        scalars = (velocity_scale * a).unbind(0)  # 0-d: the new buffers keep the gradients' dtype
        new = torch._foreach_mul(fresh_gs, [scalars[k] for k in fresh])
        if b is not None:
            torch._foreach_addcmul_(new, [ws[k] for k in fresh], _per_tensor(velocity_scale * b, new, fresh))
        for k, buf in zip(fresh, new, strict=True):
            # a 0-d gradient times a 0-d float32 scalar promotes: keep g's dtype
            buffers[k] = buf.to(gs[k].dtype)
    filled = [buf for buf in buffers if buf is not None]
    assert len(filled) == len(buffers)
    return filled
