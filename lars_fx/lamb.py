"""``LAMB``: layer-wise adaptive moments (You et al. 2019) as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from . import sharding
from .functional.options import LambOptions, check_flag
from .params import ParamInfo, filter_decisions, group_gradients, parameter_name
from .telemetry import Telemetry

if TYPE_CHECKING:
    from .fused_lamb import FusedLambStep

__all__ = ["LAMB", "default_lamb_filter", "check_lamb_group"]


def default_lamb_filter(p: ParamInfo) -> bool:
    """MindSpore's default rule: the trust ratio and weight decay for every parameter but LayerNorm
    parameters and biases."""
    return "LayerNorm" not in p.name and "bias" not in p.name


class _GroupTensors(NamedTuple):
    """What one param group's step reads and writes: the parameters with a gradient, in group order."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]
    mask: list[bool]


def _where(prefix: str, key: str) -> str:
    return f"{prefix}[{key!r}]" if prefix else key


def _check_value(name: str, value: Any, low: float, high: float, requirement: str, fix: str) -> None:
    """``low <= value < high``, in plain comparisons (``not x >= 0`` is also true for NaN) that trace into
    guards under ``torch.compile``; a tensor's value is read only on the CPU, outside compile."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            shape = tuple(value.shape)
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {shape}")
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return  # reading a device tensor back would sync every step
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}; {fix}")
    if not (value >= low and value < high):
        raise ValueError(f"{name} must be {requirement}, got {value!r}; {fix}")


def check_lamb_group(prefix: str, hyper: dict[str, Any]) -> None:
    """The hyperparameters LAMB reads from a param group (or the constructor's defaults, ``prefix`` empty)."""
    fix = "set it to such a value in the param group (or fix the scheduler that wrote it)" if prefix else (
        "pass such a value")
    finite = "a finite number >= 0"
    _check_value(_where(prefix, "lr"), hyper["lr"], 0.0, math.inf, finite, fix)
    betas = hyper["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{_where(prefix, 'betas')} must be a pair (beta1, beta2), got {betas!r}; {fix}")
    for index, beta in enumerate(betas):
        _check_value(f"{_where(prefix, 'betas')}[{index}]", beta, 0.0, 1.0, "a number in [0, 1)", fix)
    _check_value(_where(prefix, "eps"), hyper["eps"], 0.0, math.inf, finite, fix)
    _check_value(_where(prefix, "weight_decay"), hyper["weight_decay"], 0.0, math.inf, finite, fix)
    if not isinstance(hyper["maximize"], bool):
        raise TypeError(f"{_where(prefix, 'maximize')} must be True or False, got {hyper['maximize']!r}")


def _check_filter(value: Any) -> Callable[[ParamInfo], bool]:
    if not callable(value):
        raise TypeError(
            "lamb_filter must be callable (ParamInfo -> bool), e.g. lambda p: 'bias' not in p.name; "
            f"got {type(value).__name__}"
        )
    return value


class LAMB(Optimizer):
    """LAMB (You et al. 2019, Algorithm 2 with bias correction, as ``optax.lamb``): Adam's direction, with
    weight decay, scaled per parameter by the trust ratio ``||w|| / ||r||``.

    For a parameter ``w`` with gradient ``g`` at its step ``t``::

        m = beta1 m + (1 - beta1) g,         v = beta2 v + (1 - beta2) g^2
        r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay w
        ratio = ||w|| / ||r||   (1 where ||w|| = 0 or ||r|| = 0; at most trust_clip)
        w = w - lr ratio r

    Parameters that ``lamb_filter`` rejects take a plain Adam step: no weight decay, ratio 1.

    Args:
        params: as ``torch.optim`` takes them; normally ``model.named_parameters()`` (or groups of
            ``(name, param)`` pairs) so that the filter can read names.
        lr, betas, eps, weight_decay, maximize: the defaults of the param groups' hyperparameters, read from
            the groups (and checked) at every step, as ``torch.optim.Adam``'s; ``lr`` may be a tensor.
        lamb_filter: ``ParamInfo -> bool``; True means the parameter gets the trust ratio and weight decay.
            By default every parameter but LayerNorm parameters and biases (MindSpore's rule).
        trust_clip: clip the trust ratio to at most this (timm's "LAMBC" uses 1.0); None: no clip.
        foreach: use the multi-tensor kernels (default); False runs the per-tensor reference.
        fused: capture ``torch.optim.AdamW``'s step as an FX graph, rewrite it into LAMB with the
            ``pipelines.LAMB_ADAM`` passes and compile it with Inductor (``lars_fx.fused_lamb``); same numbers
            as the eager step, which runs a parameter's first step.
        carry_weight_norms: with ``fused``, each step hands ``||w'||^2`` of the weights it writes to the next,
            which then reads ``w`` once (weights written between steps are noticed through their version
            counter; writes through ``.data`` are not: set this to False when the weights are written that
            way).
        telemetry: record each filtered parameter's ``||w||``, ``||r||`` and trust ratio every step, on the
            device, read through ``telemetry`` (a ``lars_fx.telemetry.Telemetry``; its ``g_norm`` column holds
            ``||r||``, the norm of the update the ratio divides by).

    The state is ``torch.optim.Adam``'s (``step`` a 0-d float32 tensor, ``exp_avg``, ``exp_avg_sq`` in the
    parameter's dtype), so a state dict moves between the two. ``trust_clip``, ``lamb_filter`` and ``foreach``
    are attributes: assigning one is checked as in the constructor and takes effect at the next step. Norms
    and trust ratios of half-precision parameters are computed in float32, the bias corrections in float64.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        lamb_filter: Callable[[ParamInfo], bool] = default_lamb_filter,
        trust_clip: float | None = None,
        maximize: bool = False,
        foreach: bool = True,
        fused: bool = False,
        carry_weight_norms: bool = True,
        telemetry: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        check_lamb_group("", defaults)
        self.options = LambOptions(trust_clip=trust_clip)
        self.foreach = foreach
        self.telemetry: Telemetry | None = Telemetry() if check_flag("telemetry", telemetry) else None
        self._lamb_filter = _check_filter(lamb_filter)
        self._masks: list[list[bool]] = []
        self._fused_step: FusedLambStep | None = None
        super().__init__(params, defaults)
        self._carry_weight_norms = check_flag("carry_weight_norms", carry_weight_norms)
        self.fused = fused

    # -- options: checked when set, read at the next step -------------------------------------

    @property
    def trust_clip(self) -> float | None:
        return self.options.trust_clip

    @trust_clip.setter
    def trust_clip(self, value: float | None) -> None:
        self.options = self.options.replace(trust_clip=value)

    @property
    def foreach(self) -> bool:
        return self._foreach

    @foreach.setter
    def foreach(self, value: bool) -> None:
        self._foreach = check_flag("foreach", value)

    @property
    def fused(self) -> bool:
        return self._fused_step is not None

    @fused.setter
    def fused(self, value: bool) -> None:
        if not check_flag("fused", value):
            self._fused_step = None
        elif self._fused_step is None:
            from .fused_lamb import FusedLambStep

            self._fused_step = FusedLambStep(
                self, eager_step=self._eager_step, carry_weight_norms=self._carry_weight_norms
            )

    @property
    def fused_step(self) -> FusedLambStep | None:
        """With ``fused=True``, the compiled step (its ``compile_count`` and ``fallback``); None otherwise."""
        return self._fused_step

    @property
    def lamb_filter(self) -> Callable[[ParamInfo], bool]:
        return self._lamb_filter

    @lamb_filter.setter
    def lamb_filter(self, value: Callable[[ParamInfo], bool]) -> None:
        self._lamb_filter = _check_filter(value)
        self._refresh_masks()

    # -- groups and filter decisions ---------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._refresh_masks()

    def _refresh_masks(self) -> None:
        masks = []
        for group_index, group in enumerate(self.param_groups):
            check_lamb_group(f"param_groups[{group_index}]", group)
            for index, param in enumerate(group["params"]):
                if sharding.is_dtensor(param):
                    raise ValueError(
                        "LAMB got the sharded (DTensor) parameter "
                        f"{parameter_name(group, group_index, index)}: its trust ratio needs the norms of "
                        "the whole tensor, which LAMB does not reduce across ranks yet (lars_fx.LARS does). "
                        "Step it with LARS, or keep LAMB to unsharded parameters (DDP)"
                    )
            masks.append(filter_decisions(group, group_index, self._lamb_filter, "lamb_filter"))
        self._masks = masks

    def _masks_match_groups(self) -> bool:
        """False when groups or parameters were added to ``param_groups`` directly."""
        return len(self._masks) == len(self.param_groups) and all(
            len(mask) == len(group["params"])
            for mask, group in zip(self._masks, self.param_groups, strict=True)
        )

    def lamb_mask(self, group_index: int) -> list[bool]:
        """Which parameters of ``param_groups[group_index]`` get the trust ratio (the filter's decisions)."""
        return list(self._masks[group_index])

    # -- state ------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults, state and groups; LAMB needs its options too. Hooks are
        # dropped, as torch.optim drops them.
        # The fused step's compiled graphs are not copied but made again on the first step of the copy.
        state = {key: value for key, value in self.__dict__.items() if not key.startswith("_optimizer_")}
        state["_fused_step"] = self._fused_step is not None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        fused = state.pop("_fused_step", False)
        super().__setstate__(state)
        self._fused_step = None
        self.fused = bool(fused)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._refresh_masks()

    # -- the step ---------------------------------------------------------------------------

    def _collect(self, group_index: int) -> tuple[list[Tensor], list[Tensor], list[bool]]:
        """The group's parameters with a gradient, their gradients and filter decisions."""
        group = self.param_groups[group_index]
        params, grads, mask, _ = group_gradients(group, group_index, self._masks[group_index], "LAMB")
        return params, grads, mask

    def _group_tensors(self, params: list[Tensor], grads: list[Tensor], mask: list[bool]) -> _GroupTensors:
        """One group's tensors (``torch.optim.Adam``'s state, made on a parameter's first step)."""
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        return _GroupTensors(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], mask,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._masks_match_groups():
            self._refresh_masks()  # checks the groups too
        else:
            for group_index, group in enumerate(self.param_groups):
                check_lamb_group(f"param_groups[{group_index}]", group)
        if self._fused_step is not None:
            self._fused_step()
        else:
            self._eager_step()
        return loss

    def _eager_step(self) -> None:
        collected = [self._collect(group_index) for group_index in range(len(self.param_groups))]
        for group_index, (params, grads, mask) in enumerate(collected):
            if params:
                tensors = self._group_tensors(params, grads, mask)
                norms = self._group_step(self.param_groups[group_index], tensors)
                if self.telemetry is not None:
                    filtered = [p for p, use_lamb in zip(params, mask, strict=True) if use_lamb]
                    self.telemetry.record(self, group_index, filtered, *norms)

    def _group_step(self, group: dict[str, Any], tensors: _GroupTensors) -> F.LarsNorms:
        """One functional call for one group: ``lamb_foreach`` or ``lamb_reference``."""
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() > 0:
            lr = lr.reshape(())  # torch.optim takes a one-element lr of any shape; the math wants 0-d
        beta1, beta2 = group["betas"]
        entry = F.lamb_foreach if self.foreach else F.lamb_reference
        return entry(
            *tensors, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            trust_clip=self.trust_clip, maximize=group["maximize"],
        )
