"""LARS over a flat layout: many tensors as segments of one buffer, the step in a few whole-buffer operations.

A bucket's buffer is viewed as ``[chunks, chunk_size]``; each segment (one parameter) starts at a chunk
boundary and fills ``ceil(numel / chunk_size)`` chunks, the last one partly; the rest of that chunk is
padding, which holds zeros (``lars_fx.flat_layout`` keeps it so). ``Segments`` says which segment each chunk
belongs to and which chunks each segment fills; from it:

- ``segment_squared_norms``: every segment's ``sum(x**2)`` as one vector, from one reduction over the chunks
  and a sum of chunk sums per segment (graph-friendly: two reduction loops under Inductor);
- ``per_chunk``: a per-segment vector (trust ratios) broadcast to the chunks, ``[chunks, 1]``;
- ``lars_sgd_flat``: the LARS-over-SGD step of one bucket, in place (the eager ``flat=True`` step).

The numbers are those of ``lars_sgd_reference`` per segment: the update is element-wise, so only the norms
(per segment) and the coefficients (broadcast per chunk) see the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .lars import LarsNorms, compute_dtype, scaled_gradient, trust_ratio
from .options import LarsOptions

__all__ = [
    "Segments",
    "ChunkLayout",
    "chunk_layout",
    "segment_squared_norms",
    "segment_norms",
    "per_chunk",
    "lars_sgd_flat",
]

_DEFAULTS = LarsOptions()

Number = float | Tensor


class Segments(NamedTuple):
    """The segments of a ``[chunks, chunk_size]`` buffer. ``chunks`` (int64, ``[chunks]``): each chunk's
    segment. ``ranges`` (int64, ``[2, num_segments]``): each segment's first chunk and its number of chunks,
    at most ``max_chunks``."""

    chunks: Tensor
    ranges: Tensor
    num_segments: int
    max_chunks: int


@dataclass(frozen=True)
class ChunkLayout:
    """Where segments of ``numels`` elements lie in a buffer of ``chunks * chunk_size`` elements: segment
    ``k`` starts at ``offsets[k]`` (a multiple of ``chunk_size``)."""

    chunk_size: int
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    chunk_segment: tuple[int, ...]
    chunk_valid: tuple[int, ...]

    @property
    def chunks(self) -> int:
        return len(self.chunk_segment)

    @property
    def size(self) -> int:
        return self.chunks * self.chunk_size

    def segments(self, device: torch.device) -> Segments:
        first = [offset // self.chunk_size for offset in self.offsets]
        counts = [-(-numel // self.chunk_size) for numel in self.numels]
        return Segments(
            torch.tensor(self.chunk_segment, dtype=torch.int64, device=device),
            torch.tensor([first, counts], dtype=torch.int64, device=device),
            len(self.numels),
            max(counts),
        )


def default_chunk_size(numels: list[int], largest: int = 2048, smallest: int = 16) -> int:
    """A power of two near the mean segment size, within ``[smallest, largest]``: long rows for large tensors,
    little padding for many small ones."""
    mean = max(1, sum(numels) // max(1, len(numels)))
    return max(smallest, min(largest, 1 << (mean - 1).bit_length()))


def chunk_layout(numels: list[int], chunk_size: int | None = None) -> ChunkLayout:
    """Lay out segments of ``numels`` elements (each at least 1) on chunk boundaries."""
    if any(n < 1 for n in numels):
        raise ValueError(f"chunk_layout: segments must hold at least one element, got {numels}")
    size = chunk_size if chunk_size is not None else default_chunk_size(numels)
    offsets: list[int] = []
    chunk_segment: list[int] = []
    chunk_valid: list[int] = []
    for k, numel in enumerate(numels):
        offsets.append(len(chunk_segment) * size)
        full, rest = divmod(numel, size)
        chunk_segment += [k] * (full + (1 if rest else 0))
        chunk_valid += [size] * full + ([rest] if rest else [])
    return ChunkLayout(size, tuple(offsets), tuple(numels), tuple(chunk_segment), tuple(chunk_valid))


def segment_squared_norms(x: Tensor, segments: Segments, dtype: torch.dtype) -> Tensor:
    """``[sum(segment**2) for segment in x]`` in ``dtype`` for ``x`` of ``[chunks, chunk_size]`` whose padding
    holds zeros (``lars_fx.flat_layout`` keeps it so): each chunk's sum (one reduction over the buffer), then
    each segment's sum of its chunks' (a gather of ``num_segments x max_chunks``). No mask on the elements:
    Inductor's vectorized masks cost the CPU about as much as the reduction itself. A gather, not
    ``index_add``: Inductor makes it one more reduction loop instead of a fill and a scatter, and it adds in a
    fixed order on GPUs too (no atomics)."""
    chunk_sums = torch.square(x.to(dtype)).sum(dim=1)
    steps = torch.arange(segments.max_chunks, device=x.device).unsqueeze(0)
    first, count = segments.ranges[0].unsqueeze(1), segments.ranges[1].unsqueeze(1)
    picked = chunk_sums[(first + steps).clamp(max=x.shape[0] - 1)]
    return torch.where(steps < count, picked, torch.zeros((), dtype=dtype, device=x.device)).sum(dim=1)


def segment_norms(views: list[Tensor]) -> Tensor:
    """``[||v|| for v in views]`` in the compute dtype, read from the segments' own views (padding unread)."""
    return torch.stack(torch._foreach_norm(views, 2, dtype=compute_dtype(views[0].dtype)))


def per_chunk(values: Tensor, segments: Segments) -> Tensor:
    """A per-segment vector as ``[chunks, 1]``: each chunk's segment's value, to broadcast over its
    elements."""
    return values.index_select(0, segments.chunks).unsqueeze(1)


def lars_sgd_flat(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    segments: Segments | None,
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
) -> tuple[Tensor | None, LarsNorms | None]:
    """One LARS-over-SGD step of a bucket, in place on ``param`` (``[chunks, chunk_size]``); returns the new
    momentum buffer (``momentum_buffer`` itself, written in place, once there is one) and the segments'
    ``(||w||, ||g||, coeff)``.

    ``segments`` None: no segment of the bucket gets LARS (each steps with its plain gradient, no weight
    decay, as ``lars_sgd_reference``). ``norms``: the segments' ``(||w||, ||g||)`` when the caller has them
    (computed per segment from its views, say); otherwise ``segment_squared_norms`` computes them.
    """
    sign = -1.0 if maximize else 1.0
    dtype = compute_dtype(param.dtype)
    one = torch.ones((), dtype=dtype, device=param.device)
    result, weight_term = None, None
    if segments is None:
        gradient_term = sign * one
    else:
        if norms is None:
            w_norm = segment_squared_norms(param, segments, dtype).sqrt()
            g_norm = segment_squared_norms(grad, segments, dtype).sqrt()
        else:
            w_norm, g_norm = norms
        coeff = trust_ratio(
            w_norm, g_norm, weight_decay=weight_decay, coefficient=coefficient, epsilon=epsilon,
            use_clip=use_clip, lr=lr, unit_trust_on_zero_norm=unit_trust_on_zero_norm,
        )
        result = LarsNorms(w_norm, g_norm, coeff)
        chunk_coeff = per_chunk(coeff, segments)
        if dtype != param.dtype:  # half precision: u in float32, rounded once to the parameter's dtype
            grad = scaled_gradient(param, sign * grad, chunk_coeff, weight_decay)
            gradient_term = one
        else:
            gradient_term = sign * chunk_coeff
            weight_term = chunk_coeff * weight_decay if weight_decay != 0 else None
    if isinstance(lr, Tensor):
        lr = lr.to(dtype)
    buffer = _momentum_step(
        param, grad, momentum_buffer, gradient_term, weight_term, lr=lr, momentum=momentum,
        dampening=dampening, nesterov=nesterov, lr_inside_momentum=lr_inside_momentum,
    )
    return buffer, result


def _momentum_step(
    w: Tensor,
    g: Tensor,
    buf: Tensor | None,
    a: Tensor,
    b: Tensor | None,
    *,
    lr: Number,
    momentum: float,
    dampening: float,
    nesterov: bool,
    lr_inside_momentum: bool,
) -> Tensor | None:
    """``functional.momentum_update`` for ``u = a*g + b*w`` (``a``, ``b``: per chunk ``[chunks, 1]`` or 0-d;
    ``b`` None: no weight term), in place on ``w`` and ``buf``, ``u`` never materialised (no temporary the
    size of the buffer). Returns the buffer (a new one when ``buf`` is None)."""
    velocity_scale = lr if lr_inside_momentum else 1.0
    if momentum != 0:
        if buf is None:
            buf = g * (velocity_scale * a).to(g.dtype)
            if b is not None:
                buf.addcmul_(w, velocity_scale * b)
        else:
            buf.mul_(momentum)
            buf.addcmul_(g, (1 - dampening) * velocity_scale * a)
            if b is not None:
                buf.addcmul_(w, (1 - dampening) * velocity_scale * b)
    weight_scale = 1.0 if lr_inside_momentum else lr
    if momentum == 0 or nesterov:
        # w -= lr*u (+ weight_scale*m*buf); the weight term folds into one multiply, w *= 1 - lr*b.
        if b is not None:
            w.mul_(1 - lr * b)
        w.addcmul_(g, -lr * a)
        if nesterov and momentum != 0:
            assert buf is not None
            _sub_scaled_(w, buf, weight_scale * momentum)
    else:
        assert buf is not None
        _sub_scaled_(w, buf, weight_scale)
    return buf if momentum != 0 else None


def _sub_scaled_(target: Tensor, source: Tensor, scale: Number) -> None:
    if isinstance(scale, Tensor):
        target.addcmul_(source, -scale)
    else:
        target.add_(source, alpha=-scale)
