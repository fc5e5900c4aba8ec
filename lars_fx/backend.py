"""``torch.compile(sgd.step, backend="lars_fx", options={...})``: plain SGD compiled into LARS.

Dynamo hands the backend the graph of ``torch.optim.SGD.step``: gradients and a tensor lr as
placeholders, parameters and momentum buffers as attributes of the graph module. The backend

1. finds the optimizer being compiled (the frame Dynamo is tracing) and, through a ``lars_fx.LARS``
   view of it, the filter's decisions: which tensors are which parameter (by identity) and which get LARS;
2. lifts the attribute tensors to inputs and traces the graph into the canonical ATen form;
3. runs ``FX_PIPELINE`` (match the SGD update, insert norms, trust ratio, rewrite the momentum update,
   carry the weight norms);
4. compiles the result with Inductor (``compile_with_inductor``); the function it returns to Dynamo
   feeds each run the weight norms the previous run returned (``CarriedNorms``) and hands Dynamo the
   graph's own outputs.

A graph that neither reads gradients nor writes parameters is compiled unchanged; a graph that writes
parameters in a way the passes do not understand, or reads gradients without writing parameters (the
update escaped the graph, e.g. through a graph break), raises the diagnostic: running it as plain SGD
would be a silent wrong answer. A step split over several graphs is fine as long as each parameter's
update is inside one (LARS is per tensor).

Hyperparameters: a tensor lr is a graph input. A float lr, momentum, weight decay or dampening that
changes between steps (a scheduler, or several SGDs with different values) makes Dynamo compile the
step once more, with the float as a 0-d tensor input read with ``.item()``; the passes take it as a
tensor (``fx_canonicalize``), so later values reuse that graph. Dynamo also specialises on whether
momentum or weight decay is 0 and on whether the momentum buffers exist (the first step compiles its
own graph, as with any compiled optimizer). The group's hyperparameters are checked at every run, as
``lars_fx.LARS`` checks them.

Never plain SGD: an SGD whose step is traced for this backend refuses from then on to step outside a
Dynamo-compiled graph: its ``_init_group``, which ``SGD.step`` calls before it moves anything, raises
there. That is the step Dynamo falls back to when it hits its recompile limit, cannot trace the step (a
sparse gradient) or skips it for good, and the step called without ``torch.compile``. The SGD is
claimed while Dynamo traces torch.optim's wrapper around the step (through a global optimizer step
pre-hook, registered at import and a no-op outside traces), before Dynamo traces ``SGD.step`` itself,
and again when the backend compiles. Dynamo counts the compiled steps of all optimizer objects
against one ``recompile_limit`` and past it runs a step without calling any backend: an SGD that would
take the last entry is refused. Dynamo also misses, in its guards, a parameter state ``SGD`` first
creates while Dynamo compiles a later step (a parameter whose first gradient comes late), and would
rerun the graph that creates its momentum buffer: the claim creates the (empty) states of every
parameter of a group with momentum before the first trace with gradients, and a graph about to
restart an existing buffer is refused. Sparse and complex gradients and parameters without data
(meta device, fake tensors) are refused as ``lars_fx.LARS`` refuses them.

Sharded (DTensor) parameters (FSDP2, tensor parallelism): Dynamo's graph of ``SGD.step`` is elementwise, so the
backend traces and compiles it over this rank's pieces (``to_local()``), ``reduce_sharded_norms`` sums the
step's local squared norms with one functional all-reduce per sharding process group inside the graph (see
``lars_fx.sharding``), and the momentum buffers a first step creates are returned as DTensors placed as Dynamo's
graph says. Weight norms are not carried over such parameters, and a gradient placed unlike its parameter is
refused (``lars_fx.LARS`` redistributes it).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import SGD
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .carried_norms import CarriedNorms
from .optimizer import LARS, _check_group, parameter_name, refuse_parameters_without_data, unsupported_gradient_message
from .sharding import is_dtensor
from .passes.fx_canonicalize import canonicalize
from .passes.fx_pipeline import compile_with_inductor, run_pipeline, standalone
from .passes.fx_spec import LarsRequest, ParamRole, PatternMismatch

__all__ = ["lars_fx_backend", "BACKEND_OPTIONS"]

log = logging.getLogger("lars_fx.backend")

# option -> default; the same names and defaults as lars_fx.LARS.
BACKEND_OPTIONS: dict[str, Any] = {
    "epsilon": 1e-5,
    "coefficient": 0.001,
    "use_clip": False,
    "lars_filter": None,  # None: lars_fx.default_lars_filter
    "unit_trust_on_zero_norm": False,
    "lr_inside_momentum": False,
    "carry_weight_norms": True,
}

_compile_count = 0

_HOW_TO_PROCEED = (
    "backend 'lars_fx' does not run a step it cannot rewrite into LARS (it would be plain SGD). Ways "
    "forward: step with lars_fx.LARS(sgd, ...) (eager, or fused=True), which takes every SGD option; a "
    "hyperparameter the graph computes in a way the passes do not read can be kept constant, or lr given "
    "as a tensor (SGD(..., lr=torch.tensor(0.1))); LARS_FX_DUMP=<dir> writes the graphs the passes saw"
)


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"backend 'lars_fx': options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise ValueError(
            f"backend 'lars_fx' got unknown option(s) {unknown}; valid options are {sorted(BACKEND_OPTIONS)}"
        )
    resolved = {**BACKEND_OPTIONS, **options}
    if resolved["lars_filter"] is None:
        del resolved["lars_filter"]
    return resolved


def _optimizer_being_compiled() -> SGD:
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    frame_values = list(tx.f_locals.values()) if tx is not None else []
    found = [v for v in frame_values if isinstance(v, torch.optim.Optimizer)]
    if len(found) == 1 and type(found[0]) is SGD:
        return found[0]
    got = ", ".join(type(v).__name__ for v in found) or "no optimizer"
    raise TypeError(
        "backend 'lars_fx' compiles the step of a torch.optim.SGD: use "
        "torch.compile(sgd.step, backend='lars_fx', options={...}) with sgd = torch.optim.SGD(model.named_parameters(), ...); "
        f"the compiled frame holds {got}"
    )


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


# SGDs whose step raises even under Dynamo, with the reason (see _claim_sgd_traced_for_this_backend).
_refused: weakref.WeakKeyDictionary[SGD, str] = weakref.WeakKeyDictionary()


def _inside_dynamo() -> bool:
    # is_compiling() while Dynamo runs Python during a trace (torch >= 2.12); the tracing context on older torch.
    return torch.compiler.is_compiling() or torch._guards.TracingContext.try_get() is not None


# Never traced: when Dynamo gives up on the step, it would trace this frame on its own and fold the check away.
@torch.compiler.disable
def _init_group_inside_dynamo(sgd_ref: weakref.ref[SGD], group: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """``SGD._init_group`` of an SGD compiled for this backend. ``SGD.step`` calls it for each group before
    it moves anything; Dynamo calls it (for real) while tracing the step and never when the compiled step
    runs. A call outside Dynamo is the step running eagerly, as plain SGD."""
    sgd = sgd_ref()
    if sgd in _refused:
        raise RuntimeError(_refused[sgd])
    if not _inside_dynamo() and any(p.grad is not None for p in group["params"]):  # without any: a no-op
        raise _eager_step_error(sgd)
    return SGD._init_group(sgd, group, *args, **kwargs)


def _eager_step_error(sgd: SGD) -> Exception:
    for group_index, group in enumerate(sgd.param_groups):
        _check_group(group_index, group)  # a bad hyperparameter: its own error first
        for index, param in enumerate(group["params"]):
            grad = param.grad
            if grad is not None and (grad.is_sparse or grad.is_complex() or param.is_complex()):
                name = parameter_name(group, group_index, index)
                return ValueError(unsupported_gradient_message(name, param, grad))  # why Dynamo gave up
    limit = _recompile_limit()
    return RuntimeError(
        "backend 'lars_fx': this torch.optim.SGD's step ran outside a graph compiled for the backend, as "
        "plain SGD (no LARS); stopped before any parameter moved. Either Dynamo fell back to the eager step: "
        f"it hit torch._dynamo.config.recompile_limit ({limit}; every new set of parameters with gradients "
        "compiles the step again: see Dynamo's 'hit config.recompile_limit' warning), it cannot trace the step "
        "(TORCH_LOGS=graph_breaks shows why), or it skips SGD.step for good since a step it traced found no "
        "gradient at all (an empty graph); or the step was called without torch.compile. Fixes: raise "
        "torch._dynamo.config.recompile_limit, or give the same parameters gradients at every step; call "
        "torch._dynamo.reset() after a step without gradients; call only the compiled step; or step with "
        "lars_fx.LARS(sgd, ...), LARS in eager mode"
    )


def _refuse_eager_steps(sgd: SGD) -> None:
    """From now on, ``sgd``'s step raises unless Dynamo compiled it (see ``_init_group_inside_dynamo``).

    Set on the instance while Dynamo compiles the step: it builds the step's guards afterwards, so they
    already see it and nothing recompiles."""
    if "_init_group" not in vars(sgd):  # a weak reference: no cycle keeps a dropped optimizer alive
        sgd._init_group = functools.partial(_init_group_inside_dynamo, weakref.ref(sgd))


def _unwrapped_backend(backend: object) -> object:
    # WrapBackendDebug -> torch.compile's _TorchCompileWrapper -> [functools.partial ->] the backend
    for _ in range(8):
        inner = next(
            (getattr(backend, a) for a in ("_torchdynamo_orig_backend", "compiler_fn", "func") if hasattr(backend, a)),
            None,
        )
        if inner is None or inner is backend:
            break
        backend = inner
    return backend


@torch.compiler.assume_constant_result
def _claim_sgd_traced_for_this_backend() -> bool:
    """Run by Dynamo for real (its result is a constant) while it traces an optimizer's step, through the
    step pre-hook below: if the step is traced for this backend, its SGD refuses eager steps from now
    on. That is before Dynamo traces ``SGD.step`` itself, which it may give up on (a sparse gradient)
    before this backend ever gets a graph."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        tx = InstructionTranslator.current_tx()
        if tx is None or _unwrapped_backend(tx.output.compiler_fn) is not lars_fx_backend:
            return False
        frame_values = [*tx.f_locals.values(), *(v for t in tx.f_locals.values() if type(t) is tuple for v in t)]
        entries = len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(tx.f_code))
    except Exception:  # a Dynamo without these internals: the backend claims the SGD when it compiles
        return False
    limit = _recompile_limit()
    for value in frame_values:
        if type(value) is SGD:
            _refuse_eager_steps(value)
            _create_states(value)
            if entries + 1 >= limit:
                _refused[value] = _cache_full_message(entries, limit)
            else:  # e.g. traced again after torch._dynamo.reset()
                _refused.pop(value, None)
    return False


def _recompile_limit() -> int:
    config = torch._dynamo.config
    return config.recompile_limit if hasattr(config, "recompile_limit") else config.cache_size_limit  # torch < 2.6


def _cache_full_message(entries: int, limit: int) -> str:
    # The wrapper torch.optim puts around every step takes the optimizer as *args, so Dynamo counts the
    # compiled steps of all optimizer objects against one recompile_limit (torch 2.13); past it, it runs
    # further steps eagerly without tracing them, and no lars-fx code could see one.
    return (
        "backend 'lars_fx' refuses to compile the step of this torch.optim.SGD: Dynamo keeps the compiled "
        f"steps of all optimizer objects of this process in one cache of torch._dynamo.config.recompile_limit "
        f"= {limit} entries ({entries} in use), and this one would take the last. The step of any optimizer "
        "compiled after it would run eagerly without reaching a backend: for an SGD compiled for backend "
        "'lars_fx', plain SGD that lars-fx cannot stop. Raise torch._dynamo.config.recompile_limit (e.g. to 64) "
        "before compiling, or call torch._dynamo.reset() between runs that build new optimizers"
    )


def _step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if torch.compiler.is_compiling():
        _claim_sgd_traced_for_this_backend()


def _create_states(sgd: SGD) -> None:
    """An (empty) state entry for every parameter of a group with momentum, made before Dynamo first
    traces ``SGD.step`` (when that step has gradients: a step without any leaves the state empty).

    Dynamo does not guard a parameter state that ``SGD._init_group`` creates while Dynamo compiles a
    later step (torch 2.13: a parameter whose first gradient comes late): it would rerun that step's
    graph, which creates the parameter's momentum buffer, once the buffer exists. A state made before
    the first trace it finds and guards."""
    params = [p for group in sgd.param_groups if group["momentum"] != 0 for p in group["params"]]
    if any(p.grad is not None for p in params):
        for param in params:
            sgd.state[param]  # a defaultdict: the read makes it


class _RunChecks:
    """What a compiled graph checks before each run, before anything moves.

    The group hyperparameters: those a graph input carries change without a recompile, so they are
    checked as ``lars_fx.LARS`` checks them. And the parameters whose momentum buffer the graph
    creates (their first step): Dynamo misses, in its guards, a parameter state that ``SGD._init_group``
    first creates while Dynamo compiles the step (torch 2.13), and would run this graph again once the
    buffer exists, restarting the momentum (``_create_states`` prevents that for an SGD claimed before
    its first trace; this catches the rest).
    """

    def __init__(self, sgd: SGD, first_steps: list[tuple[torch.Tensor, str]]) -> None:
        self.sgd_ref = weakref.ref(sgd)
        self.first_steps = first_steps

    def __call__(self) -> None:
        sgd = self.sgd_ref()
        if sgd is None:
            return
        for group_index, group in enumerate(sgd.param_groups):
            _check_group(group_index, group)
        for param, name in self.first_steps:
            if sgd.state.get(param, {}).get("momentum_buffer") is not None:
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


def _first_steps(request: LarsRequest, sgd: SGD, tensors: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, str]]:
    """The parameters whose momentum buffer the graph creates, with their names."""
    first = [u for u in request.updates if u.new_buffer is not None and u.buffer_mul is None]
    return [(tensors[u.param.name], _role_name(sgd, u.role)) for u in first]


def _role_name(sgd: SGD, role: ParamRole) -> str:
    return parameter_name(sgd.param_groups[role.group_index], role.group_index, role.index_in_group)


def lars_fx_backend(
    gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], *, options: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """Dynamo backend: rewrite the traced ``torch.optim.SGD`` step into LARS and compile it with Inductor.

    ``options``: ``epsilon``, ``coefficient``, ``use_clip``, ``lars_filter`` (``ParamInfo -> bool``),
    ``unit_trust_on_zero_norm``, ``lr_inside_momentum``, ``carry_weight_norms``; the meanings and
    defaults of ``lars_fx.LARS``.
    """
    from torch._inductor.compile_fx import compile_fx

    global _compile_count
    resolved = _options(options)
    sgd = _optimizer_being_compiled()
    lars = LARS(sgd, **resolved)  # validates the options and hyperparameters; gives the filter's decisions
    _refuse_eager_steps(sgd)
    for group_index in range(len(sgd.param_groups)):
        lars._collect(group_index)  # sparse or complex gradients: refused as LARS refuses them
    refuse_parameters_without_data(sgd.param_groups, sgd.state, "backend 'lars_fx'")
    roles = {
        id(param): ParamRole(group_index, index, lars.lars_mask(group_index)[index])
        for group_index, group in enumerate(sgd.param_groups)
        for index, param in enumerate(group["params"])
    }

    sharded = _ShardedIO.of(gm, sgd) if lars._has_dtensors else None
    gm, lifted = _lift_attributes(gm)
    inputs = [*example_inputs, *lifted]
    # What the graph is traced and compiled with: numbers for Dynamo's symbolic integers (a gradient's storage
    # offset when gradients are views of one buffer, e.g. DDP's gradient_as_bucket_view), pieces of DTensors.
    examples = [_hint(t) for t in inputs] if sharded is None else sharded.examples(inputs)
    canonical = canonicalize(gm, examples)
    placeholders = [n.name for n in canonical.graph.nodes if n.op == "placeholder"]
    params = {name: roles[id(t)] for name, t in zip(placeholders, inputs) if id(t) in roles}
    writes_params = any(
        n.target is torch.ops.aten.copy_.default and n.args[0].name in params for n in canonical.graph.nodes
    )
    grads = {id(p.grad) for group in sgd.param_groups for p in group["params"] if p.grad is not None}
    if not writes_params and any(id(t) in grads for t in inputs):
        raise PatternMismatch(
            None, "SGD update", "the graph reads gradients but writes no parameter: the update of the "
            "parameters happens outside it (a graph break?), where it would run as plain SGD. Try "
            "torch.optim.SGD(..., foreach=True), or lars_fx.LARS(sgd, ...)",
        )
    if not writes_params:
        log.info("lars-fx backend: graph writes no parameter of the optimizer; compiling it unchanged")
        with standalone():
            compiled = compile_fx(canonical, examples)
        checks = _RunChecks(sgd, [])
    else:
        request = LarsRequest(
            params=params,
            coefficient=lars.coefficient,
            epsilon=lars.epsilon,
            use_clip=lars.use_clip,
            unit_trust_on_zero_norm=lars.unit_trust_on_zero_norm,
            lr_inside_momentum=lars.lr_inside_momentum,
            carry_weight_norms=lars.carry_weight_norms and sharded is None,
            **(_sharded_norms(lars, params) if sharded is not None else {}),
        )
        try:
            canonical, _ = run_pipeline(canonical, request, tag=f"backend{_compile_count}")
            if request.norm_process_groups and not request.sharded_norms_reduced:
                raise PatternMismatch(None, "sharded norms", "reduce_sharded_norms is switched off: the norms of "
                                      "sharded parameters would be this rank's pieces'")
        except PatternMismatch as error:
            raise PatternMismatch(error.node, error.pattern, f"{error.why}. {_HOW_TO_PROCEED}") from None
        finally:
            _compile_count += 1
        checks = _RunChecks(sgd, _first_steps(request, sgd, dict(zip(placeholders, inputs))))
        carry = CarriedNorms.of(request, canonical)
        if carry is not None:
            carried = compile_with_inductor(canonical, examples + carry.inputs(examples))

            def run_carrying(*args: torch.Tensor) -> Any:
                checks()
                flat = [*args, *lifted]
                return carry.keep(flat, carried(*flat, *carry.inputs(flat)))

            return run_carrying
        compiled = compile_with_inductor(canonical, examples)

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


def _sharded_norms(lars: LARS, params: dict[str, ParamRole]) -> dict[str, Any]:
    """The request's sharded reduction (``lars_fx.sharding``): process groups and each LARS placeholder's weight."""
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
    """A step over sharded (DTensor) parameters, compiled over this rank's pieces: Dynamo's graph of ``SGD.step`` is
    elementwise, so on the pieces it computes each rank's piece of its result. Inputs are turned into their pieces
    (``to_local()``; Dynamo's integer inputs, e.g. a gradient's storage offset, stay numbers), and the new momentum
    buffers the graph returns into DTensors placed as Dynamo's graph says its outputs are."""

    def __init__(self, output_specs: list[Any]) -> None:
        self.output_specs = output_specs

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, sgd: SGD) -> _ShardedIO:
        for group_index, group in enumerate(sgd.param_groups):
            for index, param in enumerate(group["params"]):
                grad = param.grad
                if grad is not None and is_dtensor(param) and tuple(grad.placements) != tuple(param.placements):
                    raise ValueError(
                        f"backend 'lars_fx': the gradient of {parameter_name(group, group_index, index)} is placed "
                        f"{tuple(grad.placements)}, its parameter {tuple(param.placements)}; the backend steps pieces "
                        "laid out alike. Step with lars_fx.LARS(sgd, ...), which redistributes the gradient first"
                    )
        output = next(n for n in gm.graph.nodes if n.op == "output")
        values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
        specs = [
            node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None for node in values
        ]
        return cls([value if is_dtensor(value) else None for value in specs])

    @staticmethod
    def examples(inputs: list[Any]) -> list[Any]:
        return [t.to_local() if is_dtensor(t) else _hint(t) for t in inputs]

    @staticmethod
    def pieces(inputs: list[Any]) -> list[Any]:
        return [t.to_local() if is_dtensor(t) else t for t in inputs]

    def outputs(self, outputs: Any) -> Any:
        if not outputs:
            return outputs
        from torch.distributed.tensor import DTensor

        return type(outputs)(
            DTensor.from_local(out, spec.device_mesh, spec.placements, run_check=False, shape=spec.shape,
                               stride=spec.stride())
            if spec is not None and isinstance(out, torch.Tensor) else out
            for out, spec in zip(outputs, [*self.output_specs, *[None] * (len(outputs) - len(self.output_specs))])
        )


def _hint(value: Any) -> Any:
    """A symbolic integer Dynamo hands the backend, as its current value (the graph over pieces does not read it)."""
    return value.node.hint if isinstance(value, torch.SymInt) else value


# Registered once, at import (torch.compile imports this module to look the backend up, before any
# trace): registering it later would change the hooks every compiled optimizer step guards on.
register_optimizer_step_pre_hook(_step_pre_hook)
