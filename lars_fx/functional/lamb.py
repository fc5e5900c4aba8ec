"""The LAMB math, written once (You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2
with bias correction, as ``optax.lamb`` computes it).

For a parameter ``w`` with gradient ``g`` at step ``t`` (counted per parameter, from 1):

    m = beta1 m + (1 - beta1) g,         v = beta2 v + (1 - beta2) g^2
    r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay w
    ratio = ||w|| / ||r||, and 1 where ||w|| = 0 or ||r|| = 0;  ratio = min(ratio, trust_clip) with a clip
    w = w - lr ratio r

Parameters that the filter rejects (``lamb_mask`` False) take a plain Adam step: no weight decay, ratio 1.
The moments live in the parameter's dtype (as ``torch.optim.Adam``'s ``exp_avg``/``exp_avg_sq``); ``r``, the
norms and the trust ratio are computed in ``compute_dtype`` (float32 for half precision), the bias corrections
in float64. ``lamb_reference`` is the per-tensor oracle (float64-capable); ``lamb_foreach`` does the same with
multi-tensor kernels; both update parameters, moments and step counts in place and return the norms of the
filtered tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .lars import LarsNorms, NormCollector, _by_device_and_dtype, _graph_inputs, compute_dtype, trust_ratio

__all__ = [
    "lamb_trust_ratio",
    "adam_moments_",
    "bias_corrections",
    "lamb_direction",
    "lamb_reference",
    "lamb_foreach",
]

Number = float | Tensor


def lamb_trust_ratio(w_norm: Tensor, r_norm: Tensor, *, trust_clip: float | None = None) -> Tensor:
    """``||w|| / ||r||``, 1 where either norm is 0, NaN where a norm overflowed; at most ``trust_clip``.

    Element-wise, like ``trust_ratio`` (LARS's with coefficient 1, no epsilon and no weight decay term), which
    it is built on so that every path computes the ratio alike.
    """
    ratio = trust_ratio(w_norm, r_norm, weight_decay=0.0, coefficient=1.0, epsilon=0.0,
                        unit_trust_on_zero_norm=True)
    if trust_clip is not None:
        ratio = torch.clamp(ratio, max=trust_clip)
    return ratio


def adam_moments_(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, beta1: Number, beta2: Number) -> None:
    """``m = beta1 m + (1 - beta1) g``, ``v = beta2 v + (1 - beta2) g^2`` in place, in the moments' dtype."""
    exp_avg.mul_(beta1).add_(grad * (1 - beta1))
    exp_avg_sq.mul_(beta2).addcmul_(grad * (1 - beta2), grad)


def bias_corrections(step: Tensor, beta1: Number, beta2: Number) -> tuple[Tensor, Tensor]:
    """``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` in float64, for a step count ``t`` (or a vector of them)."""
    t = step.to(torch.float64)
    return 1 - beta1**t, (1 - beta2**t).sqrt()


def lamb_direction(
    exp_avg: Tensor, exp_avg_sq: Tensor, bias_correction1: Tensor, bias_correction2_sqrt: Tensor, *,
    eps: Number,
) -> Tensor:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` of one tensor, in ``compute_dtype`` (the bias
    corrections given in it)."""
    dtype = compute_dtype(exp_avg.dtype)
    denominator = exp_avg_sq.to(dtype).sqrt().div_(bias_correction2_sqrt).add_(eps)
    return exp_avg.to(dtype).div(bias_correction1).div_(denominator)


def _write_update(param: Tensor, update: Tensor) -> None:
    """``param -= update``, ``update`` in the compute dtype: one rounding into a half-precision ``param``."""
    if update.dtype == param.dtype:
        param.sub_(update)
    else:
        param.copy_(param.to(update.dtype).sub_(update))


def _scalar(value: Number, like: Tensor) -> Number:
    """A tensor hyperparameter in ``like``'s dtype, so that a 0-d product with it keeps that dtype."""
    return value.to(like.dtype) if isinstance(value, Tensor) else value


def lamb_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    lamb_mask: Sequence[bool],
    *,
    lr: Number,
    beta1: Number,
    beta2: Number,
    eps: Number,
    weight_decay: Number,
    trust_clip: float | None = None,
    maximize: bool = False,
) -> LarsNorms:
    """One LAMB step of one param group, one tensor at a time: the oracle.

    Updates ``params``, the moments and the step counts (0-d tensors, as ``torch.optim.Adam``'s) in place.
    Returns ``||w||`` (before the step), ``||r||`` and the trust ratio of the tensors whose ``lamb_mask``
    entry is True, in input order.
    """
    decays = weight_decay != 0  # decided on the number; the math may get a tensor
    lr, beta1, beta2, eps, weight_decay = _graph_inputs(lr, beta1, beta2, eps, weight_decay)
    collector = NormCollector()
    rank = 0
    for param, grad, exp_avg, exp_avg_sq, step, use_lamb in zip(
        params, grads, exp_avgs, exp_avg_sqs, steps, lamb_mask, strict=True
    ):
        dtype = compute_dtype(param.dtype)
        step.add_(1)
        adam_moments_(-grad if maximize else grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2)
        corrections = [c.to(device=param.device, dtype=dtype) for c in bias_corrections(step, beta1, beta2)]
        r = lamb_direction(exp_avg, exp_avg_sq, *corrections, eps=eps)
        ratio = torch.ones((), dtype=dtype, device=param.device)
        if use_lamb:
            w = param.detach()
            if decays:
                r.add_(w.to(dtype) * weight_decay)
            w_norm = torch.linalg.vector_norm(w, dtype=dtype)
            r_norm = torch.linalg.vector_norm(r)
            ratio = lamb_trust_ratio(w_norm, r_norm, trust_clip=trust_clip)
            collector.add([rank], w_norm.reshape(1), r_norm.reshape(1), ratio.reshape(1))
            rank += 1
        _write_update(param, r.mul_(_scalar(lr, ratio) * ratio))
    return collector.result()


def lamb_foreach(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    lamb_mask: Sequence[bool],
    *,
    lr: Number,
    beta1: Number,
    beta2: Number,
    eps: Number,
    weight_decay: Number,
    trust_clip: float | None = None,
    maximize: bool = False,
) -> LarsNorms:
    """``lamb_reference`` with multi-tensor (``torch._foreach_*``) kernels, grouped by device and dtype: the
    same operations in the same order, on lists. Per-tensor scalars (bias corrections, lr times the ratio) are
    0-d device tensors, computed as one vector per group."""
    decays = weight_decay != 0
    lr, beta1, beta2, eps, weight_decay = _graph_inputs(lr, beta1, beta2, eps, weight_decay)
    collector = NormCollector()
    lamb_rank = {i: rank for rank, i in enumerate(i for i, use_lamb in enumerate(lamb_mask) if use_lamb)}
    if steps:
        torch._foreach_add_(list(steps), 1)
    tensor_lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps)]
    grouped = _by_device_and_dtype(tensor_lists)
    for (device, dtype), ((ws, gs, ms, vs, ts), indices) in grouped.items():
        cdtype = compute_dtype(dtype)
        _adam_moments_foreach(list(torch._foreach_neg(gs)) if maximize else gs, ms, vs, beta1, beta2)
        corrections = [
            c.to(device=device, dtype=cdtype) for c in bias_corrections(torch.stack(ts), beta1, beta2)
        ]
        rs = _directions_foreach(ms, vs, *corrections, eps=eps)
        ratios = [torch.ones((), dtype=cdtype, device=device)] * len(ws)
        accepted = [k for k, i in enumerate(indices) if lamb_mask[i]]
        if accepted:
            lamb_ws, lamb_rs = [ws[k] for k in accepted], [rs[k] for k in accepted]
            if decays:
                decay = torch._foreach_mul([w.to(cdtype) for w in lamb_ws], weight_decay)
                torch._foreach_add_(lamb_rs, decay)
            w_norm = torch.stack(torch._foreach_norm(lamb_ws, 2, dtype=cdtype))
            r_norm = torch.stack(torch._foreach_norm(lamb_rs, 2))
            ratio = lamb_trust_ratio(w_norm, r_norm, trust_clip=trust_clip)
            for k, entry in zip(accepted, ratio.unbind(0), strict=True):
                ratios[k] = entry
            collector.add([lamb_rank[indices[k]] for k in accepted], w_norm, r_norm, ratio)
        stacked = torch.stack(ratios)
        torch._foreach_mul_(rs, list((_scalar(lr, stacked) * stacked).unbind(0)))
        if cdtype == dtype:
            torch._foreach_sub_(ws, rs)
        else:
            for w, new in zip(ws, torch._foreach_sub([w.to(cdtype) for w in ws], rs), strict=True):
                w.copy_(new)
    return collector.result()


def _adam_moments_foreach(
    gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], beta1: Number, beta2: Number
) -> None:
    """``adam_moments_`` of every tensor."""
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, torch._foreach_mul(gs, 1 - beta1))
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, torch._foreach_mul(gs, 1 - beta2), gs)


def _add_scalar_(tensors: list[Tensor], value: Number) -> None:
    """``tensors += value``; a tensor ``value`` (a graph input under compile) as one 0-d entry per tensor:
    Dynamo traces ``_foreach_add_``'s Tensor overload as a read of the value to the host (a graph break)."""
    if isinstance(value, Tensor):
        torch._foreach_add_(tensors, [value] * len(tensors))
    else:
        torch._foreach_add_(tensors, value)


def _directions_foreach(
    ms: list[Tensor], vs: list[Tensor], bias_correction1: Tensor, bias_correction2_sqrt: Tensor, *,
    eps: Number,
) -> list[Tensor]:
    """``lamb_direction`` of every tensor (the bias corrections as vectors, one entry per tensor)."""
    cdtype = compute_dtype(ms[0].dtype)
    if cdtype != ms[0].dtype:
        ms, vs = [m.to(cdtype) for m in ms], [v.to(cdtype) for v in vs]
    denominators = list(torch._foreach_sqrt(vs))
    torch._foreach_div_(denominators, list(bias_correction2_sqrt.unbind(0)))
    _add_scalar_(denominators, eps)
    directions = list(torch._foreach_div(ms, list(bias_correction1.unbind(0))))
    torch._foreach_div_(directions, denominators)
    return directions
