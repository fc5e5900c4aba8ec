"""The LARS math, written once.

Everything else in lars-fx (the ``LARS`` optimizer, the FX passes, the ONNX export) builds on the
functions here, so the eager, fused and exported paths cannot drift apart. This module imports
nothing from the rest of the project.

Notation (MindSpore's ``nn.LARS`` / ``LARSUpdate``; You et al. 2017):

    coeff = coefficient * ||w|| / (||g|| + weight_decay * ||w|| + epsilon)
    coeff = clamp(coeff / lr, 0, 1)                       # only with use_clip
    u     = coeff * (g + weight_decay * w)                # the gradient the inner optimizer sees

and, for momentum SGD (torch's rules: the first step sets v = u; dampening; nesterov):

    v = momentum * v + (1 - dampening) * u,   w = w - lr * v                 # MindSpore / torch form
    v = momentum * v + (1 - dampening) * lr * u,   w = w - v                 # the paper's form

The two momentum forms differ only when lr changes between steps.

Two implementations live here: ``lars_sgd_reference`` is a plain per-tensor loop, the oracle every
fast path is tested against (it runs in float64 as well); ``lars_gradients_foreach`` and
``momentum_foreach_lr_inside`` are the multi-tensor versions that ``LARS.step`` runs. Both call the
same ``trust_ratio``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = [
    "trust_ratio",
    "compute_dtype",
    "lars_gradient",
    "momentum_update",
    "lars_sgd_reference",
    "LarsGradients",
    "lars_gradients_foreach",
    "momentum_foreach_lr_inside",
]

Number = float | Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and trust ratios of half-precision tensors are computed in float32."""
    return torch.promote_types(dtype, torch.float32)


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
    if unit_trust_on_zero_norm:
        coeff = torch.where((w_norm > 0) & (g_norm > 0), coeff, torch.ones_like(coeff))
    if use_clip:
        if lr is None:
            raise ValueError("trust_ratio: use_clip=True needs the learning rate `lr`")
        coeff = torch.clamp(coeff / lr, 0.0, 1.0)
    return coeff


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
) -> Tensor:
    """The trust-ratio-scaled gradient ``coeff * (g + weight_decay * w)`` of one tensor (reference)."""
    dtype = compute_dtype(param.dtype)
    w = param.detach().to(dtype)
    g = grad.to(dtype)
    if maximize:
        g = -g
    coeff = trust_ratio(
        torch.linalg.vector_norm(w),
        torch.linalg.vector_norm(g),
        weight_decay=weight_decay,
        coefficient=coefficient,
        epsilon=epsilon,
        use_clip=use_clip,
        lr=lr,
        unit_trust_on_zero_norm=unit_trust_on_zero_norm,
    )
    return (coeff * (g + weight_decay * w)).to(grad.dtype)


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
    """One momentum-SGD step of one tensor, in place on ``param``; returns the new buffer (reference).

    ``momentum_buffer`` is None on the first step (the buffer starts as the update, as in
    ``torch.optim.SGD``). With ``lr_inside_momentum`` the buffer holds ``lr * u`` terms (the paper's form).
    """
    velocity_input = lr * update if lr_inside_momentum else update
    if momentum == 0:
        param.sub_(velocity_input if lr_inside_momentum else lr * velocity_input)
        return None
    if momentum_buffer is None:
        buf = velocity_input.clone()
    else:
        buf = momentum * momentum_buffer + (1 - dampening) * velocity_input
    direction = velocity_input + momentum * buf if nesterov else buf
    param.sub_(direction if lr_inside_momentum else lr * direction)
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
    coefficient: float = 0.001,
    epsilon: float = 1e-5,
    use_clip: bool = False,
    unit_trust_on_zero_norm: bool = False,
    lr_inside_momentum: bool = False,
) -> list[Tensor | None]:
    """One LARS-over-SGD step of one param group, one tensor at a time: the oracle.

    Updates ``params`` in place and returns the new momentum buffers. Parameters whose
    ``lars_mask`` entry is False get their plain gradient: no trust ratio, no weight decay.
    """
    new_buffers: list[Tensor | None] = []
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


class LarsGradients(NamedTuple):
    """What ``lars_gradients_foreach`` computes for one param group.

    ``updates`` has one entry per input tensor. ``w_norm``, ``g_norm`` and ``trust_ratio`` are
    float32/float64 vectors over the LARS tensors only (``lars_mask`` True, in input order),
    kept on the tensors' device; they are empty when no tensor uses LARS, and when the tensors
    span several devices each vector lives on the device of its first LARS tensor.
    """

    updates: list[Tensor]
    w_norm: Tensor
    g_norm: Tensor
    trust_ratio: Tensor


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
) -> LarsGradients:
    """The LARS-scaled gradients of a param group with multi-tensor (``torch._foreach_*``) kernels.

    Tensors are grouped by device and dtype; each group's norms are one ``_foreach_norm`` call and
    its trust ratios one vector computation. Same math as ``lars_gradient``.
    """
    updates = list(torch._foreach_neg(grads)) if maximize else list(grads)
    lars_index = [i for i, use_lars in enumerate(lars_mask) if use_lars]
    if not lars_index:
        empty = torch.empty(0)
        return LarsGradients(updates, empty, empty, empty)

    lars_params = [params[i] for i in lars_index]
    lars_grads = [updates[i] for i in lars_index]
    w_norm_parts, g_norm_parts, ratio_parts, positions = [], [], [], []
    grouped = _group_tensors_by_device_and_dtype([lars_params, lars_grads], with_indices=True)
    for (_device, dtype), ((ws, gs), indices) in grouped.items():
        cdtype = compute_dtype(dtype)
        if cdtype != dtype:
            ws = [w.to(cdtype) for w in ws]
            gs = [g.to(cdtype) for g in gs]
        w_norm = torch.stack(torch._foreach_norm(ws, 2))
        g_norm = torch.stack(torch._foreach_norm(gs, 2))
        coeff = trust_ratio(
            w_norm,
            g_norm,
            weight_decay=weight_decay,
            coefficient=coefficient,
            epsilon=epsilon,
            use_clip=use_clip,
            lr=lr,
            unit_trust_on_zero_norm=unit_trust_on_zero_norm,
        )
        scaled = torch._foreach_add(gs, ws, alpha=weight_decay) if weight_decay != 0 else list(gs)
        scaled = torch._foreach_mul(scaled, list(coeff.unbind(0)))
        for position, tensor in zip(indices, scaled):
            updates[lars_index[position]] = tensor.to(dtype)
        w_norm_parts.append(w_norm)
        g_norm_parts.append(g_norm)
        ratio_parts.append(coeff)
        positions.extend(indices)

    def in_input_order(parts: list[Tensor]) -> Tensor:
        if len(parts) == 1:
            return parts[0]
        device = parts[0].device
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in parts])
        vector = torch.cat([p.to(device=device, dtype=dtype) for p in parts])
        order = torch.argsort(torch.tensor(positions, device=device))
        return vector[order]

    return LarsGradients(
        updates,
        in_input_order(w_norm_parts),
        in_input_order(g_norm_parts),
        in_input_order(ratio_parts),
    )


def momentum_foreach_lr_inside(
    params: Sequence[Tensor],
    updates: Sequence[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: Number,
    momentum: float,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> None:
    """The paper's momentum form (lr inside the buffer) with foreach kernels, in place.

    ``momentum_buffers`` entries that are None (first step) are filled in.
    """
    velocity_inputs = torch._foreach_mul(updates, lr)
    if momentum == 0:
        torch._foreach_sub_(params, velocity_inputs)
        return
    existing = [i for i, buf in enumerate(momentum_buffers) if buf is not None]
    if existing:
        bufs = [momentum_buffers[i] for i in existing]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, [velocity_inputs[i] for i in existing], alpha=1 - dampening)
    for i, buf in enumerate(momentum_buffers):
        if buf is None:
            momentum_buffers[i] = velocity_inputs[i].clone()
    if nesterov:
        directions = torch._foreach_add(velocity_inputs, momentum_buffers, alpha=momentum)
    else:
        directions = momentum_buffers
    torch._foreach_sub_(params, directions)
