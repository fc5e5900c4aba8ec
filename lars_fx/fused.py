"""``LARS(..., fused=True)``: the whole optimizer step as one compiled graph.

The step of the wrapped ``torch.optim.SGD`` (its foreach form, every param group) is traced once into
a canonical ATen graph (``make_fx`` + ``functionalize``, see ``lars_fx.passes.fx_canonicalize``), the
``pipelines.LARS_SGD`` passes rewrite it into LARS, and Inductor (``compile_fx``) compiles it. Later steps
call the compiled artifact.

A step that has to create momentum buffers (the first one, or the first after a parameter gets its
first gradient) runs the eager LARS step instead, which creates them exactly as ``torch.optim.SGD``
does: that spares compiling a graph that would run once.

Each group's lr and momentum are graph inputs (0-d tensors refreshed from the param groups every
step), so schedulers do not recompile. Everything else the graph bakes in is the cache key: which
parameters have gradients, the tensors' shapes/strides/dtypes/devices, weight decay, whether momentum
is on, dampening, nesterov, maximize, the filter's decisions, and the LARS options (``coefficient``,
``epsilon``, ``use_clip``, ``unit_trust_on_zero_norm``, ``lr_inside_momentum``, ``carry_weight_norms``,
telemetry on or off), read afresh every step; a new key compiles once. A graph the passes do not
understand is logged with the diagnostic and that key runs the eager step. After ``MAX_GRAPHS`` keys
(say, a mixture of experts whose experts get gradients in turn) new keys run the eager step too, with
one warning.

Parameters without data (the meta device, fake tensors) are refused before anything is stepped.

With ``carry_weight_norms`` (the default) the graph takes each batch's ``||w||^2`` as inputs and returns
those of the weights it wrote (``fx_carry_weight_norms``); ``CarriedNorms`` feeds them to the next run
of the same graph while nothing else has written the weights, and recomputes them otherwise.

``LARS(flat=True, fused=True)`` (``FusedStep.flat``) captures the same SGD over the flat buffers of
``lars_fx.flat_layout``: per group, each bucket's weights, gradients and momentum buffer are one "parameter"
of SGD (its update is element-wise, so SGD over a buffer is SGD over its segments), and each LARS bucket's
``Segments.chunks`` and ``Segments.ranges`` follow as inputs SGD does not read. The request marks each LARS
bucket a segmented buffer (``fx_spec.FlatSegments``): the norm pass reduces one squared norm per segment
(``segment_squared_norms``), the trust-ratio pass broadcasts each segment's coefficient over its chunks
(``per_chunk``), the other passes are unchanged. The graph has the same nodes whatever the number of
parameters; its key is built per bucket (its buffers' layouts, the filter's side, its segments' indices in
their group) and from the options, reading no parameter's tensor. A step where some parameters step per tensor
(one without a gradient), or where momentum buffers are still to be made, runs the eager flat step. A
parameter is a view of its bucket's weights with a version counter of its own (``p.data = view``): a write
through it (``p.copy_``, ``load_state_dict``) is noticed by ``FlatLayout.notice_writes``, which bumps the
buffer's version before the graph runs, so the carried norms are recomputed.

Sharded parameters (DTensors: FSDP2, tensor parallelism, also mixed with plain tensors): the graph is traced
over this rank's pieces (``to_local()`` of the parameters, of their gradients laid out as them, and of the
momentum buffers, which stay DTensors in ``opt.state`` and are written in place through their pieces), keyed
by the pieces' shapes, strides and dtypes and the parameters' identities. ``fx_reduce_sharded_norms`` sums
the local squared norms of the whole step in one vector with one all-reduce per sharding process group,
inside the compiled graph (see ``lars_fx.sharding``). Weight norms are not carried over such parameters
(``carry_weight_norms`` is ignored): a shard's carried ``||w'||^2`` would need the reduction too, and writes
through ``torch._foreach_*_`` on DTensors or through ``p.to_local()`` bump no version counter the carry could
watch (and ``DTensor.data_ptr()`` is 0), so a carried norm could go stale unseen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from .functional import NormCollector
from .graph_cache import GraphCache, InspectReport, inspect_graph
from .params import refuse_parameters_without_data
from .passes.fx_spec import FlatSegments, LarsRequest, ParamRole
from .passes.pipelines import LARS_SGD
from .sharding import local

if TYPE_CHECKING:
    from .flat_layout import FlatBucket, FlatGather, FlatLayout
    from .optimizer import LARS, GroupTensors
    from .telemetry import Telemetry

__all__ = ["MAX_GRAPHS", "FusedStep", "InspectReport", "inspect_step", "record_graph_telemetry"]

_OR_EAGER = ", or use fused=False"

MAX_GRAPHS = 8
"""Graphs one ``LARS(fused=True)`` compiles at most (read at every step); later new keys run the eager
step."""


@dataclass
class _GroupPlan:
    group_index: int
    params: list[Tensor]  # what the graph reads and writes: the optimizer's parameters, or their local pieces
    grads: list[Tensor]
    buffers: list[Tensor]  # empty without momentum
    mask: list[bool]
    indices: list[int]
    options: dict[str, Any]
    owners: list[Tensor]  # the optimizer's parameters (DTensors where sharded)
    norm_weights: list[float]  # per parameter: 0.0 where another rank's copy of its piece counts


@dataclass
class _StepPlan:
    groups: list[_GroupPlan]
    lars_options: dict[str, Any]  # what _request hands the passes; part of the key
    key: tuple

    def devices(self) -> list[tuple[int, torch.device]]:
        """Per group, the device of its lr and momentum inputs."""
        return [
            (group.group_index, group.params[0].device if group.params else torch.device("cpu"))
            for group in self.groups
        ]

    def inputs(self, hypers: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        flat: list[Tensor] = []
        for group, (lr, momentum) in zip(self.groups, hypers, strict=True):
            flat += [lr, momentum, *group.params, *group.grads, *group.buffers]
        return flat


def _lars_options(opt: LARS) -> dict[str, Any]:
    """What the passes bake into the graph besides the parameter map (``LarsRequest`` fields)."""
    return {
        "options": opt.options,
        "telemetry": opt.telemetry is not None,
        "carry_weight_norms": bool(opt.carry_weight_norms) and not opt._has_dtensors,
        "norm_process_groups": _norm_process_groups(opt),
    }


def _norm_process_groups(opt: LARS) -> tuple[str, ...]:
    reduction = opt._norm_reduction
    return () if reduction is None else tuple(group.group_name for group in reduction.groups)


def _sgd_options(group: dict[str, Any]) -> dict[str, Any]:
    """The group's options as torch's functional ``sgd`` takes them (lr aside)."""
    return {
        "weight_decay": float(group["weight_decay"]),
        "momentum": float(group["momentum"]),
        "dampening": float(group["dampening"]),
        "nesterov": bool(group["nesterov"]),
        "maximize": bool(group["maximize"]),
    }


def _baked(options: dict[str, Any]) -> tuple:
    """What of a group's SGD options the graph bakes in (momentum is an input, but on or off shapes it)."""
    return (
        options["weight_decay"], options["momentum"] != 0, options["dampening"], options["nesterov"],
        options["maximize"],
    )


def _plan(opt: LARS, gathered: list[GroupTensors], *, zero_missing_buffers: bool = False) -> _StepPlan | None:
    """What the step reads (``gathered`` by the optimizer), and its cache key; None when a momentum buffer is
    still to be created (unless ``zero_missing_buffers``: stand-ins of the right shape, for inspection)."""
    groups, key = [], []
    for group_index, (group, tensors) in enumerate(zip(opt.param_groups, gathered, strict=True)):
        owners, params, grads = tensors.params, tensors.local_params, tensors.local_grads
        indices = tensors.indices
        mask = tensors.mask
        norm_weights = [opt._norm_weights[group_index][i] for i in indices]
        momentum = group["momentum"]
        buffers = [opt.state[p].get("momentum_buffer") for p in owners] if momentum != 0 else []
        if any(b is None for b in buffers):
            if not zero_missing_buffers:
                return None
            buffers = [torch.zeros_like(p) if b is None else b for p, b in zip(params, buffers, strict=True)]
        if opt._has_dtensors:
            buffers = [local(b) for b in buffers]
        options = _sgd_options(group)
        groups.append(
            _GroupPlan(group_index, params, grads, buffers, mask, indices, options, owners, norm_weights)
        )
        key.append(
            (
                tuple(
                    (id(owner), p.shape, p.stride(), p.dtype, p.device, g.stride(), g.dtype)
                    for owner, p, g in zip(owners, params, grads, strict=True)
                ),
                tuple((b.shape, b.stride(), b.dtype, b.device) for b in buffers),  # a loaded state may differ
                tuple(mask),
                tuple(norm_weights),
                *_baked(options),
            )
        )
    lars_options = _lars_options(opt)
    return _StepPlan(groups, lars_options, (*key, tuple(lars_options.items())))


def _step_function(plan: _StepPlan) -> Callable[..., None]:
    """The wrapped SGD's step over the inputs ``[lr, momentum, params, grads, buffers]*groups``."""
    return _sgd_step([(len(g.params), bool(g.buffers), g.options) for g in plan.groups])


def _sgd_step(groups: list[tuple[int, bool, dict[str, Any]]]) -> Callable[..., None]:
    """torch's foreach SGD over the inputs ``[lr, momentum, params, grads, buffers]`` of each group of
    ``(tensor count, with momentum buffers, SGD options)``; inputs after the groups' are not read (a flat
    step's segments, for the passes)."""

    def step(*inputs: Tensor) -> None:
        offset = 0
        for n, with_buffers, options in groups:
            lr = inputs[offset]
            params = list(inputs[offset + 2 : offset + 2 + n])
            grads = list(inputs[offset + 2 + n : offset + 2 + 2 * n])
            end = offset + 2 + 2 * n + (n if with_buffers else 0)
            buffers: list[Tensor | None] = list(inputs[offset + 2 + 2 * n : end]) or [None] * n
            offset = end
            if n:
                # torch's functional sgd takes a tensor lr; its annotation says float
                sgd(params, grads, buffers, foreach=True, lr=lr, **options)  # type: ignore[arg-type]

    return step


def _request(plan: _StepPlan, gm: torch.fx.GraphModule) -> LarsRequest:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    params: dict[str, ParamRole] = {}
    norm_weights: dict[str, float] = {}
    momentum_inputs: dict[int, str] = {}
    offset = 0
    for group in plan.groups:
        n = len(group.params)
        momentum_inputs[group.group_index] = names[offset + 1]
        for k, (index, use_lars) in enumerate(zip(group.indices, group.mask, strict=True)):
            params[names[offset + 2 + k]] = ParamRole(group.group_index, index, use_lars)
            if use_lars and plan.lars_options["norm_process_groups"]:
                norm_weights[names[offset + 2 + k]] = group.norm_weights[k]
        offset += 2 + 2 * n + len(group.buffers)
    return LarsRequest(
        params=params, momentum_inputs=momentum_inputs, norm_weights=norm_weights, **plan.lars_options
    )


@dataclass
class _FlatGroup:
    group_index: int
    buckets: list[FlatBucket]  # the group's buckets that step whole, in the layout's order
    options: dict[str, Any]

    @property
    def with_momentum(self) -> bool:
        return self.options["momentum"] != 0


@dataclass
class _FlatPlan:
    """A ``flat=True`` step as one graph: per group ``[lr, momentum, weights, grads, momentum buffers]`` of
    its buckets (each bucket buffer one "parameter" of SGD, whose update is element-wise), then per LARS
    bucket its ``Segments.chunks`` and ``Segments.ranges`` (read by the passes, not by SGD)."""

    groups: list[_FlatGroup]
    lars_options: dict[str, Any]
    key: tuple

    def segmented(self) -> list[FlatBucket]:
        return [b for group in self.groups for b in group.buckets if b.segments is not None]

    def devices(self) -> list[tuple[int, torch.device]]:
        return [(group.group_index, group.buckets[0].weights.device) for group in self.groups]

    def inputs(self, hypers: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        inputs: list[Tensor] = []
        for group, (lr, momentum) in zip(self.groups, hypers, strict=True):
            inputs += [lr, momentum, *(b.weights for b in group.buckets), *(b.grads for b in group.buckets)]
            if group.with_momentum:  # zeros stand in for buffers still to be made (inspection only)
                inputs += [torch.zeros_like(b.weights) if b.momentum is None else b.momentum
                           for b in group.buckets]
        for bucket in self.segmented():
            assert bucket.segments is not None
            inputs += [bucket.segments.chunks, bucket.segments.ranges]
        return inputs

    def step_function(self) -> Callable[..., None]:
        return _sgd_step([(len(g.buckets), g.with_momentum, g.options) for g in self.groups])


def _bucket_key(bucket: FlatBucket, momentum_state: str) -> tuple:
    """What a graph bakes in of a bucket: its place, the filter's decision, its buffers' layout, its
    segments (count, and their indices, which telemetry names)."""
    buffers = (bucket.weights, bucket.grads) if bucket.momentum is None else (
        bucket.weights, bucket.grads, bucket.momentum
    )
    return (
        bucket.group_index,
        bucket.use_lars,
        tuple(bucket.indices),
        momentum_state,
        tuple((b.shape, b.stride(), b.dtype, b.device) for b in buffers),
    )


def _flat_plan(opt: LARS, flat: FlatGather) -> _FlatPlan:
    """The graph of the buckets ``flat`` steps whole (none has a momentum buffer still to make), and its key:
    the buckets and the groups' and LARS's baked options, built per bucket (no parameter's tensor is read)."""
    by_group: dict[int, _FlatGroup] = {}
    bucket_keys = []
    for bucket, momentum_state in flat.buckets:
        group = by_group.get(bucket.group_index)
        if group is None:
            options = _sgd_options(opt.param_groups[bucket.group_index])
            group = by_group[bucket.group_index] = _FlatGroup(bucket.group_index, [], options)
        group.buckets.append(bucket)
        bucket_keys.append(_bucket_key(bucket, momentum_state))
    groups = [by_group[index] for index in sorted(by_group)]
    lars_options = _lars_options(opt)
    key = (
        "flat",
        tuple(bucket_keys),
        tuple((group.group_index, *_baked(group.options)) for group in groups),
        tuple(lars_options.items()),
    )
    return _FlatPlan(groups, lars_options, key)


def _flat_request(plan: _FlatPlan, gm: torch.fx.GraphModule) -> LarsRequest:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    params: dict[str, ParamRole] = {}
    momentum_inputs: dict[int, str] = {}
    sizes = [2 + (3 if group.with_momentum else 2) * len(group.buckets) for group in plan.groups]
    segment_names = iter(names[sum(sizes) :])
    offset = 0
    for group, size in zip(plan.groups, sizes, strict=True):
        momentum_inputs[group.group_index] = names[offset + 1]
        for k, bucket in enumerate(group.buckets):
            segments = None
            if bucket.segments is not None:
                chunks, ranges = next(segment_names), next(segment_names)
                count = bucket.segments.num_segments
                segments = FlatSegments(
                    chunks, ranges, count, bucket.segments.max_chunks, tuple(bucket.indices)
                )
            params[names[offset + 2 + k]] = ParamRole(
                group.group_index, bucket.indices[0], bucket.use_lars, segments
            )
        offset += size
    return LarsRequest(params=params, momentum_inputs=momentum_inputs, **plan.lars_options)


_LIMIT_ADVICE = (
    "Each new set of parameters that have gradients (experts of a mixture of experts, layers skipped on "
    "some steps), new shapes, strides or dtypes, and each change of a LARS or SGD option compiles a graph of "
    "its own. If parameters skip gradients on purpose, use fused=False, or set lars_fx.fused.MAX_GRAPHS to "
    "the number of configurations you expect (a zero gradient is not the same as none: momentum and weight "
    "decay still move the parameter)."
)


def scalar_input(device: torch.device) -> Tensor:
    """A 0-d float64 graph input for a hyperparameter, refilled from its param group every step."""
    return torch.zeros((), dtype=torch.float64, device=device)


def set_scalar(target: Tensor, value: float | Tensor) -> None:
    if isinstance(value, Tensor):
        target.copy_(value.reshape(()))  # torch.optim takes a one-element lr of any shape, e.g. [1, 1]
    else:
        target.fill_(value)


class FusedStep:
    """The compiled LARS step of one ``LARS`` optimizer over ``torch.optim.SGD`` (see the module docstring).

    ``compile_count`` counts captures (one per cache key, compiled or fallen back; at most
    ``MAX_GRAPHS``); ``fallback`` holds the last diagnostic that sent a configuration to the eager path
    (None if none did).
    """

    def __init__(self, opt: LARS) -> None:
        self.opt = opt
        self.cache = GraphCache(LARS_SGD, "LARS", "fused", lambda: MAX_GRAPHS, _LIMIT_ADVICE)
        self._hypers: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def compile_count(self) -> int:
        return self.cache.compile_count

    @property
    def fallback(self) -> str | None:
        return self.cache.fallback

    def _hyper_tensors(self, groups: list[tuple[int, torch.device]]) -> list[tuple[Tensor, Tensor]]:
        """Per ``(group index, device)``, the group's lr and momentum as 0-d tensors on the device."""
        hypers = []
        for group_index, device in groups:
            settings = self.opt.param_groups[group_index]
            lr, momentum = self._hypers.get(group_index, (None, None))
            if lr is None or momentum is None or lr.device != device:
                lr, momentum = self._hypers[group_index] = (scalar_input(device), scalar_input(device))
            set_scalar(lr, settings["lr"])
            set_scalar(momentum, settings["momentum"])
            hypers.append((lr, momentum))
        return hypers

    @torch.compiler.disable  # inside a torch.compile'd training step, run the already compiled step
    @torch.no_grad()
    def __call__(
        self, gathered: list[GroupTensors], eager_step: Callable[[list[GroupTensors]], None]
    ) -> None:
        """One step over the tensors the optimizer ``gathered``; ``eager_step(gathered)`` where no graph
        runs."""
        opt = self.opt
        plan = _plan(opt, gathered)
        if plan is None or plan.key not in self.cache:  # a cached key's tensors were checked when it was new
            refuse_parameters_without_data(opt.param_groups, opt.state, "LARS(fused=True)", _OR_EAGER)
        compiled = None
        if plan is not None and any(group.params for group in plan.groups):
            inputs = plan.inputs(self._hyper_tensors(plan.devices()))
            request = functools.partial(_request, plan)
            compiled = self.cache.get(plan.key, _step_function(plan), inputs, request)
        if compiled is None or compiled.run is None:
            eager_step(gathered)
            return
        outputs = compiled(inputs)
        if opt.telemetry is not None:
            record_graph_telemetry(opt.telemetry, opt, compiled.telemetry, outputs)

    @torch.compiler.disable  # inside a torch.compile'd training step, run the already compiled step
    @torch.no_grad()
    def flat(
        self,
        flat: FlatGather,
        rest: list[GroupTensors],
        eager_flat_step: Callable[[FlatGather, list[GroupTensors]], None],
    ) -> None:
        """One ``LARS(flat=True, fused=True)`` step: the buckets that step whole as one graph over their flat
        buffers (its size independent of the number of parameters), then the parameters outside the buckets
        (empty ones) per tensor. ``eager_flat_step(flat, rest)`` runs the whole step instead where a bucket
        steps per tensor this step (a gradient missing), momentum buffers are still to be made, no graph
        runs, or telemetry would see a group in two parts."""
        opt = self.opt
        outside = any(tensors.params for tensors in rest)
        if (
            not flat.buckets
            or flat.per_tensor
            or any(state == "new" for _, state in flat.buckets)
            or (outside and opt.telemetry is not None)
        ):
            eager_flat_step(flat, rest)
            return
        plan = _flat_plan(opt, flat)
        if plan.key not in self.cache:
            refuse_parameters_without_data(opt.param_groups, opt.state, "LARS(fused=True)", _OR_EAGER)
        inputs = plan.inputs(self._hyper_tensors(plan.devices()))
        request = functools.partial(_flat_request, plan)
        compiled = self.cache.get(plan.key, plan.step_function(), inputs, request)
        if compiled is None or compiled.run is None:
            eager_flat_step(flat, rest)
            return
        outputs = compiled(inputs)
        if opt.telemetry is not None:
            record_graph_telemetry(opt.telemetry, opt, compiled.telemetry, outputs)
        if outside:
            eager_flat_step(replace(flat, buckets=[]), rest)


def record_graph_telemetry(
    telemetry: Telemetry, optimizer: Any, batches: list[tuple[int, list[int]]], outputs: list[Tensor]
) -> None:
    """Record the ``(||w||, ||g||, ratio)`` outputs the trust-ratio pass appended to a graph's outputs, three
    per batch (``fx_spec.telemetry_outputs``: ``(group_index, [index_in_group...])`` per batch), per param
    group."""
    per_group: dict[int, list[tuple[list[int], Tensor, Tensor, Tensor]]] = {}
    for b, (group_index, indices) in enumerate(batches):
        w_norm, g_norm, ratio = outputs[3 * b : 3 * b + 3]
        per_group.setdefault(group_index, []).append((indices, w_norm, g_norm, ratio))
    for group_index, parts in per_group.items():
        params = optimizer.param_groups[group_index]["params"]
        norms = NormCollector()  # several batches in one group (per tensor on CPU, or several dtypes)
        for part in parts:
            norms.add(*part)
        indices = sorted(i for part in parts for i in part[0])
        telemetry.record(optimizer, group_index, [params[i] for i in indices], *norms.result())


def inspect_step(opt: LARS, *, compile: bool = True) -> InspectReport:
    """Trace ``opt``'s compiled step (gradients must be set), run the passes, and report every stage.

    Nothing is stepped; missing momentum buffers are stood in by zeros (the graph is the same).
    ``compile=True`` also compiles the result with Inductor (its cache off) to count the kernels it generates;
    ``kernel_count`` stays None otherwise.
    """
    if opt.flat_layout is not None:
        return _inspect_flat_step(opt, opt.flat_layout, compile=compile)
    plan = _plan(opt, opt.gather(), zero_missing_buffers=True)
    assert plan is not None  # with zero_missing_buffers, _plan always plans
    refuse_parameters_without_data(opt.param_groups, opt.state, "LARS(fused=True)", _OR_EAGER)
    if not any(group.params for group in plan.groups):
        raise ValueError("inspect_step needs gradients: run a backward pass before inspecting the step")
    inputs = plan.inputs(FusedStep(opt)._hyper_tensors(plan.devices()))
    request_for = functools.partial(_request, plan)
    return inspect_graph(LARS_SGD, _step_function(plan), inputs, request_for, tag="inspect", compile=compile)


def _inspect_flat_step(opt: LARS, layout: FlatLayout, *, compile: bool) -> InspectReport:
    """``inspect_step`` of a ``flat=True`` optimizer: the graph over its buckets' flat buffers."""
    flat = layout.gather(opt.param_groups, opt.state)
    if flat.per_tensor or not flat.buckets:
        raise ValueError(
            "inspect_step needs every flat parameter to have a gradient (parameters without one step per "
            "tensor): run a backward pass before inspecting the step"
        )
    plan = _flat_plan(opt, flat)
    inputs = plan.inputs(FusedStep(opt)._hyper_tensors(plan.devices()))
    request_for = functools.partial(_flat_request, plan)
    return inspect_graph(LARS_SGD, plan.step_function(), inputs, request_for, tag="inspect", compile=compile)
