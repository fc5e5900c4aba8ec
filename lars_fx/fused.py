"""``LARS(..., fused=True)``: the whole optimizer step as one compiled graph.

The step of the wrapped ``torch.optim.SGD`` (its foreach form, every param group) is traced once into
a canonical ATen graph (``make_fx`` + ``functionalize``, see ``lars_fx.passes.fx_canonicalize``), the
``FX_PIPELINE`` passes rewrite it into LARS, and Inductor (``compile_fx``) compiles it. Later steps
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

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from .carried_norms import CarriedNorms
from .functional import NormCollector
from .optimizer import refuse_parameters_without_data
from .passes.fx_canonicalize import canonicalize
from .passes.fx_pipeline import Stage, compile_with_inductor, run_pipeline
from .passes.fx_spec import LarsRequest, ParamRole, PatternMismatch
from .sharding import local

if TYPE_CHECKING:
    from .optimizer import LARS

__all__ = ["MAX_GRAPHS", "FusedStep", "InspectReport", "inspect_step"]

log = logging.getLogger("lars_fx.fused")

_OR_EAGER = ", or use fused=False"

MAX_GRAPHS = 8
"""Graphs one ``LARS(fused=True)`` compiles at most (read at every step); later new keys run the eager step."""


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

    def inputs(self, hypers: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        flat: list[Tensor] = []
        for group, (lr, momentum) in zip(self.groups, hypers, strict=True):
            flat += [lr, momentum, *group.params, *group.grads, *group.buffers]
        return flat


@dataclass
class _Compiled:
    run: Callable[..., Any] | None  # None: this key falls back to the eager step
    telemetry: list[tuple[int, list[int]]]
    carry: CarriedNorms | None = None


@dataclass
class InspectReport:
    """What ``inspect_step`` saw: the graph at every stage, node counts, Inductor's kernel count."""

    stages: list[tuple[str, str]] = field(default_factory=list)
    node_counts: list[tuple[str, int]] = field(default_factory=list)
    kernel_count: int | None = None
    fallback: str | None = None


def _lars_options(opt: LARS) -> dict[str, Any]:
    """The optimizer's options the passes bake into the graph (``LarsRequest`` fields)."""
    return {
        "coefficient": float(opt.coefficient),
        "epsilon": float(opt.epsilon),
        "use_clip": bool(opt.use_clip),
        "unit_trust_on_zero_norm": bool(opt.unit_trust_on_zero_norm),
        "lr_inside_momentum": bool(opt.lr_inside_momentum),
        "telemetry": opt.telemetry is not None,
        "carry_weight_norms": bool(opt.carry_weight_norms) and not opt._has_dtensors,
        "norm_process_groups": _norm_process_groups(opt),
    }


def _norm_process_groups(opt: LARS) -> tuple[str, ...]:
    reduction = opt._norm_reduction
    return () if reduction is None else tuple(group.group_name for group in reduction.groups)


def _plan(opt: LARS, *, zero_missing_buffers: bool = False) -> _StepPlan | None:
    """What the step reads, and its cache key; None when a momentum buffer is still to be created
    (unless ``zero_missing_buffers``: stand-ins of the right shape, for inspection)."""
    groups, key = [], []
    for group_index, group in enumerate(opt.param_groups):
        owners, owner_grads, mask = opt._collect(group_index)
        params, grads = opt._local_group(group_index, owners, owner_grads)  # themselves without DTensors
        all_params = group["params"]
        position = {id(p): i for i, p in enumerate(all_params)}
        indices = [position[id(p)] for p in owners]
        norm_weights = [opt._norm_weights[group_index][i] for i in indices]
        momentum = group["momentum"]
        buffers = [opt.state[p].get("momentum_buffer") for p in owners] if momentum != 0 else []
        if any(b is None for b in buffers):
            if not zero_missing_buffers:
                return None
            buffers = [torch.zeros_like(p) if b is None else b for p, b in zip(params, buffers)]
        if opt._has_dtensors:
            buffers = [local(b) for b in buffers]
        options = {
            "weight_decay": float(group["weight_decay"]),
            "momentum": float(momentum),
            "dampening": float(group["dampening"]),
            "nesterov": bool(group["nesterov"]),
            "maximize": bool(group["maximize"]),
        }
        groups.append(_GroupPlan(group_index, params, grads, buffers, mask, indices, options, owners, norm_weights))
        key.append(
            (
                tuple(
                    (id(owner), p.shape, p.stride(), p.dtype, p.device, g.stride(), g.dtype)
                    for owner, p, g in zip(owners, params, grads)
                ),
                tuple((b.shape, b.stride(), b.dtype, b.device) for b in buffers),  # a loaded state may differ
                tuple(mask),
                tuple(norm_weights),
                options["weight_decay"],
                options["momentum"] != 0,
                options["dampening"],
                options["nesterov"],
                options["maximize"],
            )
        )
    lars_options = _lars_options(opt)
    return _StepPlan(groups, lars_options, (*key, tuple(lars_options.items())))


def _step_function(plan: _StepPlan) -> Callable[..., None]:
    """The wrapped SGD's step over the flat inputs ``[lr, momentum, params, grads, buffers]*groups``."""

    def step(*flat: Tensor) -> None:
        offset = 0
        for group in plan.groups:
            n, lr = len(group.params), flat[offset]
            params = list(flat[offset + 2 : offset + 2 + n])
            grads = list(flat[offset + 2 + n : offset + 2 + 2 * n])
            buffers = list(flat[offset + 2 + 2 * n : offset + 2 + 2 * n + len(group.buffers)]) or [None] * n
            offset += 2 + 2 * n + len(group.buffers)
            if n:
                sgd(params, grads, buffers, foreach=True, lr=lr, **group.options)

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
        for k, (index, use_lars) in enumerate(zip(group.indices, group.mask)):
            params[names[offset + 2 + k]] = ParamRole(group.group_index, index, use_lars)
            if use_lars and plan.lars_options["norm_process_groups"]:
                norm_weights[names[offset + 2 + k]] = group.norm_weights[k]
        offset += 2 + 2 * n + len(group.buffers)
    return LarsRequest(params=params, momentum_inputs=momentum_inputs, norm_weights=norm_weights, **plan.lars_options)


def _rewrite(gm: torch.fx.GraphModule, request: LarsRequest, tag: str) -> tuple[torch.fx.GraphModule, list[Stage]]:
    """``run_pipeline``; a graph over shards whose norms were left unreduced (the pass switched off) is refused."""
    gm, stages = run_pipeline(gm, request, tag=tag)
    if request.norm_process_groups and not request.sharded_norms_reduced:
        raise PatternMismatch(
            None, "sharded norms", "the graph reads sharded parameters but reduce_sharded_norms did not run "
            "(LARS_FX_DISABLE?): their norms would be this rank's shard's"
        )
    return gm, stages


def _lower(gm: torch.fx.GraphModule, request: LarsRequest, inputs: list[Tensor]) -> tuple[Callable[..., Any], CarriedNorms | None]:
    """Compile the rewritten graph with Inductor; with its carried weight norms, if the pipeline gave it any."""
    carry = CarriedNorms.of(request, gm)
    example = inputs + (carry.inputs(inputs) if carry is not None else [])
    with torch.no_grad():  # the cache key pins every input's shape, strides, dtype and device
        return compile_with_inductor(gm, example, check_input_layout=False), carry


class FusedStep:
    """The compiled LARS step of one ``LARS`` optimizer over ``torch.optim.SGD`` (see the module docstring).

    ``compile_count`` counts captures (one per cache key, compiled or fallen back; at most
    ``MAX_GRAPHS``); ``fallback`` holds the last diagnostic that sent a configuration to the eager path
    (None if none did).
    """

    def __init__(self, opt: LARS) -> None:
        self.opt = opt
        self.compile_count = 0
        self.fallback: str | None = None
        self._cache: dict[tuple, _Compiled] = {}
        self._hypers: dict[int, tuple[Tensor, Tensor]] = {}
        self._warned_graph_limit = False

    def _hyper_tensors(self, plan: _StepPlan) -> list[tuple[Tensor, Tensor]]:
        hypers = []
        for group in plan.groups:
            settings = self.opt.param_groups[group.group_index]
            device = group.params[0].device if group.params else torch.device("cpu")
            lr, momentum = self._hypers.get(group.group_index, (None, None))
            if lr is None or lr.device != device:
                lr = torch.zeros((), dtype=torch.float64, device=device)
                momentum = torch.zeros((), dtype=torch.float64, device=device)
                self._hypers[group.group_index] = (lr, momentum)
            if isinstance(settings["lr"], Tensor):
                lr.copy_(settings["lr"].reshape(()))  # torch.optim.SGD takes any one-element lr, e.g. [1, 1]
            else:
                lr.fill_(settings["lr"])
            momentum.fill_(settings["momentum"])
            hypers.append((lr, momentum))
        return hypers

    def _compile(self, plan: _StepPlan, inputs: list[Tensor]) -> _Compiled:
        tag = f"fused{self.compile_count}"
        self.compile_count += 1
        try:
            gm = canonicalize(_step_function(plan), inputs)
            request = _request(plan, gm)
            gm, _ = _rewrite(gm, request, tag)
        except PatternMismatch as error:
            self.fallback = str(error)
            log.warning("lars-fx: fused step falls back to the eager LARS step for this configuration: %s", error)
            return _Compiled(None, [])
        run, carry = _lower(gm, request, inputs)
        return _Compiled(run, request.telemetry_outputs, carry)

    def _compiled(self, plan: _StepPlan, inputs: list[Tensor]) -> _Compiled | None:
        """The graph of ``plan``'s key, compiled now if new; None past ``MAX_GRAPHS`` (eager step)."""
        compiled = self._cache.get(plan.key)
        if compiled is None:
            if len(self._cache) >= MAX_GRAPHS:
                self._warn_graph_limit()
                return None
            compiled = self._cache[plan.key] = self._compile(plan, inputs)
        return compiled

    def _warn_graph_limit(self) -> None:
        if self._warned_graph_limit:
            return
        self._warned_graph_limit = True
        warnings.warn(
            f"LARS(fused=True) has compiled {len(self._cache)} graphs, its limit (lars_fx.fused.MAX_GRAPHS = "
            f"{MAX_GRAPHS}): steps whose configuration is new from now on run the eager LARS step (same "
            "numbers, slower); the graphs compiled so far are still used. Each new set of parameters that have "
            "gradients (experts of a mixture of experts, layers skipped on some steps), new shapes, strides or "
            "dtypes, and each change of a LARS or SGD option compiles a graph of its own. If parameters skip "
            "gradients on purpose, use fused=False, or set lars_fx.fused.MAX_GRAPHS to the number of "
            "configurations you expect (a zero gradient is not the same as none: momentum and weight decay "
            "still move the parameter).",
            stacklevel=2,
        )

    @torch.compiler.disable  # inside a torch.compile'd training step, run the already compiled step
    @torch.no_grad()
    def __call__(self) -> None:
        opt = self.opt
        plan = _plan(opt)
        if plan is None or plan.key not in self._cache:  # a cached key's tensors were checked when it was new
            refuse_parameters_without_data(opt.param_groups, opt.state, "LARS(fused=True)", _OR_EAGER)
        compiled = None
        if plan is not None and any(group.params for group in plan.groups):
            inputs = plan.inputs(self._hyper_tensors(plan))
            compiled = self._compiled(plan, inputs)
        if compiled is None or compiled.run is None:
            opt._eager_sgd_step()
            return
        carry = compiled.carry
        if carry is None:
            outputs = list(compiled.run(*inputs) or ())
        else:
            outputs = carry.keep(inputs, compiled.run(*inputs, *carry.inputs(inputs)))
        if opt.telemetry is not None:
            self._record(plan, compiled, outputs)

    def _record(self, plan: _StepPlan, compiled: _Compiled, outputs: list[Tensor]) -> None:
        per_group: dict[int, list[tuple[list[int], Tensor, Tensor, Tensor]]] = {}
        for b, (group_index, indices) in enumerate(compiled.telemetry):
            per_group.setdefault(group_index, []).append((indices, *outputs[3 * b : 3 * b + 3]))
        for group_index, batches in per_group.items():
            group = plan.groups[group_index]
            by_index = dict(zip(group.indices, group.owners))
            norms = NormCollector()  # several batches in one group (per tensor on CPU, or several dtypes)
            for batch in batches:
                norms.add(*batch)
            w_norm, g_norm, ratio = norms.result()
            indices = sorted(i for batch in batches for i in batch[0])
            self.opt.telemetry.record(self.opt, group_index, [by_index[i] for i in indices], w_norm, g_norm, ratio)


def inspect_step(opt: LARS, *, compile: bool = True) -> InspectReport:
    """Trace ``opt``'s compiled step (gradients must be set), run the passes, and report every stage.

    Nothing is stepped; missing momentum buffers are stood in by zeros (the graph is the same). ``compile=True`` also compiles the result with Inductor (its cache off) to count
    the kernels it generates; ``kernel_count`` stays None otherwise.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor import metrics

    plan = _plan(opt, zero_missing_buffers=True)
    refuse_parameters_without_data(opt.param_groups, opt.state, "LARS(fused=True)", _OR_EAGER)
    if not any(group.params for group in plan.groups):
        raise ValueError("inspect_step needs gradients: run a backward pass before inspecting the step")
    inputs = plan.inputs(FusedStep(opt)._hyper_tensors(plan))
    report = InspectReport()
    gm = canonicalize(_step_function(plan), inputs)
    request = _request(plan, gm)
    try:
        gm, stages = _rewrite(gm, request, "inspect")
    except PatternMismatch as error:
        report.fallback = str(error)
        return report
    report.stages = [(stage.name, stage.text) for stage in stages]
    report.node_counts = [(stage.name, stage.node_count) for stage in stages]
    if compile:
        metrics.reset()
        with inductor_config.patch(fx_graph_cache=False):
            _lower(gm, request, inputs)
        report.kernel_count = metrics.generated_kernel_count
    return report
