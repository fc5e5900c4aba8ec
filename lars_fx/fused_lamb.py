"""The fused LAMB step: ``torch.optim.AdamW``'s step over a ``LAMB`` optimizer's groups and state, captured as
one graph, rewritten into LAMB by the ``pipelines.LAMB_ADAM`` passes and compiled by Inductor.

The step traced is ``torch.optim.adamw.adamw(..., foreach=False, capturable=True)`` over every param group
(the per-tensor form: Inductor fuses the loop all the same; ``capturable`` keeps the step count a tensor), on
the optimizer's own state (``step``, ``exp_avg``, ``exp_avg_sq``, as ``torch.optim.Adam``'s). Each group's lr
is a 0-d float64 graph input refreshed from the group at every step, and the step counts are the state tensors
themselves, so neither a scheduler on lr nor the steps recompile. Everything else the graph bakes in is the
cache key: which parameters have gradients, the tensors' shapes/strides/dtypes/devices, betas, eps, weight
decay, maximize, the filter's decisions, ``trust_clip`` and the carried norms; a new key compiles once (at
most ``lars_fx.fused.MAX_GRAPHS`` keys, then new keys run the eager step with one warning). A scheduler that
changes betas (``OneCycleLR``'s momentum cycle) therefore compiles per value: switch ``cycle_momentum`` off.

The eager step runs instead where the state is still to be created (a parameter's first step), and for a
configuration whose graph the passes do not understand (logged with the ``PatternMismatch``). With telemetry
the graph also returns each batch's ``||w||``, ``||r||`` and trust ratio (``insert_trust_ratio``), recorded
per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw

from . import fused
from .graph_cache import GraphCache, InspectReport, inspect_graph
from .params import group_gradients, refuse_parameters_without_data
from .passes.fx_lamb_spec import LambRequest
from .passes.fx_spec import ParamRole
from .passes.pipelines import LAMB_ADAM

if TYPE_CHECKING:
    from .lamb import LAMB

__all__ = ["FusedLambStep", "inspect_lamb_step"]

_STATE = ("exp_avg", "exp_avg_sq", "step")


@dataclass
class _GroupPlan:
    group_index: int
    indices: list[int]
    mask: list[bool]
    tensors: list[list[Tensor]]  # params, grads, exp_avgs, exp_avg_sqs, steps
    hyper: dict[str, Any]  # adamw's keyword arguments besides lr

    @property
    def size(self) -> int:
        return len(self.indices)


@dataclass
class _StepPlan:
    groups: list[_GroupPlan]
    key: tuple

    def inputs(self, lrs: list[Tensor]) -> list[Tensor]:
        flat: list[Tensor] = []
        for group, lr in zip(self.groups, lrs, strict=True):
            flat += [lr, *(t for tensors in group.tensors for t in tensors)]
        return flat


def _group_plan(opt: LAMB, group_index: int, stand_in_state: bool = False) -> _GroupPlan | None:
    """What one group's step reads; None when a parameter with a gradient has no Adam state yet (unless
    ``stand_in_state``: zeros of the right layout, for inspection)."""
    group = opt.param_groups[group_index]
    mask = opt.lamb_mask(group_index)
    gathered = group_gradients(group, group_index, mask, "LAMB")
    tensors: list[list[Tensor]] = [[], [], [], [], []]
    for param, grad in zip(gathered.params, gathered.grads, strict=True):
        state = opt.state.get(param, {})
        if any(name not in state for name in _STATE):
            if not stand_in_state:
                return None
            state = {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param),
                     "step": torch.zeros((), dtype=torch.float32)}
        for column, tensor in zip(tensors, (param, grad, *(state[name] for name in _STATE)), strict=True):
            column.append(tensor)
    beta1, beta2 = (float(beta) for beta in group["betas"])
    hyper = {
        "beta1": beta1,
        "beta2": beta2,
        "eps": float(group["eps"]),
        "weight_decay": float(group["weight_decay"]),
        "maximize": bool(group["maximize"]),
    }
    return _GroupPlan(group_index, gathered.indices, gathered.mask, tensors, hyper)


def _layout(tensors: list[Tensor]) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors)


def _plan(
    opt: LAMB, carry_weight_norms: bool, telemetry: bool, stand_in_state: bool = False
) -> _StepPlan | None:
    groups, key = [], []
    for group_index in range(len(opt.param_groups)):
        plan = _group_plan(opt, group_index, stand_in_state)
        if plan is None:
            return None
        groups.append(plan)
        params = tuple(id(p) for p in plan.tensors[0])
        key.append(
            (params, *(_layout(ts) for ts in plan.tensors), tuple(plan.mask), tuple(plan.hyper.items()))
        )
    return _StepPlan(groups, (*key, opt.options, carry_weight_norms, telemetry))


def _step_function(plan: _StepPlan) -> Callable[..., None]:
    """AdamW's step over the flat inputs ``[lr, params, grads, exp_avgs, exp_avg_sqs, steps] * groups``."""

    def step(*flat: Tensor) -> None:
        offset = 0
        for group in plan.groups:
            n, lr = group.size, flat[offset]
            params, grads, exp_avgs, exp_avg_sqs, steps = (
                list(flat[offset + 1 + k * n : offset + 1 + (k + 1) * n]) for k in range(5)
            )
            offset += 1 + 5 * n
            if n:
                adamw(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    steps,
                    foreach=False,
                    capturable=True,
                    amsgrad=False,
                    lr=lr,
                    **group.hyper,
                )

    return step


def _request(
    plan: _StepPlan, gm: torch.fx.GraphModule, opt: LAMB, carry_weight_norms: bool, telemetry: bool
) -> LambRequest:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    params: dict[str, ParamRole] = {}
    offset = 0
    for group in plan.groups:
        for k, (index, use_lamb) in enumerate(zip(group.indices, group.mask, strict=True)):
            params[names[offset + 1 + k]] = ParamRole(group.group_index, index, use_lamb)
        offset += 1 + 5 * group.size
    return LambRequest(
        params=params, options=opt.options, carry_weight_norms=carry_weight_norms, telemetry=telemetry
    )


_LIMIT_ADVICE = (
    "Each new set of parameters that have gradients, new shapes or dtypes, and each change of betas, eps, "
    "weight decay or trust_clip compiles a graph of its own."
)


class FusedLambStep:
    """The compiled LAMB step of one ``LAMB`` optimizer (see the module docstring).

    ``eager_step`` runs one eager LAMB step of ``opt`` (what the step falls back to; it must not call back
    into this object). ``carry_weight_norms``: each run hands ``||w'||^2`` of the weights it writes to the
    next, which then reads ``w`` once (``fx_carry_weight_norms``; writes through ``p.data`` are not noticed).
    ``compile_count`` counts captures (one per cache key); ``fallback`` holds the last diagnostic that sent a
    key to the eager step.
    """

    def __init__(self, opt: LAMB, *, eager_step: Callable[[], Any], carry_weight_norms: bool = True) -> None:
        self.opt = opt
        self.eager_step = eager_step
        self.carry_weight_norms = carry_weight_norms
        self.cache = GraphCache(LAMB_ADAM, "LAMB", "lamb_fused", lambda: fused.MAX_GRAPHS, _LIMIT_ADVICE)
        self._lrs: dict[int, Tensor] = {}

    @property
    def compile_count(self) -> int:
        return self.cache.compile_count

    @property
    def fallback(self) -> str | None:
        return self.cache.fallback

    def _lr_tensors(self, plan: _StepPlan) -> list[Tensor]:
        lrs = []
        for group in plan.groups:
            device = group.tensors[0][0].device if group.size else torch.device("cpu")
            lr = self._lrs.get(group.group_index)
            if lr is None or lr.device != device:
                lr = self._lrs[group.group_index] = fused.scalar_input(device)
            fused.set_scalar(lr, self.opt.param_groups[group.group_index]["lr"])
            lrs.append(lr)
        return lrs

    @torch.compiler.disable
    @torch.no_grad()
    def __call__(self) -> None:
        opt = self.opt
        plan = _plan(opt, self.carry_weight_norms, opt.telemetry is not None)
        if plan is None or not any(group.size for group in plan.groups):
            self.eager_step()
            return
        if plan.key not in self.cache:  # a cached key's tensors were checked when it was new
            refuse_parameters_without_data(
                opt.param_groups, opt.state, "LAMB(fused=True)", ", or use fused=False"
            )
        inputs = plan.inputs(self._lr_tensors(plan))
        telemetry = opt.telemetry is not None
        request_for = functools.partial(_request, plan, opt=opt, carry_weight_norms=self.carry_weight_norms,
                                        telemetry=telemetry)
        compiled = self.cache.get(plan.key, _step_function(plan), inputs, request_for)
        if compiled is None or compiled.run is None:
            self.eager_step()
            return
        outputs = compiled(inputs)
        if opt.telemetry is not None:
            fused.record_graph_telemetry(opt.telemetry, opt, compiled.telemetry, outputs)


def inspect_lamb_step(opt: LAMB, *, compile: bool = True) -> InspectReport:
    """``lars_fx.fused.inspect_step`` for ``LAMB``: trace its fused step (gradients must be set), run
    ``LAMB_ADAM``, and report every stage; nothing is stepped (missing Adam state is stood in by zeros)."""
    carry_weight_norms = opt.fused_step.carry_weight_norms if opt.fused_step is not None else True
    telemetry = opt.telemetry is not None
    plan = _plan(opt, carry_weight_norms, telemetry, stand_in_state=True)
    assert plan is not None  # stand-ins for missing state
    if not any(group.size for group in plan.groups):
        raise ValueError("inspect_lamb_step needs gradients: run a backward pass before inspecting the step")
    refuse_parameters_without_data(opt.param_groups, opt.state, "LAMB(fused=True)", ", or use fused=False")
    inputs = plan.inputs([torch.full((), float(g["lr"]), dtype=torch.float64) for g in opt.param_groups])
    request_for = functools.partial(
        _request, plan, opt=opt, carry_weight_norms=carry_weight_norms, telemetry=telemetry
    )
    step = _step_function(plan)
    return inspect_graph(LAMB_ADAM, step, inputs, request_for, tag="inspect_lamb", compile=compile)
