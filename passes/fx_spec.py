"""What the FX passes share: the request an entry point hands a pipeline, the records the passes leave in the
graph, and the diagnostic raised on graphs the passes do not understand.

The request (``LayerwiseRequest``: which placeholder is which parameter, the algorithm's options) is read-only
and sits in ``gm.meta["lars_fx.request"]`` (``run_pipeline`` puts it there). Everything a pass finds or builds
is recorded in the graph itself, where a reader of a dumped graph looks for it:

* a matcher records each parameter's update on its placeholder, ``placeholder.meta["lars_fx.update"]``
  (a ``LayerUpdate``; ``SgdUpdate`` for ``torch.optim.SGD``'s), and tags writes into gradients
  ``meta["lars_fx.grad_write"]``;
* the norm pass groups updates into ``NormBatch``es (``update.batch``) holding their squared-norm nodes;
* the trust-ratio pass sets ``update.coefficient`` and, with telemetry, lists its extra outputs in
  ``output.meta["lars_fx.telemetry"]``;
* the carry pass tags its new inputs ``meta["lars_fx.carried_batch"]``.

``updates_of``, ``batches_of``, ``telemetry_outputs`` and ``carried_batches`` read them back. Each pass
checks, in ``requires``, that what it reads is there, so a pipeline in the wrong order stops with a
``PatternMismatch`` naming the pass that must run first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from lars_fx.functional import LarsOptions, trust_ratio

__all__ = [
    "FlatSegments", "ParamRole", "LayerwiseRequest", "LarsRequest", "LayerUpdate", "SgdUpdate", "NormBatch",
    "JointParam", "JointStepRequest", "JointUpdate",
    "PatternMismatch", "Hyperparameter", "request_of", "updates_of", "batches_of", "telemetry_outputs",
    "carried_batches", "require_on_updates", "require_parameter_placeholders",
    "REQUEST", "UPDATE", "GRAD_WRITE", "TELEMETRY", "CARRIED_BATCH",
]

REQUEST = "lars_fx.request"
UPDATE = "lars_fx.update"
GRAD_WRITE = "lars_fx.grad_write"
TELEMETRY = "lars_fx.telemetry"
CARRIED_BATCH = "lars_fx.carried_batch"

# A hyperparameter as the graph has it: a number the tracer specialised on, or a 0-d tensor node
# (a tensor lr, or a float that changes between steps; see fx_canonicalize).
Hyperparameter = float | torch.fx.Node


@dataclass(frozen=True)
class FlatSegments:
    """The segments of a flat buffer placeholder (``lars_fx.functional.flat``: each segment one optimizer
    parameter): the placeholders holding its ``Segments.chunks`` and ``Segments.ranges`` tensors, how many
    segments there are and the most chunks one has, and each segment's index in its param group."""

    chunks: str
    ranges: str
    num_segments: int
    max_chunks: int
    indices: tuple[int, ...]


@dataclass(frozen=True)
class ParamRole:
    """Which optimizer parameter a graph placeholder holds, and whether it gets the trust ratio.

    ``segments``: the placeholder is a flat buffer of many parameters (``LARS(flat=True, fused=True)``),
    each a segment with a norm and trust ratio of its own; ``index_in_group`` is then its first
    segment's."""

    group_index: int
    index_in_group: int
    use_lars: bool
    segments: FlatSegments | None = None

    def indices_in_group(self) -> tuple[int, ...]:
        """The parameters' indices in their group: the segments' of a flat buffer, else the one."""
        return self.segments.indices if self.segments is not None else (self.index_in_group,)


@dataclass(frozen=True)
class LayerwiseRequest:
    """What every layer-wise pipeline is told by its entry point.

    ``params`` maps parameter placeholders to their roles (a role with ``segments``: a flat buffer of many
    parameters, whose segment placeholders the role names). ``telemetry`` asks the trust-ratio pass to return
    each batch's norms and ratios as graph outputs. ``carry_weight_norms`` asks for ``||w||^2`` as graph
    inputs and the written weights' as outputs (``fx_carry_weight_norms``), for a caller that feeds one step's
    outputs to the next. Sharded (DTensor) parameters: the graph reads this rank's pieces, and the squared
    norms are summed over the ``norm_process_groups`` (names as ``torch.ops._c10d_functional`` takes them),
    each placeholder's counted with its ``norm_weights`` entry (0.0 where another rank holds the copy that
    counts; see ``lars_fx.sharding``).
    """

    params: Mapping[str, ParamRole]
    telemetry: bool = False
    carry_weight_norms: bool = False
    norm_process_groups: tuple[str, ...] = ()
    norm_weights: Mapping[str, float] = field(default_factory=dict)

    def trust_ratio_call(self, update: LayerUpdate) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
        """The function the trust-ratio pass inserts, ``f(||w||, ||grad||, **kwargs)``, and its keyword
        arguments."""
        raise NotImplementedError(f"{type(self).__name__} names no trust ratio")


@dataclass(frozen=True)
class LarsRequest(LayerwiseRequest):
    """LARS over ``torch.optim.SGD``. ``momentum_inputs`` maps a param group to the placeholder holding its
    momentum as a tensor (so a momentum schedule does not recompile); groups without one keep the constant the
    graph was traced with."""

    options: LarsOptions = field(default_factory=LarsOptions)
    momentum_inputs: Mapping[int, str] = field(default_factory=dict)

    def trust_ratio_call(self, update: LayerUpdate) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
        lr = update.lr if self.options.use_clip else None
        options = self.options.trust_ratio_options()
        return trust_ratio, {"weight_decay": update.weight_decay, "lr": lr, **options}


@dataclass(frozen=True)
class JointParam:
    """How a training program steps one parameter with ``torch.optim.SGD``'s rules: its group's weight decay
    (LARS parameters only), momentum, dampening, nesterov and maximize, and its group's lr as a multiple of
    the program's one lr input."""

    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    lr_scale: float = 1.0


@dataclass(frozen=True)
class JointStepRequest(LarsRequest):
    """LARS over momentum SGD appended to a joint forward-backward graph (``pipelines.LARS_JOINT``, the
    ExecuTorch training program).

    The graph's outputs are the loss, then gradients: ``gradients`` maps each trained parameter's placeholder
    to the index of its gradient among the outputs, ``steps`` to its ``JointParam``. ``lr_input`` names the
    0-d lr placeholder the matcher adds.
    """

    gradients: Mapping[str, int] = field(default_factory=dict)
    steps: Mapping[str, JointParam] = field(default_factory=dict)
    lr_input: str = "lr"


@dataclass(kw_only=True)
class LayerUpdate:
    """One parameter's update as a matcher found it, and what the layer-wise passes add to it.

    ``grad`` is what the trust ratio scales and takes the norm of: LARS's gradient after ``maximize`` (SGD's
    weight decay is added to it after), LAMB's Adam update ``r``. ``weight_decay`` and ``lr`` are
    ``Hyperparameter``s the trust ratio may read. ``batch`` (norm pass) and ``coefficient`` (trust-ratio pass,
    a 0-d tensor node) are filled in by the passes.
    """

    role: ParamRole
    param: torch.fx.Node
    grad: torch.fx.Node
    weight_decay: Hyperparameter
    lr: Hyperparameter
    batch: NormBatch | None = None
    coefficient: torch.fx.Node | None = None


@dataclass(kw_only=True)
class SgdUpdate(LayerUpdate):
    """One parameter's matched ``torch.optim.SGD`` update (see ``fx_match_sgd``).

    ``decayed`` is the gradient after SGD's weight decay (``grad`` itself when ``weight_decay == 0``);
    ``consumers`` are the update's nodes that read it, whose inputs the momentum pass redirects to the
    LARS-scaled gradient. ``direction`` is what SGD subtracts (times lr) from the parameter. ``momentum`` and
    ``dampening`` are ``Hyperparameter``s. ``buffer_mul`` is ``mul(buf, momentum)`` of a step with an existing
    momentum buffer; ``nesterov_add`` is ``add(decayed, new_buf, alpha=momentum)``; ``momentum`` is None on a
    first step without nesterov (the graph never multiplies by it).
    """

    decayed: torch.fx.Node
    new_param: torch.fx.Node
    direction: torch.fx.Node
    consumers: set[torch.fx.Node] = field(default_factory=set)
    momentum: Hyperparameter | None = 0.0
    dampening: Hyperparameter = 0.0
    new_buffer: torch.fx.Node | None = None
    buffer_mul: torch.fx.Node | None = None
    nesterov_add: torch.fx.Node | None = None


@dataclass(kw_only=True)
class JointUpdate(LayerUpdate):
    """One trained parameter of a joint forward-backward graph (see ``fx_match_joint``): ``grad`` is its
    gradient (negated with ``maximize``), ``step`` how SGD steps it. ``momentum_buffer`` is the placeholder of
    its momentum buffer, which ``append_momentum_step`` adds."""

    step: JointParam
    momentum_buffer: torch.fx.Node | None = None


@dataclass(eq=False)
class NormBatch:
    """Trust-ratio parameters whose norms are reduced together: one param group, one device, one compute
    dtype; or one flat buffer (``segments``), whose norms are one per segment. ``reduced_over``: the process
    groups a sharded reduction summed the squared norms over (``fx_reduce_sharded_norms``)."""

    group_index: int
    compute_dtype: torch.dtype
    updates: list[LayerUpdate]
    w_sq_norm: torch.fx.Node | None = None
    g_sq_norm: torch.fx.Node | None = None
    reduced_over: tuple[str, ...] = ()
    segments: FlatSegments | None = None

    def indices_in_group(self) -> list[int]:
        """The batch's parameters' indices in their group, in the order of its norm vectors."""
        return [index for update in self.updates for index in update.role.indices_in_group()]

    def norm_nodes(self) -> tuple[torch.fx.Node, torch.fx.Node]:
        """``(w_sq_norm, g_sq_norm)``, for the passes after ``insert_lars_norms`` (their ``requires`` check it
        ran)."""
        if self.w_sq_norm is None or self.g_sq_norm is None:
            raise PatternMismatch(None, "norm batch", "insert_lars_norms must run first")
        return self.w_sq_norm, self.g_sq_norm


class PatternMismatch(ValueError):
    """A graph the passes do not understand: which node, which pattern, and why."""

    def __init__(self, node: torch.fx.Node | None, pattern: str, why: str) -> None:
        where = f"node {node.name!r} ({node.format_node()})" if node is not None else "the graph"
        super().__init__(f"lars-fx could not match {pattern} at {where}: {why}")
        self.node = node
        self.pattern = pattern
        self.why = why


def request_of(gm: torch.fx.GraphModule, pass_name: str) -> LayerwiseRequest:
    request = gm.meta.get(REQUEST)
    if not isinstance(request, LayerwiseRequest):
        raise ValueError(
            f"{pass_name} needs gm.meta[{REQUEST!r}], the request an entry point hands run_pipeline "
            "(e.g. LarsRequest(params=...))"
        )
    return request


def updates_of(gm: torch.fx.GraphModule) -> list[LayerUpdate]:
    """The updates a matcher recorded, in placeholder order."""
    return [n.meta[UPDATE] for n in gm.graph.nodes if n.op == "placeholder" and UPDATE in n.meta]


def batches_of(gm: torch.fx.GraphModule) -> list[NormBatch]:
    """The norm pass's batches, in the order of their first update."""
    seen: dict[int, NormBatch] = {}
    for update in updates_of(gm):
        if update.batch is not None:
            seen.setdefault(id(update.batch), update.batch)
    return list(seen.values())


def telemetry_outputs(gm: torch.fx.GraphModule) -> list[tuple[int, list[int]]]:
    """Per telemetry batch, ``(group_index, [index_in_group...])``: its ``(||w||, ||g||, ratio)`` outputs come
    after the step's own outputs, three per batch in this order."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return list(output.meta.get(TELEMETRY, []))


def carried_batches(gm: torch.fx.GraphModule) -> list[NormBatch]:
    """The batches whose ``||w||^2`` the carry pass made graph inputs, in input order."""
    return [
        n.meta[CARRIED_BATCH] for n in gm.graph.nodes if n.op == "placeholder" and CARRIED_BATCH in n.meta
    ]


def require_parameter_placeholders(gm: torch.fx.GraphModule, this_pass: str) -> None:
    """A matcher's ``requires``: the request names parameter placeholders of this graph."""
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    roles = request_of(gm, this_pass).params
    named = set(roles)
    for role in roles.values():
        if role.segments is not None:
            named |= {role.segments.chunks, role.segments.ranges}
    unknown = named - placeholders
    if unknown:
        raise PatternMismatch(None, "parameter map", f"no placeholders named {sorted(unknown)}")


def require_on_updates(
    gm: torch.fx.GraphModule, this_pass: str, earlier_pass: str, present: Callable[[LayerUpdate], bool]
) -> None:
    """``requires`` helper: raise unless ``present`` holds for every trust-ratio update (what ``earlier_pass``
    makes), and some update was matched if the request has trust-ratio parameters."""
    request = request_of(gm, this_pass)
    updates = updates_of(gm)
    if any(role.use_lars for role in request.params.values()) and not updates:
        raise PatternMismatch(
            None, "layer-wise update", f"a matcher must run before {this_pass}: no update recorded"
        )
    missing = [u for u in updates if u.role.use_lars and not present(u)]
    if missing:
        raise PatternMismatch(
            missing[0].param, "layer-wise update", f"{earlier_pass} must run before {this_pass}"
        )
