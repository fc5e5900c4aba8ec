"""The norms of a step over sharded (DTensor) parameters: local sums of squares of every group's LARS tensors
in one vector, one all-reduce per sharding process group (``lars_fx.sharding.NormReduction``), then
``sqrt``."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import sharding
from .functional import compute_dtype

__all__ = ["reduce_step_norms"]


def reduce_step_norms(
    reduction: sharding.NormReduction, groups: list[tuple[list[Tensor], list[Tensor], list[float]]]
) -> list[tuple[Tensor, Tensor] | None]:
    """Per group of ``(local weights, local gradients, norm weights)`` of its LARS tensors, their global
    ``(||w||, ||g||)`` vectors (None for a group without LARS tensors)."""
    ws = [w for group_ws, _, _ in groups for w in group_ws]
    gs = [g for _, group_gs, _ in groups for g in group_gs]
    weights = [weight for _, _, group_weights in groups for weight in group_weights]
    if not ws:
        return [None] * len(groups)
    n = len(ws)
    dtype = functools.reduce(torch.promote_types, [compute_dtype(w.dtype) for w in ws])
    device = ws[0].device
    batches: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, w in enumerate(ws):
        batches.setdefault((w.device, compute_dtype(w.dtype)), []).append(i)
    squares: list[Tensor] = [ws[0]] * (2 * n)
    for (_, cdtype), positions in batches.items():
        w_squares = sharding.squared_norms([ws[i] for i in positions], cdtype)
        g_squares = sharding.squared_norms([gs[i] for i in positions], cdtype)
        for i, w_square, g_square in zip(positions, w_squares, g_squares, strict=True):
            squares[i], squares[n + i] = w_square, g_square
    vector = torch.stack([s.to(device=device, dtype=dtype) for s in squares])
    squared = reduction.reduce(vector, weights + weights)
    norms = squared.sqrt()
    # mixed compute dtypes: each norm's sqrt in its own dtype, as the fused graph takes it
    if len(batches) > 1:
        narrow = [compute_dtype(w.dtype) != dtype for w in ws] * 2  # float32 beside float64
        if any(narrow):
            narrow_norms = squared.to(torch.float32).sqrt().to(dtype)
            norms = torch.where(torch.tensor(narrow, device=device), narrow_norms, norms)
    result: list[tuple[Tensor, Tensor] | None] = []
    start = 0
    for group_ws, _, _ in groups:
        count = len(group_ws)
        result.append((norms[start : start + count], norms[n + start : n + start + count]) if count else None)
        start += count
    return result
