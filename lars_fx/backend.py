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

Use a tensor lr (``SGD(..., lr=torch.tensor(0.1))``) so schedulers do not recompile; with a float lr
Dynamo specialises on its value. Dynamo also specialises on momentum, weight decay and on whether the
momentum buffers exist (the first step compiles its own graph, as with any compiled optimizer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import SGD

from .carried_norms import CarriedNorms
from .optimizer import LARS
from .passes.fx_canonicalize import canonicalize
from .passes.fx_pipeline import compile_with_inductor, run_pipeline
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
    lars = LARS(sgd, **resolved)  # validates the options; gives the filter's decisions
    roles = {
        id(param): ParamRole(group_index, index, lars.lars_mask(group_index)[index])
        for group_index, group in enumerate(sgd.param_groups)
        for index, param in enumerate(group["params"])
    }

    gm, lifted = _lift_attributes(gm)
    inputs = [*example_inputs, *lifted]
    canonical = canonicalize(gm, inputs)
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
        compiled = compile_fx(canonical, inputs)
    else:
        request = LarsRequest(
            params=params,
            coefficient=lars.coefficient,
            epsilon=lars.epsilon,
            use_clip=lars.use_clip,
            unit_trust_on_zero_norm=lars.unit_trust_on_zero_norm,
            lr_inside_momentum=lars.lr_inside_momentum,
            carry_weight_norms=lars.carry_weight_norms,
        )
        try:
            canonical, _ = run_pipeline(canonical, request, tag=f"backend{_compile_count}")
        except PatternMismatch as error:
            raise PatternMismatch(
                error.node, error.pattern, f"{error.why}. backend 'lars_fx' does not run such a step as plain SGD; "
                "use lars_fx.LARS(sgd, ...) (eager) instead"
            ) from None
        finally:
            _compile_count += 1
        carry = CarriedNorms.of(request, canonical)
        if carry is not None:
            carried = compile_with_inductor(canonical, inputs + carry.inputs(inputs))

            def run_carrying(*args: torch.Tensor) -> Any:
                flat = [*args, *lifted]
                return carry.keep(flat, carried(*flat, *carry.inputs(flat)))

            return run_carrying
        compiled = compile_with_inductor(canonical, inputs)

    def run(*args: torch.Tensor) -> Any:
        return compiled(*args, *lifted)

    return run
