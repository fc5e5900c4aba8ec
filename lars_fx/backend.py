"""Plain ``torch.optim.SGD`` compiled into LARS by a Dynamo backend given the optimizer,
``torch.compile(sgd.step, backend=LarsBackend(sgd, coefficient=...))``, or named,
``torch.compile(sgd.step, backend="lars_fx", options={...})``.

``LarsBackend`` is made from the optimizer and LARS's options (one ``lars_fx.functional.LarsOptions``,
checked once, plus ``lars_filter`` and ``carry_weight_norms``). The name ``"lars_fx"`` is sugar for it: it
finds the SGD in the frame Dynamo is tracing and builds the same object from ``options``. Dynamo hands the
backend the graph of ``torch.optim.SGD.step``: gradients and a tensor lr as placeholders, parameters and
momentum buffers as attributes of the graph module. The backend

1. refuses a graph that writes parameters its SGD does not hold (the step of another optimizer: parameters,
   and later momentum buffers, are compared by identity) and, through a ``lars_fx.LARS`` view of its SGD,
   takes the filter's decisions: which tensors are which parameter (by identity) and which get LARS;
2. lifts the attribute tensors to inputs and traces the graph into the canonical ATen form;
3. runs the ``LARS_SGD`` pipeline (match the SGD update, insert norms, trust ratio, rewrite the momentum
   update, carry the weight norms);
4. compiles the result with Inductor (``compile_with_inductor``); the function it returns to Dynamo feeds
   each run the weight norms the previous run returned (``CarriedNorms``) and hands Dynamo the graph's own
   outputs.

A graph that neither reads gradients nor writes parameters is compiled unchanged; a graph that writes
parameters in a way the passes do not understand, or reads gradients without writing parameters (the update
escaped the graph, e.g. through a graph break), raises the diagnostic: running it as plain SGD would be a
silent wrong answer. A step split over several graphs is fine as long as each parameter's update is inside
one (LARS is per tensor).

Hyperparameters: a tensor lr is a graph input. A float lr, momentum, weight decay or dampening that changes
between steps (a scheduler, or several SGDs with different values) makes Dynamo compile the step once more,
with the float as a 0-d tensor input read with ``.item()``; the passes take it as a tensor
(``fx_canonicalize``), so later values reuse that graph. Dynamo also specialises on whether momentum or
weight decay is 0 and on whether the momentum buffers exist (the first step compiles its own graph, as with
any compiled optimizer). The group's hyperparameters are checked at every run, as ``lars_fx.LARS`` checks
them.

Never plain SGD: the SGD of a ``LarsBackend`` (from when the object is made) and an SGD whose step is traced
for the name refuse to step outside a Dynamo-compiled graph: its ``_init_group``, which ``SGD.step`` calls
before it moves anything, raises there. That is the step Dynamo falls back to when it hits its recompile
limit, cannot trace the step (a sparse gradient) or skips it for good, and the step called without
``torch.compile``. While Dynamo traces torch.optim's wrapper around a step (through a global optimizer step
pre-hook, registered at import and a no-op outside traces), before it traces ``SGD.step`` itself, the
backend it traces for claims its SGD: a ``LarsBackend`` the SGD it was made for, the name the SGDs the
traced frame holds. Dynamo counts the compiled steps of all optimizer objects against one
``recompile_limit`` and past it runs a step without calling any backend: an SGD that would take the last
entry is refused. Dynamo also misses, in its guards, a parameter state ``SGD`` first creates while Dynamo
compiles a later step (a parameter whose first gradient comes late), and would rerun the graph that creates
its momentum buffer: the claim creates the (empty) states of every parameter of a group with momentum before
the first trace with gradients, and a graph about to restart an existing buffer is refused. A backend that
only calls one of these (a wrapper function) is not seen by the claim: the backend claims its SGD again when
it compiles. Sparse and complex gradients and parameters without data (meta device, fake tensors) are
refused as ``lars_fx.LARS`` refuses them.

Sharded (DTensor) parameters (FSDP2, tensor parallelism): Dynamo's graph of ``SGD.step`` is elementwise, so
the backend traces and compiles it over this rank's pieces (``to_local()``), ``reduce_sharded_norms`` sums
the step's local squared norms with one functional all-reduce per sharding process group inside the graph
(see ``lars_fx.sharding``), and the momentum buffers a first step creates are returned as DTensors placed as
Dynamo's graph says. Weight norms are not carried over such parameters, and a gradient placed unlike its
parameter is refused (``lars_fx.LARS`` redistributes it).

LAMB: ``torch.compile(adamw.step, backend=LambBackend(adamw, trust_clip=...))``, or by the name with
``options={"algorithm": "lamb", ...}``, compiles the step of a ``torch.optim.AdamW`` (or of a
``torch.optim.Adam`` without weight decay: Adam's is coupled, LAMB's decoupled) into LAMB with the
``LAMB_ADAM`` pipeline, the filter's decisions by ``lars_fx.LAMB``'s rule (``lamb_filter`` over ``ParamInfo``,
names from the optimizer's ``param_names``). Everything above holds for it (claiming the optimizer, never
plain Adam, lifting, carried norms, the refusals) but sharded parameters, which LAMB refuses. The step is
Adam's per-tensor form (``foreach=False``, the default on the CPU; Dynamo traces it with the step count a
tensor); ``amsgrad``, ``foreach=True``, ``fused=True`` and ``differentiable=True`` are refused.

The parts specific to one optimizer are marked "SGD:" or "Adam:" below, and gathered per optimizer type in
``_KINDS``.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import _compat
from .carried_norms import CarriedNorms
from .functional.options import LambOptions, LarsOptions, check_flag
from .lamb import check_lamb_group, default_lamb_filter
from .optimizer import LARS
from .params import (
    ParamInfo,
    check_filter,
    check_sgd_group,
    default_lars_filter,
    parameter_name,
    refuse_parameters_without_data,
    unsupported_gradient_message,
)
from .passes.fx_canonicalize import canonicalize
from .passes.fx_lamb_spec import LambRequest
from .passes.fx_pipeline import compile_with_inductor, run_pipeline, standalone
from .passes.fx_spec import LarsRequest, LayerwiseRequest, ParamRole, PatternMismatch, SgdUpdate, updates_of
from .passes.pipelines import LAMB_ADAM, LARS_SGD, Pipeline
from .sharding import is_dtensor

__all__ = ["LarsBackend", "LambBackend", "lars_fx_backend", "BACKEND_OPTIONS", "LAMB_BACKEND_OPTIONS"]

log = logging.getLogger("lars_fx.backend")

# The options LarsBackend and backend "lars_fx" take: LARS's (LarsOptions, where their defaults live), the
# filter and the carry of the weight norms; the meanings and defaults of lars_fx.LARS.
BACKEND_OPTIONS: tuple[str, ...] = (*LarsOptions.names(), "lars_filter", "carry_weight_norms")
# The options LambBackend and backend "lars_fx" with options={"algorithm": "lamb", ...} take: LAMB's
# (LambOptions), the filter and the carry; the meanings and defaults of lars_fx.LAMB.
LAMB_BACKEND_OPTIONS: tuple[str, ...] = (*LambOptions.names(), "lamb_filter", "carry_weight_norms")

_compile_count = 0

_HOW_TO_PROCEED = (
    "backend 'lars_fx' does not run a step it cannot rewrite into LARS (it would be plain SGD). Ways "
    "forward: step with lars_fx.LARS(sgd, ...) (eager, or fused=True), which takes every SGD option; a "
    "hyperparameter the graph computes in a way the passes do not read can be kept constant, or lr given "
    "as a tensor (SGD(..., lr=torch.tensor(0.1))); LARS_FX_DUMP=<dir> writes the graphs the passes saw"
)
_HOW_TO_PROCEED_LAMB = (
    "backend 'lars_fx' does not run a step it cannot rewrite into LAMB (it would be plain Adam). Ways "
    "forward: step with lars_fx.LAMB(model.named_parameters(), ...) (eager, or fused=True); capture "
    "Adam's per-tensor step (foreach=False); keep betas and eps constant, or give lr as a tensor "
    "(AdamW(..., lr=torch.tensor(1e-3))); LARS_FX_DUMP=<dir> writes the graphs the passes saw"
)


@dataclass(frozen=True)
class _Decisions:
    """What a backend decides from its optimizer before it reads a graph: ``roles`` (``id(parameter)`` -> its
    group, index and whether it gets the trust ratio) and, for sharded parameters, the request's sharded
    reduction per parameter map (None: no sharded parameter)."""

    roles: dict[int, ParamRole]
    sharded_norms: Callable[[dict[str, ParamRole]], dict[str, Any]] | None = None


class _OptimizerBackend:
    """What ``LarsBackend`` and ``LambBackend`` share: the compile of a graph Dynamo made of (part of) the
    step of ``self.optimizer`` (see the module docstring). A subclass decides the filter's decisions, the
    request its pipeline reads, and what else it refuses."""

    optimizer: Optimizer
    carry_weight_norms: bool
    pipeline: ClassVar[Pipeline]
    how_to_proceed: ClassVar[str]

    def __call__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        *,
        options: dict[str, Any] | None = None,
    ) -> Callable[..., Any]:
        """Compile ``gm``, the graph Dynamo made of (part of) the step of this backend's optimizer."""
        if options:
            named = ", ".join(f"{name}=..." for name in sorted(options))
            cls = type(self).__name__
            raise TypeError(
                f"{cls} takes its options when it is made ({cls}(optimizer, {named})), not through "
                "torch.compile(..., options=...)"
            )
        optimizer = self.optimizer
        decisions = self._decisions()  # checks the group hyperparameters
        _refuse_unsupported_gradients(optimizer)
        refuse_parameters_without_data(optimizer.param_groups, optimizer.state, "backend 'lars_fx'")
        self._refuse_graph(gm)
        roles = decisions.roles

        sharded = _ShardedIO.of(gm, optimizer) if decisions.sharded_norms is not None else None
        gm, lifted = _lift_attributes(gm)
        inputs = [*example_inputs, *lifted]
        # What the graph is traced and compiled with: numbers for Dynamo's symbolic integers (a gradient's
        # storage offset when gradients are views of one buffer, e.g. DDP's gradient_as_bucket_view),
        # pieces of DTensors.
        examples = [_compat.symint_hint(t) for t in inputs] if sharded is None else sharded.examples(inputs)
        canonical = canonicalize(gm, examples)
        names = [n.name for n in canonical.graph.nodes if n.op == "placeholder"]
        by_name = dict(zip(names, inputs, strict=True))
        written = _written_inputs(canonical, by_name)
        _refuse_parameters_of_other_optimizers(optimizer, written)
        params = {name: roles[id(t)] for name, t in by_name.items() if id(t) in roles}
        if not any(id(t) in roles for t in written):
            return _compiled_unchanged(canonical, examples, inputs, lifted, optimizer, sharded)

        request = self._request(params, decisions, sharded is not None)
        canonical = self._rewrite(canonical, request)
        self._refuse_state_of_other_optimizers(canonical, by_name, written)
        checks = _RunChecks(optimizer, self._first_steps(canonical, by_name))
        return _lowered(canonical, examples, lifted, checks, sharded)

    def _rewrite(self, gm: torch.fx.GraphModule, request: LayerwiseRequest) -> torch.fx.GraphModule:
        """The pipeline on the canonical graph; a graph it does not understand raises."""
        global _compile_count
        try:
            gm, _ = run_pipeline(gm, self.pipeline, request, tag=f"backend{_compile_count}")
        except PatternMismatch as error:
            raise PatternMismatch(error.node, error.pattern, f"{error.why}. {self.how_to_proceed}") from None
        finally:
            _compile_count += 1
        return gm

    def _decisions(self) -> _Decisions:
        raise NotImplementedError

    def _request(
        self, params: dict[str, ParamRole], decisions: _Decisions, sharded: bool
    ) -> LayerwiseRequest:
        raise NotImplementedError

    def _refuse_graph(self, gm: torch.fx.GraphModule) -> None:
        """A graph Dynamo made that this backend refuses before tracing it further."""

    def _refuse_state_of_other_optimizers(
        self, gm: torch.fx.GraphModule, tensors: dict[str, Any], written: list[Any]
    ) -> None:
        """A rewritten graph that updates optimizer state this optimizer does not hold."""

    def _first_steps(
        self, gm: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]
    ) -> list[tuple[torch.Tensor, str]]:
        """The parameters whose state the graph creates (see ``_RunChecks``)."""
        return []


class LarsBackend(_OptimizerBackend):
    """A Dynamo backend that compiles the step of one ``torch.optim.SGD`` into LARS:
    ``torch.compile(sgd.step, backend=LarsBackend(sgd, coefficient=0.001))``.

    ``options``: a ``lars_fx.functional.LarsOptions``; keyword options of the same names (``epsilon``,
    ``coefficient``, ``use_clip``, ``unit_trust_on_zero_norm``, ``lr_inside_momentum``) replace its values.
    ``lars_filter`` (``ParamInfo -> bool``, default ``lars_fx.default_lars_filter``) and
    ``carry_weight_norms`` as in ``lars_fx.LARS``. Everything is checked here, once. From now on ``sgd``
    steps only inside a graph compiled by this backend (see the module docstring), and the backend refuses
    to compile the step of any other optimizer.
    """

    def __init__(
        self,
        sgd: SGD,
        *,
        options: LarsOptions | None = None,
        lars_filter: Callable[[ParamInfo], bool] | None = None,
        carry_weight_norms: bool = True,
        **lars_options: Any,
    ) -> None:
        _refuse_unknown_options("LarsBackend", set(lars_options) - set(LarsOptions.names()))
        if type(sgd) is not SGD:  # SGD: the one optimizer whose step the passes rewrite today
            raise TypeError(_not_sgd_message(type(sgd).__name__))
        if options is not None and not isinstance(options, LarsOptions):
            raise TypeError(f"options must be a lars_fx.functional.LarsOptions, got {type(options).__name__}")
        self.sgd = self.optimizer = sgd
        self.options = (options if options is not None else LarsOptions()).replace(**lars_options)
        self.lars_filter: Callable[[ParamInfo], bool] = check_filter(
            "lars_filter", default_lars_filter if lars_filter is None else lars_filter
        )
        self.carry_weight_norms = check_flag("carry_weight_norms", carry_weight_norms)
        _refuse_eager_steps(sgd)

    def __repr__(self) -> str:
        return f"LarsBackend({type(self.sgd).__name__} at {id(self.sgd):#x}, {self.options})"

    pipeline = LARS_SGD
    how_to_proceed = _HOW_TO_PROCEED

    def _decisions(self) -> _Decisions:
        lars = self._lars_view()  # checks the group hyperparameters; gives the filter's decisions
        sharded = functools.partial(_sharded_norms, lars) if lars._has_dtensors else None
        return _Decisions(_roles(lars), sharded)

    def _lars_view(self) -> LARS:
        """A ``lars_fx.LARS`` over the SGD with these options: the filter's decisions, the sharded
        reduction."""
        lars = LARS(self.sgd, lars_filter=self.lars_filter, carry_weight_norms=self.carry_weight_norms)
        lars.options = self.options
        return lars

    def _request(self, params: dict[str, ParamRole], decisions: _Decisions, sharded: bool) -> LarsRequest:
        """SGD: the LARS-over-SGD request."""
        sharded_norms = decisions.sharded_norms
        return LarsRequest(
            params=params,
            options=self.options,
            carry_weight_norms=self.carry_weight_norms and not sharded,
            **(sharded_norms(params) if sharded and sharded_norms is not None else {}),
        )

    def _refuse_state_of_other_optimizers(
        self, gm: torch.fx.GraphModule, tensors: dict[str, Any], written: list[Any]
    ) -> None:
        _refuse_buffers_of_other_optimizers(gm, self.sgd, tensors)

    def _first_steps(
        self, gm: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]
    ) -> list[tuple[torch.Tensor, str]]:
        return _first_steps(gm, self.sgd, tensors)


class LambBackend(_OptimizerBackend):
    """A Dynamo backend that compiles the step of one ``torch.optim.AdamW`` (or ``torch.optim.Adam`` without
    weight decay) into LAMB: ``torch.compile(adamw.step, backend=LambBackend(adamw, trust_clip=1.0))``.

    ``options``: a ``lars_fx.functional.LambOptions``; keyword options of the same names (``trust_clip``)
    replace its values. ``lamb_filter`` (``ParamInfo -> bool``, default ``lars_fx.lamb.default_lamb_filter``:
    every parameter but LayerNorm parameters and biases) chooses the parameters that get the trust ratio and
    weight decay, the others a plain Adam step, as in ``lars_fx.LAMB``; ``carry_weight_norms`` as there.
    lr, betas, eps, weight decay and maximize are the optimizer's param groups'. Everything is checked here,
    once. From now on the optimizer steps only inside a graph compiled by this backend (see the module
    docstring), and the backend refuses to compile the step of any other optimizer.
    """

    pipeline = LAMB_ADAM
    how_to_proceed = _HOW_TO_PROCEED_LAMB

    def __init__(
        self,
        adam: Adam,
        *,
        options: LambOptions | None = None,
        lamb_filter: Callable[[ParamInfo], bool] | None = None,
        carry_weight_norms: bool = True,
        **lamb_options: Any,
    ) -> None:
        unknown = set(lamb_options) - set(LambOptions.names())
        _refuse_unknown_options("LambBackend", unknown, LAMB_BACKEND_OPTIONS)
        if type(adam) not in (Adam, AdamW):  # Adam: the optimizers whose step the LAMB passes rewrite
            raise TypeError(_not_adam_message(type(adam).__name__))
        if options is not None and not isinstance(options, LambOptions):
            raise TypeError(f"options must be a lars_fx.functional.LambOptions, got {type(options).__name__}")
        self.optimizer = adam
        self.options = (options if options is not None else LambOptions()).replace(**lamb_options)
        self.lamb_filter: Callable[[ParamInfo], bool] = check_filter(
            "lamb_filter", default_lamb_filter if lamb_filter is None else lamb_filter
        )
        self.carry_weight_norms = check_flag("carry_weight_norms", carry_weight_norms)
        for group_index, group in enumerate(adam.param_groups):
            _check_adam_group(adam, group_index, group)
        _refuse_eager_steps(adam)

    def __repr__(self) -> str:
        return f"LambBackend({type(self.optimizer).__name__} at {id(self.optimizer):#x}, {self.options})"

    def _decisions(self) -> _Decisions:
        """Adam: the group checks, and ``lars_fx.LAMB``'s filter rule over the optimizer's parameters."""
        adam = self.optimizer
        roles = {}
        for group_index, group in enumerate(adam.param_groups):
            _check_adam_group(adam, group_index, group)
            names = group.get("param_names")
            for index, param in enumerate(group["params"]):
                if is_dtensor(param):
                    raise ValueError(
                        f"backend 'lars_fx' (LAMB) got the sharded (DTensor) parameter "
                        f"{parameter_name(group, group_index, index)}: LAMB does not reduce its norms across "
                        "ranks yet. Compile the step of an SGD into LARS, or keep LAMB to unsharded "
                        "parameters (DDP)"
                    )
                info = ParamInfo(names[index] if names else None, param, group_index, index, "lamb_filter")
                roles[id(param)] = ParamRole(group_index, index, bool(self.lamb_filter(info)))
        return _Decisions(roles)

    def _request(self, params: dict[str, ParamRole], decisions: _Decisions, sharded: bool) -> LambRequest:
        return LambRequest(params=params, options=self.options, carry_weight_norms=self.carry_weight_norms)

    def _refuse_graph(self, gm: torch.fx.GraphModule) -> None:
        """Adam: its foreach form (e.g. ``foreach=None`` on a GPU), which the LAMB passes do not match."""
        for node in gm.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "__name__", "").startswith("_foreach_"):
                raise PatternMismatch(
                    node, "Adam's per-tensor step", "the step Dynamo traced is Adam's foreach form, which "
                    "the LAMB passes do not match: build the optimizer with foreach=False (Inductor fuses "
                    f"the per-tensor loop all the same). {self.how_to_proceed}",
                )

    def _refuse_state_of_other_optimizers(
        self, gm: torch.fx.GraphModule, tensors: dict[str, Any], written: list[Any]
    ) -> None:
        """Adam: a graph that writes Adam state this optimizer does not hold (by identity) steps another
        Adam over the same parameters (e.g. one rebuilt from a checkpoint)."""
        adam = self.optimizer
        own = {id(t) for state in adam.state.values() for t in state.values() if isinstance(t, torch.Tensor)}
        foreign = [t for t in written if id(t) not in own and not _is_parameter(t)]
        if foreign:
            raise ValueError(
                f"backend 'lars_fx' was made for the torch.optim.{type(adam).__name__} at {id(adam):#x}, but "
                f"the graph it is compiling updates {len(foreign)} state tensor(s) this optimizer does not "
                "hold: it is the step of another optimizer over the same parameters (one rebuilt from a "
                "checkpoint?). Make one backend per optimizer: "
                "torch.compile(other.step, backend=LambBackend(other, ...))"
            )


def lars_fx_backend(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """Dynamo backend ``"lars_fx"``: ``LarsBackend(sgd, **options)`` for the ``torch.optim.SGD`` whose step
    Dynamo is tracing (found in the traced frame); with ``options={"algorithm": "lamb", ...}``,
    ``LambBackend(adam, **options)`` for the ``torch.optim.Adam``/``AdamW`` it is tracing.

    ``options``: ``epsilon``, ``coefficient``, ``use_clip``, ``lars_filter`` (``ParamInfo -> bool``),
    ``unit_trust_on_zero_norm``, ``lr_inside_momentum``, ``carry_weight_norms``; the meanings and
    defaults of ``lars_fx.LARS``. For LAMB: ``trust_clip``, ``lamb_filter``, ``carry_weight_norms``, those
    of ``lars_fx.LAMB``.
    """
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"backend 'lars_fx': options must be a dict, got {type(options).__name__}")
    options = dict(options)
    algorithm = options.pop("algorithm", "lars")
    if algorithm == "lamb":
        unknown = set(options) - set(LAMB_BACKEND_OPTIONS)
        _refuse_unknown_options("backend 'lars_fx'", unknown, LAMB_BACKEND_OPTIONS)
        adam = _optimizer_in_traced_frame((Adam, AdamW), _not_adam_message)
        return LambBackend(adam, **options)(gm, example_inputs)
    if algorithm != "lars":
        raise ValueError(
            f"backend 'lars_fx': options['algorithm'] must be 'lars' (the default: an SGD step into LARS) or "
            f"'lamb' (an Adam/AdamW step into LAMB), got {algorithm!r}"
        )
    _refuse_unknown_options("backend 'lars_fx'", set(options) - set(BACKEND_OPTIONS))
    return LarsBackend(_optimizer_in_traced_frame((SGD,), _not_sgd_message), **options)(gm, example_inputs)


def _refuse_unknown_options(who: str, unknown: set[str], valid: tuple[str, ...] = BACKEND_OPTIONS) -> None:
    if unknown:
        raise ValueError(f"{who} got unknown option(s) {sorted(unknown)}; valid options are {sorted(valid)}")


def _not_sgd_message(got: str) -> str:
    return (
        "backend 'lars_fx' compiles the step of a torch.optim.SGD: use "
        "torch.compile(sgd.step, backend=LarsBackend(sgd, ...)) or "
        "torch.compile(sgd.step, backend='lars_fx', options={...}) with "
        f"sgd = torch.optim.SGD(model.named_parameters(), ...); got {got}"
    )


def _not_adam_message(got: str) -> str:
    return (
        "backend 'lars_fx' with options={'algorithm': 'lamb'} compiles the step of a torch.optim.AdamW (or "
        "torch.optim.Adam without weight decay) into LAMB: use torch.compile(adamw.step, "
        "backend=LambBackend(adamw, ...)) or torch.compile(adamw.step, backend='lars_fx', "
        "options={'algorithm': 'lamb', ...}) with adamw = torch.optim.AdamW(model.named_parameters(), ..., "
        f"foreach=False); got {got}"
    )


def _optimizer_in_traced_frame(types: tuple[type[Optimizer], ...], message: Callable[[str], str]) -> Any:
    """The optimizer of one of ``types`` that the frame Dynamo traces holds (how the name finds it)."""
    frame = _compat.traced_frame()
    found = [v for v in (frame.f_locals.values() if frame else ()) if isinstance(v, torch.optim.Optimizer)]
    if len(found) == 1 and type(found[0]) in types:
        return found[0]
    got = ", ".join(type(v).__name__ for v in found) or "no optimizer"
    raise TypeError(message(f"a compiled frame that holds {got}"))


def _roles(lars: LARS) -> dict[int, ParamRole]:
    """``id(parameter)`` -> its group, index and whether it gets LARS."""
    return {
        id(param): ParamRole(group_index, index, lars.lars_mask(group_index)[index])
        for group_index, group in enumerate(lars.param_groups)
        for index, param in enumerate(group["params"])
    }


def _refuse_unsupported_gradients(optimizer: Optimizer) -> None:
    """Sparse and complex gradients and parameters, refused (and named) as ``lars_fx.LARS`` and
    ``lars_fx.LAMB`` refuse them."""
    error = _unsupported_gradient_error(optimizer, _name_as_lars_does)
    if error is not None:
        raise error


def _name_as_lars_does(group: dict[str, Any], group_index: int, index: int) -> str:
    names = group.get("param_names")
    return names[index] if names else f"param_groups[{group_index}]['params'][{index}]"


def _unsupported_gradient_error(
    optimizer: Optimizer, name_of: Callable[[dict[str, Any], int, int], str] = parameter_name
) -> ValueError | None:
    algorithm = _KINDS[type(optimizer)].algorithm
    for group_index, group in enumerate(optimizer.param_groups):
        for index, param in enumerate(group["params"]):
            grad = param.grad
            if grad is not None and (grad.is_sparse or grad.is_complex() or param.is_complex()):
                name = name_of(group, group_index, index)
                return ValueError(unsupported_gradient_message(name, param, grad, algorithm))
    return None


def _written_inputs(gm: torch.fx.GraphModule, tensors: dict[str, Any]) -> list[Any]:
    """The inputs the canonical graph writes (its ``copy_`` into a placeholder)."""
    return [
        tensors[node.args[0].name]
        for node in gm.graph.nodes
        if node.target is torch.ops.aten.copy_.default and node.args[0].op == "placeholder"
    ]


def _refuse_parameters_of_other_optimizers(optimizer: Optimizer, written: list[Any]) -> None:
    """A graph that writes parameters ``optimizer`` does not hold (by identity) steps another optimizer."""
    own = {id(p) for group in optimizer.param_groups for p in group["params"]}
    foreign = [t for t in written if id(t) not in own and _is_parameter(t)]
    if foreign:
        name, backend = type(optimizer).__name__, _KINDS[type(optimizer)].backend
        raise ValueError(
            f"backend 'lars_fx' was made for the torch.optim.{name} at {id(optimizer):#x}, but the graph it "
            f"is compiling writes {len(foreign)} parameter(s) that this {name} does not hold (the first of "
            f"shape {tuple(foreign[0].shape)}): it is the step of another optimizer. Make one backend per "
            f"optimizer: torch.compile(other.step, backend={backend}(other, ...))"
        )


def _refuse_buffers_of_other_optimizers(
    gm: torch.fx.GraphModule, sgd: SGD, tensors: dict[str, Any]
) -> None:
    """SGD: a graph that updates a momentum buffer ``sgd`` does not hold (by identity) steps another SGD
    over the same parameters (e.g. one rebuilt from a checkpoint)."""
    state = sgd.state
    for update in updates_of(gm):
        if not isinstance(update, SgdUpdate) or update.buffer_mul is None:
            continue
        buffer, param = update.buffer_mul.args[0], tensors[update.param.name]
        if not isinstance(buffer, torch.fx.Node) or buffer.op != "placeholder":
            continue
        if tensors[buffer.name] is not state.get(param, {}).get("momentum_buffer"):
            raise ValueError(
                f"backend 'lars_fx' was made for the torch.optim.SGD at {id(sgd):#x}, but the graph it is "
                f"compiling updates a momentum buffer of {_role_name(sgd, update.role)} that this SGD does "
                "not hold: it is the step of another SGD over the same parameters (one rebuilt from a "
                "checkpoint?). Make one backend per optimizer: "
                "torch.compile(other.step, backend=LarsBackend(other, ...))"
            )


def _is_parameter(value: object) -> bool:
    # A parameter some optimizer steps, unlike a buffer a graph may write (e.g. BatchNorm's running stats).
    return isinstance(value, torch.Tensor) and (isinstance(value, torch.nn.Parameter) or value.requires_grad)


def _compiled_unchanged(
    canonical: torch.fx.GraphModule, examples: list[Any], inputs: list[Any], lifted: list[Any],
    optimizer: Optimizer, sharded: _ShardedIO | None,
) -> Callable[..., Any]:
    """A graph that writes no parameter of the optimizer, compiled as it is: refused if it reads their
    gradients."""
    grads = {id(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
    if any(id(t) in grads for t in inputs):
        name, kind = type(optimizer).__name__, _KINDS[type(optimizer)]
        raise PatternMismatch(
            None, f"{name} update", "the graph reads gradients but writes no parameter: the update of the "
            f"parameters happens outside it (a graph break?), where it would run as plain {name}. Try "
            f"{kind.whole_step_hint}, or {kind.eager}",
        )
    log.info("lars-fx backend: graph writes no parameter of the optimizer; compiling it unchanged")
    with standalone():
        compiled = _compat.compile_fx(canonical, examples)
    return _runner(compiled, lifted, _RunChecks(optimizer, []), sharded)


def _lowered(
    canonical: torch.fx.GraphModule, examples: list[Any], lifted: list[Any], checks: _RunChecks,
    sharded: _ShardedIO | None,
) -> Callable[..., Any]:
    """The rewritten graph compiled with Inductor, as the function Dynamo calls."""
    carry = CarriedNorms.of(canonical)
    if carry is None:
        return _runner(compile_with_inductor(canonical, examples), lifted, checks, sharded)
    carried = compile_with_inductor(canonical, examples + carry.inputs(examples))

    def run_carrying(*args: torch.Tensor) -> Any:
        checks()
        flat = [*args, *lifted]
        return carry.keep(flat, carried(*flat, *carry.inputs(flat)))

    return run_carrying


def _runner(
    compiled: Callable[..., Any], lifted: list[Any], checks: _RunChecks, sharded: _ShardedIO | None
) -> Callable[..., Any]:
    if sharded is not None:
        io = sharded

        def run_sharded(*args: Any) -> Any:
            checks()
            return io.outputs(compiled(*io.pieces([*args, *lifted])))

        return run_sharded

    def run(*args: torch.Tensor) -> Any:
        checks()
        return compiled(*args, *lifted)

    return run


def _lift_attributes(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """A copy of ``gm`` with its tensor attributes (parameters, buffers) as trailing placeholders."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # Dynamo keeps using its own graph afterwards
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1:]
    lifted: list[torch.Tensor] = []
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor):
            continue
        anchor = last_placeholder[-1] if last_placeholder else next(iter(graph.nodes))
        inserter = graph.inserting_after(anchor) if last_placeholder else graph.inserting_before(anchor)
        with inserter:
            placeholder = graph.placeholder(node.target.replace(".", "_"))
        placeholder.meta = dict(node.meta)
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
        last_placeholder.append(placeholder)
        lifted.append(value)
    return torch.fx.GraphModule(gm, graph), lifted


# -- never plain SGD (or Adam) ---------------------------------------------------------------------


def _check_adam_group(adam: Optimizer, group_index: int, group: dict[str, Any]) -> None:
    """Adam: the hyperparameters LAMB reads from a param group (checked as ``lars_fx.LAMB`` checks them),
    and the Adam options that are not LAMB or whose step the passes do not match, refused before anything
    moves."""
    prefix = f"param_groups[{group_index}]"
    check_lamb_group(prefix, group)
    refused = {
        "amsgrad": "amsgrad is not LAMB: use amsgrad=False",
        "foreach": "the LAMB passes match Adam's per-tensor step: use foreach=False (Inductor fuses the "
        "per-tensor loop all the same)",
        "fused": "Adam's fused kernel is one opaque op the LAMB passes cannot rewrite: use fused=False",
        "differentiable": "LAMB does not support differentiable=True",
    }
    for key, why in refused.items():
        if group.get(key):
            raise ValueError(f"backend 'lars_fx' (LAMB): {prefix} has {key}=True; {why}")
    decoupled = group.get("decoupled_weight_decay", isinstance(adam, AdamW))
    if not decoupled and group["weight_decay"] != 0:
        raise ValueError(
            f"backend 'lars_fx' (LAMB): {prefix} has weight_decay={group['weight_decay']!r}, but "
            "torch.optim.Adam's weight decay is coupled (added to the gradient before the moments); LAMB's "
            "is decoupled: use torch.optim.AdamW (or Adam(..., decoupled_weight_decay=True)), or "
            "weight_decay=0"
        )


@dataclass(frozen=True)
class _Kind:
    """What differs, in this module, between the optimizer types whose steps the backend rewrites."""

    algorithm: str  # what the step becomes: "LARS", "LAMB"
    backend: str  # the backend class, for errors
    eager: str  # the eager optimizer named in errors as the way forward
    whole_step_hint: str  # how to keep the whole update in one graph
    check_group: Callable[[Optimizer, int, dict[str, Any]], None]
    init_group: Callable[..., Any]  # the type's own _init_group (see _init_group_inside_dynamo)
    create_states: bool  # SGD: see _create_states


_SGD_KIND = _Kind(
    "LARS", "LarsBackend", "lars_fx.LARS(sgd, ...)", "torch.optim.SGD(..., foreach=True)",
    lambda sgd, group_index, group: check_sgd_group(group_index, group), _compat.own_init_group, True,
)
_ADAM_KIND = _Kind(
    "LAMB", "LambBackend", "lars_fx.LAMB(model.named_parameters(), ...)",
    "torch.optim.AdamW(..., foreach=False)", _check_adam_group, _compat.own_init_group, False,
)
_KINDS: dict[type[Optimizer], _Kind] = {SGD: _SGD_KIND, Adam: _ADAM_KIND, AdamW: _ADAM_KIND}

# Optimizers whose step raises even under Dynamo, with the reason (see
# _claim_optimizer_traced_for_this_backend).
_refused: weakref.WeakKeyDictionary[Optimizer, str] = weakref.WeakKeyDictionary()


# Never traced: when Dynamo gives up on the step, it would trace this frame on its own and fold the check
# away.
@torch.compiler.disable
def _init_group_inside_dynamo(
    optimizer_ref: weakref.ref[Optimizer], group: dict[str, Any], *args: Any, **kwargs: Any
) -> Any:
    """``_init_group`` of an SGD (or Adam) compiled for this backend. Its ``step`` calls it for each group
    before it moves anything; Dynamo calls it (for real) while tracing the step and never when the compiled
    step runs. A call outside Dynamo is the step running eagerly, as plain SGD (or Adam)."""
    optimizer = optimizer_ref()
    assert optimizer is not None  # called by the optimizer's own step: it is alive
    if optimizer in _refused:
        raise RuntimeError(_refused[optimizer])
    has_gradients = any(p.grad is not None for p in group["params"])  # without any, the step is a no-op
    if has_gradients and not _compat.dynamo_is_tracing():
        raise _eager_step_error(optimizer)
    return _KINDS[type(optimizer)].init_group(optimizer, group, *args, **kwargs)


def _eager_step_error(optimizer: Optimizer) -> Exception:
    kind, name = _KINDS[type(optimizer)], type(optimizer).__name__
    for group_index, group in enumerate(optimizer.param_groups):
        kind.check_group(optimizer, group_index, group)  # a bad hyperparameter: its own error first
    unsupported = _unsupported_gradient_error(optimizer)
    if unsupported is not None:
        return unsupported  # why Dynamo gave up
    limit = _compat.recompile_limit()
    return RuntimeError(
        f"backend 'lars_fx': this torch.optim.{name}'s step ran outside a graph compiled for the backend, as "
        f"plain {name} (no {kind.algorithm}); stopped before any parameter moved. Either Dynamo fell back to "
        "the eager step: "
        f"it hit torch._dynamo.config.recompile_limit ({limit}; every new set of parameters with gradients "
        "compiles the step again: see Dynamo's 'hit config.recompile_limit' warning), it cannot trace the "
        f"step (TORCH_LOGS=graph_breaks shows why), or it skips {name}.step for good since a step it traced "
        "found no gradient at all (an empty graph); or the step was called without torch.compile. Fixes: "
        "raise torch._dynamo.config.recompile_limit, or give the same parameters gradients at every step; "
        "call torch._dynamo.reset() after a step without gradients; call only the compiled step; or step "
        f"with {kind.eager}, {kind.algorithm} in eager mode"
    )


def _refuse_eager_steps(optimizer: Optimizer) -> None:
    """From now on, ``optimizer``'s step raises unless Dynamo compiled it (see ``_init_group_inside_dynamo``).

    Set on the instance before Dynamo builds the step's guards (when a backend object is made, or while
    Dynamo compiles the step), so they already see it and nothing recompiles."""
    # A weak reference: no cycle keeps a dropped optimizer alive.
    replacement = functools.partial(_init_group_inside_dynamo, weakref.ref(optimizer))
    _compat.override_init_group(optimizer, replacement)


@torch.compiler.assume_constant_result
def _claim_optimizer_traced_for_this_backend() -> bool:
    """Run by Dynamo for real (its result is a constant) while it traces an optimizer's step, through the
    step pre-hook below: if the step is traced for this backend, its SGD (or Adam) refuses eager steps from
    now on. That is before Dynamo traces ``SGD.step`` itself, which it may give up on (a sparse gradient)
    before this backend ever gets a graph."""
    try:
        frame = _compat.traced_frame()
        claimed = _claimed_optimizers(frame) if frame is not None else []
        if frame is None or not claimed:
            return False
        entries = _compat.cache_entry_count(frame.code)
    except Exception:  # a Dynamo without these internals: the backend claims its optimizer when it compiles
        return False
    limit = _compat.recompile_limit()
    for optimizer in claimed:
        _refuse_eager_steps(optimizer)
        if _KINDS[type(optimizer)].create_states:
            _create_states(optimizer)
        if entries + 1 >= limit:
            _refused[optimizer] = _cache_full_message(optimizer, entries, limit)
        else:  # e.g. traced again after torch._dynamo.reset()
            _refused.pop(optimizer, None)
    return False


def _claimed_optimizers(frame: _compat.TracedFrame) -> list[Optimizer]:
    """The optimizers a trace for this backend claims: a backend object's own; for the name, the SGDs,
    Adams and AdamWs the frame holds (torch.optim's step wrapper holds its optimizer in ``*args``)."""
    if isinstance(frame.backend, _OptimizerBackend):
        return [frame.backend.optimizer]
    if frame.backend is not lars_fx_backend:
        return []
    values = frame.f_locals.values()
    return [v for v in (*values, *(v for t in values if type(t) is tuple for v in t)) if type(v) in _KINDS]


def _cache_full_message(optimizer: Optimizer, entries: int, limit: int) -> str:
    # The wrapper torch.optim puts around every step takes the optimizer as *args, so Dynamo counts the
    # compiled steps of all optimizer objects against one recompile_limit (torch 2.13); past it, it runs
    # further steps eagerly without tracing them, and no lars-fx code could see one.
    name = type(optimizer).__name__
    return (
        f"backend 'lars_fx' refuses to compile the step of this torch.optim.{name}: Dynamo keeps the "
        "compiled steps of all optimizer objects of this process in one cache of "
        f"torch._dynamo.config.recompile_limit = {limit} entries ({entries} in use), and this one would take "
        "the last. The step of any optimizer compiled after it would run eagerly without reaching a backend: "
        f"for an {name} compiled for backend 'lars_fx', plain {name} that lars-fx cannot stop. Raise "
        "torch._dynamo.config.recompile_limit (e.g. to 64) before compiling, or call torch._dynamo.reset() "
        "between runs that build new optimizers"
    )


def _step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if torch.compiler.is_compiling():
        _claim_optimizer_traced_for_this_backend()


def _create_states(sgd: Optimizer) -> None:
    """SGD: an (empty) state entry for every parameter of a group with momentum, made before Dynamo first
    traces ``SGD.step`` (when that step has gradients: a step without any leaves the state empty).

    Dynamo does not guard a parameter state that ``SGD._init_group`` creates while Dynamo compiles a
    later step (torch 2.13: a parameter whose first gradient comes late): it would rerun that step's
    graph, which creates the parameter's momentum buffer, once the buffer exists. A state made before
    the first trace it finds and guards. (Adam's graph creates no state: ``Adam._init_group`` makes it
    while Dynamo traces, and the graph reads it.)"""
    params = [p for group in sgd.param_groups if group["momentum"] != 0 for p in group["params"]]
    if any(p.grad is not None for p in params):
        for param in params:
            sgd.state[param]  # a defaultdict: the read makes it


class _RunChecks:
    """What a compiled graph checks before each run, before anything moves.

    The group hyperparameters: those a graph input carries change without a recompile, so they are
    checked as ``lars_fx.LARS`` (or ``lars_fx.LAMB``) checks them. And the parameters whose momentum buffer
    the graph creates (their first step): Dynamo misses, in its guards, a parameter state that
    ``SGD._init_group`` first creates while Dynamo compiles the step (torch 2.13), and would run this graph
    again once the buffer exists, restarting the momentum (``_create_states`` prevents that for an SGD
    claimed before its first trace; this catches the rest).
    """

    def __init__(self, optimizer: Optimizer, first_steps: list[tuple[torch.Tensor, str]]) -> None:
        self.optimizer_ref = weakref.ref(optimizer)
        self.first_steps = first_steps  # SGD

    def __call__(self) -> None:
        optimizer = self.optimizer_ref()
        if optimizer is None:
            return
        check_group = _KINDS[type(optimizer)].check_group
        for group_index, group in enumerate(optimizer.param_groups):
            check_group(optimizer, group_index, group)
        for param, name in self.first_steps:
            if optimizer.state.get(param, {}).get("momentum_buffer") is not None:
                raise RuntimeError(_stale_first_step_message(name))


def _stale_first_step_message(name: str) -> str:
    return (
        f"backend 'lars_fx': Dynamo is about to run the graph it compiled for the first step of parameter "
        f"{name}, which creates its momentum buffer, but that buffer exists now: Dynamo's guards missed that "
        "the parameter's optimizer state changed (a torch bug when SGD first creates a parameter's state "
        "while Dynamo compiles the step, e.g. for a parameter whose first gradient comes after the first "
        "step). Stopped before any parameter moved: the graph would restart its momentum. Fix: create every "
        "parameter's state before the first compiled step (for group in sgd.param_groups: for p in "
        "group['params']: sgd.state[p]) and call torch._dynamo.reset(), or step with lars_fx.LARS(sgd, ...)"
    )


def _first_steps(
    gm: torch.fx.GraphModule, sgd: SGD, tensors: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, str]]:
    """SGD: the parameters whose momentum buffer the rewritten graph creates, with their names."""
    first = [
        u for u in updates_of(gm)
        if isinstance(u, SgdUpdate) and u.new_buffer is not None and u.buffer_mul is None
    ]
    return [(tensors[u.param.name], _role_name(sgd, u.role)) for u in first]


def _role_name(sgd: SGD, role: ParamRole) -> str:
    return parameter_name(sgd.param_groups[role.group_index], role.group_index, role.index_in_group)


# -- sharded (DTensor) parameters ------------------------------------------------------------------


def _sharded_norms(lars: LARS, params: dict[str, ParamRole]) -> dict[str, Any]:
    """The request's sharded reduction (``lars_fx.sharding``): its process groups and each LARS
    placeholder's weight."""
    reduction = lars._norm_reduction
    if reduction is None:
        return {}
    return {
        "norm_process_groups": tuple(group.group_name for group in reduction.groups),
        "norm_weights": {
            name: lars._norm_weights[role.group_index][role.index_in_group]
            for name, role in params.items()
            if role.use_lars
        },
    }


class _ShardedIO:
    """A step over sharded (DTensor) parameters, compiled over this rank's pieces: Dynamo's graph of
    ``SGD.step`` is elementwise, so on the pieces it computes each rank's piece of its result. Inputs are
    turned into their pieces (``to_local()``; Dynamo's integer inputs, e.g. a gradient's storage offset, stay
    numbers), and the new momentum buffers the graph returns into DTensors placed as Dynamo's graph says its
    outputs are."""

    def __init__(self, output_specs: list[Any]) -> None:
        self.output_specs = output_specs

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, sgd: Optimizer) -> _ShardedIO:
        for group_index, group in enumerate(sgd.param_groups):
            for index, param in enumerate(group["params"]):
                grad = param.grad
                if grad is None or not is_dtensor(param):
                    continue
                if tuple(grad.placements) != tuple(param.placements):
                    raise ValueError(
                        f"backend 'lars_fx': the gradient of {parameter_name(group, group_index, index)} "
                        f"is placed {tuple(grad.placements)}, its parameter {tuple(param.placements)}; the "
                        "backend steps pieces laid out alike. Step with lars_fx.LARS(sgd, ...), which "
                        "redistributes the gradient first"
                    )
        output = next(n for n in gm.graph.nodes if n.op == "output")
        values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
        specs = [
            node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None for node in values
        ]
        return cls([value if is_dtensor(value) else None for value in specs])

    @staticmethod
    def examples(inputs: list[Any]) -> list[Any]:
        return [t.to_local() if is_dtensor(t) else _compat.symint_hint(t) for t in inputs]

    @staticmethod
    def pieces(inputs: list[Any]) -> list[Any]:
        return [t.to_local() if is_dtensor(t) else t for t in inputs]

    def outputs(self, outputs: Any) -> Any:
        if not outputs:
            return outputs
        from torch.distributed.tensor import DTensor

        specs = [*self.output_specs, *[None] * (len(outputs) - len(self.output_specs))]
        return type(outputs)(
            DTensor.from_local(out, spec.device_mesh, spec.placements, run_check=False, shape=spec.shape,
                               stride=spec.stride())
            if spec is not None and isinstance(out, torch.Tensor) else out
            for out, spec in zip(outputs, specs, strict=True)
        )


# Registered once, at import (torch.compile imports this module to look the backend up, before any
# trace): registering it later would change the hooks every compiled optimizer step guards on.
register_optimizer_step_pre_hook(_step_pre_hook)
