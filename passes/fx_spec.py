"""What the FX passes share: the LARS request an entry point attaches to a graph, the matched SGD
updates the match pass records, and the diagnostic raised on graphs the passes do not understand.

The request lives in ``gm.meta["lars_fx"]`` so every pass of ``FX_PIPELINE`` reads and extends one
object; passes run in order and each one's preconditions name what an earlier pass must have put there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

__all__ = ["ParamRole", "LarsRequest", "SgdUpdate", "LarsBatch", "PatternMismatch", "request_of", "Hyperparameter"]

# An SGD hyperparameter as the graph has it: a number the tracer specialised on, or a 0-d tensor node
# (a tensor lr, or a float that changes between steps; see fx_canonicalize).
Hyperparameter = float | torch.fx.Node


@dataclass(frozen=True)
class ParamRole:
    """Which optimizer parameter a graph placeholder holds, and whether it gets LARS."""

    group_index: int
    index_in_group: int
    use_lars: bool


@dataclass
class LarsRequest:
    """The LARS options and the placeholder-to-parameter map an entry point hands the passes.

    ``momentum_inputs`` maps a param group to the placeholder holding its momentum as a tensor (so a
    momentum schedule does not recompile); groups without one keep the constant the graph was traced with.
    ``telemetry`` asks the trust-ratio pass to return each group's norms and ratios as graph outputs.
    ``carry_weight_norms`` asks for ``||w||^2`` as graph inputs and the written weights' as outputs
    (``fx_carry_weight_norms``), for a caller that feeds one step's outputs to the next.
    """

    params: dict[str, ParamRole]
    coefficient: float = 0.001
    epsilon: float = 1e-5
    use_clip: bool = False
    unit_trust_on_zero_norm: bool = False
    lr_inside_momentum: bool = False
    momentum_inputs: dict[int, str] = field(default_factory=dict)
    telemetry: bool = False
    carry_weight_norms: bool = False
    # Sharded (DTensor) parameters: the graph reads this rank's pieces, and the squared norms of the LARS tensors
    # are summed over these process groups (their names, as torch.ops._c10d_functional takes them), each LARS
    # placeholder's counted with its weight (0.0 where another rank holds the copy that counts; see
    # lars_fx.sharding and fx_reduce_sharded_norms). Empty: the norms are the graph's own.
    norm_process_groups: tuple[str, ...] = ()
    norm_weights: dict[str, float] = field(default_factory=dict)
    # Filled in by the passes.
    updates: list[SgdUpdate] = field(default_factory=list)
    batches: list[LarsBatch] = field(default_factory=list)
    telemetry_outputs: list[tuple[int, list[int]]] = field(default_factory=list)
    grad_writes: list[torch.fx.Node] = field(default_factory=list)
    carried_batches: list[LarsBatch] = field(default_factory=list)
    sharded_norms_reduced: bool = False


@dataclass
class SgdUpdate:
    """One parameter's matched ``torch.optim.SGD`` update (see ``fx_match_sgd``).

    ``grad`` is the gradient after ``maximize`` (what SGD adds weight decay to); ``decayed`` the
    gradient after SGD's weight decay (``grad`` itself when ``weight_decay == 0``); ``consumers`` are
    the update's nodes that read it, whose inputs the momentum pass redirects to the LARS-scaled
    gradient. ``direction`` is what SGD subtracts (times lr) from the parameter. ``lr``, ``weight_decay``,
    ``momentum`` and ``dampening`` are ``Hyperparameter``s: a float (specialised by the tracer) or a 0-d
    tensor node (a tensor lr, or a changing float). ``buffer_mul`` is ``mul(buf, momentum)`` of a step with an
    existing momentum buffer; ``nesterov_add`` is ``add(decayed, new_buf, alpha=momentum)``;
    ``momentum`` is None on a first step without nesterov (the graph never multiplies by it).
    """

    role: ParamRole
    param: torch.fx.Node
    grad: torch.fx.Node
    decayed: torch.fx.Node
    weight_decay: Hyperparameter
    lr: Hyperparameter
    new_param: torch.fx.Node
    direction: torch.fx.Node
    consumers: set[torch.fx.Node] = field(default_factory=set)
    momentum: Hyperparameter | None = 0.0
    dampening: Hyperparameter = 0.0
    new_buffer: torch.fx.Node | None = None
    buffer_mul: torch.fx.Node | None = None
    nesterov_add: torch.fx.Node | None = None
    # Filled in by the trust-ratio pass: this parameter's coefficient (a 0-d tensor node).
    coefficient: torch.fx.Node | None = None


@dataclass
class LarsBatch:
    """LARS parameters whose norms are reduced together: one param group, one device, one compute dtype."""

    group_index: int
    compute_dtype: torch.dtype
    updates: list[SgdUpdate]
    w_sq_norm: torch.fx.Node | None = None
    g_sq_norm: torch.fx.Node | None = None


class PatternMismatch(ValueError):
    """A graph the passes do not understand: which node, which pattern, and why."""

    def __init__(self, node: torch.fx.Node | None, pattern: str, why: str) -> None:
        where = f"node {node.name!r} ({node.format_node()})" if node is not None else "the graph"
        super().__init__(f"lars-fx could not match {pattern} at {where}: {why}")
        self.node = node
        self.pattern = pattern
        self.why = why


def request_of(gm: torch.fx.GraphModule, pass_name: str) -> LarsRequest:
    request = gm.meta.get("lars_fx")
    if not isinstance(request, LarsRequest):
        raise ValueError(
            f"{pass_name} needs gm.meta['lars_fx'] = LarsRequest(...), the parameter map an entry point "
            "attaches before running FX_PIPELINE"
        )
    return request
