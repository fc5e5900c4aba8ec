"""``LARS(..., flat=True)``: each (param group, device, dtype, LARS or not)'s parameters, gradients and
momentum buffers as segments of one contiguous buffer each.

Parameters keep their identity: ``p.data`` becomes a view of its bucket's weight buffer, ``p.grad`` a view of
the gradient buffer (autograd then accumulates into it), ``opt.state[p]["momentum_buffer"]`` a view of the
momentum buffer, so modules, hooks, ``named_parameters()`` and ``state_dict()`` see what they saw before. Each
buffer is ``[chunks, chunk_size]`` (``functional.flat.chunk_layout``: segments start on chunk boundaries, the
rest of a segment's last chunk is padding, kept at zero because the fused step's norms sum whole chunks: see
``notice_writes``); the step reads the buffers, not the views.

Every step ``FlatLayout.gather`` checks, per parameter, that its data, gradient and momentum buffer are still
its views. A gradient that is not (``model.zero_grad()`` set it to None and backward made a new one, a user
replaced ``.grad``, DDP's ``gradient_as_bucket_view``) is copied in and ``.grad`` re-pointed: exact, one more
copy, counted in ``grad_copies`` and warned about once. A momentum buffer that is not (a loaded state) is
copied in likewise. A bucket with a parameter that has no gradient this step, or whose momentum buffer is
still to be made while others have theirs, steps per tensor over the views (``FlatGather.per_tensor``),
exactly as without ``flat``. Parameter data that moved (``model.to(...)``, ``p.data = ...``) makes the layout
be built again.

Refused, naming the parameter: sharded parameters (DTensors own their storage), parameters that are views of
other tensors, and sparse gradients (at the step, as every mode). Parameters that do not require gradients
stay out of the buffers.
"""

from __future__ import annotations

import operator
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .functional.flat import ChunkLayout, Segments, chunk_layout
from .params import parameter_name
from .sharding import is_dtensor

__all__ = ["FlatBucket", "FlatGather", "FlatLayout", "GRAD_COPY_WARNING"]

GRAD_COPY_WARNING = (
    "LARS(flat=True) found gradients that are not views of its flat gradient buffer (for {name}) and copied "
    "them in: exact, but one more read and write of every such gradient per step. The usual cause is "
    "model.zero_grad() or zero_grad(set_to_none=True) on something other than this optimizer (backward then "
    "makes new gradients), code that assigns .grad, or DDP(gradient_as_bucket_view=True). Call "
    "opt.zero_grad() on the LARS optimizer (it zeroes the flat buffer in place) and keep DDP's "
    "gradient_as_bucket_view off to stay on the fast path. opt.flat_layout.grad_copies counts the copies."
)


@dataclass
class FlatBucket:
    """One (param group, device, dtype, LARS or not)'s parameters as segments of flat buffers."""

    group_index: int
    use_lars: bool
    indices: list[int]  # the parameters' positions in their group
    params: list[Tensor]
    layout: ChunkLayout
    weights: Tensor  # [chunks, chunk_size]
    grads: Tensor
    momentum: Tensor | None
    segments: Segments | None  # LARS buckets: which chunk holds which segment
    weight_views: list[Tensor] = field(default_factory=list)
    grad_views: list[Tensor] = field(default_factory=list)
    momentum_views: list[Tensor] = field(default_factory=list)
    weight_pointers: list[int] = field(default_factory=list)
    attached: list[bool] = field(default_factory=list)  # .grad was given its view (copies after count)
    # the sum of the parameters' version counters (each only grows) after the bucket's last whole step, and
    # before the current one
    version_sum: int = -1
    versions_now: int = -1
    momentum_version: int = -1  # the momentum buffer's version counter after the last step

    def padding(self, buffer: Tensor) -> list[Tensor]:
        """The padding after each segment of ``buffer`` (empty where a segment fills its last chunk)."""
        flat, ends = buffer.view(-1), [*self.layout.offsets[1:], self.layout.size]
        return [
            flat[offset + numel : end]
            for offset, numel, end in zip(self.layout.offsets, self.layout.numels, ends, strict=True)
            if offset + numel < end
        ]

    def zero_padding(self) -> None:
        """Zero the weights' and momentum's padding (only a non-finite trust ratio writes there)."""
        pads = self.padding(self.weights) + (self.padding(self.momentum) if self.momentum is not None else [])
        if pads:
            torch._foreach_zero_(pads)

    def view(self, buffer: Tensor, k: int) -> Tensor:
        offset, numel = self.layout.offsets[k], self.layout.numels[k]
        return buffer.view(-1)[offset : offset + numel].view(self.params[k].shape)

    def views(self, buffer: Tensor) -> list[Tensor]:
        return [self.view(buffer, k) for k in range(len(self.params))]

    def adopt_momentum(self, buffers: list[Tensor]) -> None:
        """Copy per-parameter momentum buffers in (allocating the flat buffer if there is none)."""
        if self.momentum is None:
            self.momentum = torch.zeros_like(self.weights)
            self.momentum_views = self.views(self.momentum)
        for view, buf in zip(self.momentum_views, buffers, strict=True):
            if buf is not view:
                view.copy_(buf)

    def set_momentum(self, buffer: Tensor) -> None:
        self.momentum = buffer
        self.momentum_views = self.views(buffer)


@dataclass
class FlatGather:
    """What one step reads: the buckets that step whole (each with its momentum state: ``"flat"`` buffer in
    place, ``"new"`` buffer to be made, ``"none"`` without momentum), per group the positions of the bucketed
    parameters that step per tensor, and whether a parameter outside the buckets has a gradient."""

    buckets: list[tuple[FlatBucket, str]]
    per_tensor: dict[int, list[int]]
    outside_grads: bool = False  # a parameter outside the buckets has a gradient (it steps per tensor)


_VERSION = operator.attrgetter("_version")
_GRAD = operator.attrgetter("grad")
_DATA_PTR = Tensor.data_ptr
_LIBRARIES = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside lars-fx and torch (the user's ``opt.step()``)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    return level


def _shares_storage(param: Tensor, own: frozenset[int]) -> bool:
    """Whether ``param`` views a storage larger than itself (a slice, an expanded tensor, a parameter made
    over part of another tensor), other than a buffer of this optimizer's previous layout."""
    if param.is_meta or is_dtensor(param):
        return False
    storage = param.untyped_storage()
    return storage.data_ptr() not in own and storage.nbytes() != param.numel() * param.element_size()


def _refuse(group: dict[str, Any], group_index: int, index: int, param: Tensor, own: frozenset[int]) -> None:
    name = parameter_name(group, group_index, index)
    if is_dtensor(param):
        raise ValueError(
            f"LARS(flat=True) got the sharded (DTensor) parameter {name}: sharded parameters own their "
            "storage (FSDP2, tensor parallelism), so they cannot be views of a flat buffer; use flat=False"
        )
    if param._base is not None or _shares_storage(param, own):
        raise ValueError(
            f"LARS(flat=True) got {name}, a view of another tensor: re-pointing it into a flat buffer would "
            "cut it off from the tensor it views; make it a parameter of its own (nn.Parameter(t.clone())), "
            "or use flat=False"
        )


class FlatLayout:
    """The flat buffers of one ``LARS`` optimizer (see the module docstring)."""

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        masks: list[list[bool]],
        state: Any,
        own_storages: frozenset[int] = frozenset(),
    ) -> None:
        """Build the buffers of ``param_groups`` (``masks``: the filter's decisions), copying the parameters,
        gradients and momentum buffers (in ``state``) in; ``own_storages``: the data pointers of the previous
        layout's buffers, whose views are parameters, not slices of someone else's tensor."""
        self.buckets: list[FlatBucket] = []
        self.outside: list[Tensor] = []  # parameters left out (no gradient required, or empty)
        self.grad_copies = 0
        self._warned = False
        for group_index, (group, mask) in enumerate(zip(param_groups, masks, strict=True)):
            keyed: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
            for index, param in enumerate(group["params"]):
                _refuse(group, group_index, index, param, own_storages)
                if param.requires_grad and param.numel() > 0:
                    keyed.setdefault((param.device, param.dtype, mask[index]), []).append(index)
                else:
                    self.outside.append(param)
            for (_, _, use_lars), indices in keyed.items():
                self.buckets.append(self._bucket(group, group_index, use_lars, indices, state))

    @staticmethod
    def _bucket(
        group: dict[str, Any], group_index: int, use_lars: bool, indices: list[int], state: Any
    ) -> FlatBucket:
        params = [group["params"][i] for i in indices]
        layout = chunk_layout([p.numel() for p in params])
        first = params[0]
        shape = (layout.chunks, layout.chunk_size)
        weights = torch.zeros(shape, dtype=first.dtype, device=first.device)
        bucket = FlatBucket(
            group_index, use_lars, indices, params, layout, weights, torch.zeros_like(weights), None,
            layout.segments(first.device) if use_lars else None,
        )
        bucket.weight_views = bucket.views(weights)
        bucket.grad_views = bucket.views(bucket.grads)
        for param, weight_view, grad_view in zip(params, bucket.weight_views, bucket.grad_views, strict=True):
            weight_view.copy_(param.detach())
            param.data = weight_view
            bucket.weight_pointers.append(param.data_ptr())
            if param.grad is not None and not param.grad.is_sparse:
                grad_view.copy_(param.grad)
                param.grad = grad_view
            bucket.attached.append(param.grad is grad_view)
        buffers = [state[p].get("momentum_buffer") if p in state else None for p in params]
        if all(b is not None for b in buffers):
            bucket.adopt_momentum(buffers)  # type: ignore[arg-type]
            for param, view in zip(params, bucket.momentum_views, strict=True):
                state[param]["momentum_buffer"] = view
        return bucket

    def storages(self) -> frozenset[int]:
        """The data pointers of the weight buffers (their views are the parameters)."""
        return frozenset(bucket.weights.untyped_storage().data_ptr() for bucket in self.buckets)

    def param_ids(self) -> set[int]:
        return {id(p) for bucket in self.buckets for p in bucket.params}

    def moved(self) -> bool:
        """Whether a parameter's data is no longer its view (``model.to(...)``, ``p.data = ...``)."""
        return any(list(map(_DATA_PTR, bucket.params)) != bucket.weight_pointers for bucket in self.buckets)

    def zero_grad(self) -> None:
        """Zero every flat gradient buffer in place and give each parameter whose gradient is not its view
        (but not None) its view again."""
        for bucket in self.buckets:
            bucket.grads.zero_()
            for k, param in enumerate(bucket.params):
                if param.grad is not None and param.grad is not bucket.grad_views[k]:
                    param.grad = bucket.grad_views[k]
                    bucket.attached[k] = True

    def gather(self, param_groups: list[dict[str, Any]], state: Any) -> FlatGather:
        """Per bucket, whether it steps whole this step; gradients and momentum buffers that are not views
        copied in first (see the module docstring)."""
        gathered = FlatGather([], {})
        for bucket in self.buckets:
            group = param_groups[bucket.group_index]
            if not self._gradients_in_place(bucket, group):
                gathered.per_tensor.setdefault(bucket.group_index, []).extend(bucket.indices)
                continue
            momentum = self._momentum_in_place(bucket, group, state)
            if momentum is None:
                gathered.per_tensor.setdefault(bucket.group_index, []).extend(bucket.indices)
            else:
                gathered.buckets.append((bucket, momentum))
        for indices in gathered.per_tensor.values():
            indices.sort()
        gathered.outside_grads = any(p.grad is not None for p in self.outside)
        return gathered

    def _gradients_in_place(self, bucket: FlatBucket, group: dict[str, Any]) -> bool:
        """True when every parameter's gradient is (now) its view; False when one has none."""
        if all(map(operator.is_, map(_GRAD, bucket.params), bucket.grad_views)):
            return True  # the fast path, every step after the first: nothing to copy
        copied = None
        for k, (param, view) in enumerate(zip(bucket.params, bucket.grad_views, strict=True)):
            grad = param.grad
            if grad is view:
                continue
            if grad is None or grad.is_sparse or grad.is_complex():
                return False  # steps per tensor; the per-tensor step refuses sparse and complex gradients
            view.copy_(grad)
            param.grad = view
            if bucket.attached[k]:
                self.grad_copies += 1
                copied = copied or parameter_name(group, bucket.group_index, bucket.indices[k])
            bucket.attached[k] = True
        if copied is not None and not self._warned:
            self._warned = True
            warnings.warn(GRAD_COPY_WARNING.format(name=copied), stacklevel=_caller_level())
        return True

    @staticmethod
    def _momentum_in_place(bucket: FlatBucket, group: dict[str, Any], state: Any) -> str | None:
        """``"none"`` (no momentum), ``"flat"`` (every buffer is its view, after copying in those that were
        not), ``"new"`` (no parameter has one yet); None when only some have one (per tensor)."""
        if group["momentum"] == 0:
            return "none"
        buffers = [None if d is None else d.get("momentum_buffer") for d in map(state.get, bucket.params)]
        if bucket.momentum is not None and all(map(operator.is_, buffers, bucket.momentum_views)):
            return "flat"  # the fast path, every step after the first
        if all(b is None for b in buffers):
            return "new"
        if any(b is None for b in buffers):
            return None
        bucket.adopt_momentum(buffers)  # type: ignore[arg-type]
        for param, view in zip(bucket.params, bucket.momentum_views, strict=True):
            state[param]["momentum_buffer"] = view
        return "flat"

    @staticmethod
    def notice_writes(flat: FlatGather) -> None:
        """Before a step, for each bucket whose parameters or momentum buffers were written since its last
        step (``p.copy_``, ``load_state_dict``, a per-tensor step, an edit of ``opt.state``): bump the weight
        buffer's version (a parameter re-pointed with ``p.data = view`` keeps a version counter of its own,
        and the carried norms of a fused step watch the buffer's), and zero the padding. The padding holds
        zeros (the norms sum whole chunks) unless a step with a non-finite trust ratio wrote NaN there, which
        only happens to a segment that is NaN itself; zeroing it once someone writes the segments again lets
        the segment recover as it would without ``flat``."""
        for bucket, _ in flat.buckets:
            bucket.versions_now = sum(map(_VERSION, bucket.params))
            momentum = bucket.momentum
            momentum_written = momentum is not None and momentum._version != bucket.momentum_version
            if bucket.versions_now != bucket.version_sum or momentum_written:
                bucket.zero_padding()
                torch.autograd.graph.increment_version(bucket.weights)

    @staticmethod
    def stepped(flat: FlatGather) -> None:
        """After a step wrote the buckets' buffers (``notice_writes`` ran before it): bump their parameters'
        versions, as an in-place update of each would (autograd then refuses a backward through weights saved
        before the step), and keep their sum."""
        for bucket, _ in flat.buckets:
            torch.autograd.graph.increment_version(bucket.params)
            bucket.version_sum = bucket.versions_now + len(bucket.params)
            if bucket.momentum is not None:
                bucket.momentum_version = bucket.momentum._version

    def keep_new_momentum(self, bucket: FlatBucket, buffer: Tensor, state: Any) -> None:
        """After a ``"new"`` step: ``buffer`` is the bucket's momentum; its views become the state's."""
        bucket.set_momentum(buffer)
        for param, view in zip(bucket.params, bucket.momentum_views, strict=True):
            state[param]["momentum_buffer"] = view
