"""``LARS``: MindSpore's ``nn.LARS`` wrapper as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor
from torch.optim import SGD, Optimizer

from . import functional as F
from . import sharding
from .telemetry import Telemetry

if TYPE_CHECKING:
    from .fused import FusedStep

__all__ = ["LARS", "ParamInfo", "default_lars_filter"]


@dataclass(frozen=True)
class ParamInfo:
    """What ``lars_filter`` receives: the parameter's qualified name and the tensor itself.

    Mirrors MindSpore's ``Parameter`` (``.name``), so filters port verbatim.
    """

    _name: str | None
    param: Tensor
    group_index: int
    index_in_group: int

    @property
    def name(self) -> str:
        if self._name is None:
            raise ValueError(
                f"lars_filter read the name of parameter {self.index_in_group} of param group "
                f"{self.group_index}, but the wrapped optimizer has no parameter names. Build it from "
                "named parameters, e.g. torch.optim.SGD(model.named_parameters(), lr=0.1), or give "
                "each param group as {'params': list(module.named_parameters()), ...}; or pass a "
                "lars_filter that does not read `.name`."
            )
        return self._name


def default_lars_filter(p: ParamInfo) -> bool:
    """MindSpore's default: LARS for every parameter but LayerNorm parameters and biases."""
    return "LayerNorm" not in p.name and "bias" not in p.name


def _check_number(name: str, value: Any, *, minimum: float, strict: bool = False, hint: str = "") -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}{hint}")
    bad = not math.isfinite(value) or value < minimum or (strict and value == minimum)
    if bad:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}{hint}")


def _hyperparameter_error(name: str, value: Any, requirement: str) -> ValueError:
    return ValueError(
        f"{name} must be {requirement}, got {value!r}; set it to such a value in the param group "
        "(or fix the scheduler that wrote it)"
    )


def _check_group(group_index: int, group: dict[str, Any]) -> None:
    """The hyperparameters LARS reads from a param group, checked before any number moves.

    Written with plain comparisons (``not value >= 0`` is also true for NaN) so that under
    ``torch.compile`` they trace into guards instead of breaking the graph.
    """
    prefix = f"param_groups[{group_index}]"
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{prefix}['lr'] must be a number or a one-element tensor, got shape {tuple(lr.shape)}")
        if lr.device.type == "cpu" and not torch.compiler.is_compiling():
            value = lr.item()  # a device tensor is not read back: that would sync every step
            if not (value >= 0 and value != math.inf):
                raise _hyperparameter_error(f"{prefix}['lr']", value, "a finite number >= 0")
    elif isinstance(lr, bool) or not (lr >= 0 and lr != math.inf):
        raise _hyperparameter_error(f"{prefix}['lr']", lr, "a finite number >= 0")
    for key in ("weight_decay", "momentum", "dampening"):
        value = group.get(key, 0.0)
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"{prefix}[{key!r}] must be a number or a one-element tensor, got shape {tuple(value.shape)}")
            continue
        if isinstance(value, bool) or not (value >= 0 and value != math.inf):
            raise _hyperparameter_error(f"{prefix}[{key!r}]", value, "a finite number >= 0")
    if group.get("nesterov", False) and not (group["momentum"] > 0 and group["dampening"] == 0):
        raise ValueError(
            f"{prefix}: nesterov=True needs momentum > 0 and dampening = 0 (as torch.optim.SGD), got "
            f"momentum={group['momentum']!r}, dampening={group['dampening']!r}"
        )
    if group.get("differentiable", False):
        raise ValueError("LARS does not support differentiable=True in the wrapped optimizer")


def _number_option(minimum: float, strict: bool, hint: str) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        _check_number(name, value, minimum=minimum, strict=strict, hint=hint)
        return float(value)

    return check


def _flag_option(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


class _Option:
    """A LARS option: checked when set, and read by every mode at its next step (the fused step's
    cache key includes it, so a change compiles once)."""

    def __init__(self, check: Callable[[str, Any], Any], on_set: Callable[[LARS], None] | None = None) -> None:
        self.check = check
        self.on_set = on_set

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = "_option_" + name

    def __get__(self, obj: LARS | None, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj, self.slot)

    def __set__(self, obj: LARS, value: Any) -> None:
        setattr(obj, self.slot, self.check(self.name, value))
        if self.on_set is not None:
            self.on_set(obj)


def _check_filter(name: str, value: Any) -> Callable[[ParamInfo], bool]:
    if not callable(value):
        raise TypeError(
            f"{name} must be callable (ParamInfo -> bool), e.g. lambda p: 'bias' not in p.name; "
            f"got {type(value).__name__}"
        )
    return value


def unsupported_gradient_message(name: str, param: Tensor, grad: Tensor) -> str:
    """Why LARS refuses a sparse or complex gradient or parameter, and what to do (shared by every mode)."""
    if grad.is_sparse:
        return (
            f"LARS got a sparse gradient for {name}; LARS needs dense gradients (the trust ratio reads the "
            "whole tensor): use a dense embedding (sparse=False), or keep that parameter out of the optimizer"
        )
    return (
        f"LARS got a complex gradient for {name}; LARS's norms and "
        "trust ratio are defined for real tensors: hold it as a real parameter (torch.view_as_real, or two real "
        "parameters for its real and imaginary parts), or keep it out of the LARS optimizer"
    )


def parameter_name(group: dict[str, Any], group_index: int, index: int) -> str:
    """How errors name a parameter: its name and place, or its place alone without ``param_names``."""
    names = group.get("param_names")
    where = f"param_groups[{group_index}]['params'][{index}]"
    return f"{names[index]!r} ({where})" if names else where


def refuse_parameters_without_data(
    param_groups: list[dict[str, Any]], state: dict[Tensor, Any], who: str, fallback: str = ""
) -> None:
    """Raise, naming the parameter, if a parameter with a gradient, the gradient or its momentum buffer has
    no storage (the meta device, a fake tensor): a compiled kernel would fail deep inside Inductor, or run on
    garbage. ``who`` names the compiled mode; ``fallback`` is appended to the fix (e.g. an eager option)."""
    from torch._subclasses.fake_tensor import is_fake

    fixes = {
        "meta": "Materialize the model first (e.g. model.to_empty(device=...) and initialize it) and build the "
        "optimizer from those parameters",
        "fake": "Step the optimizer outside FakeTensorMode",
    }
    for group_index, group in enumerate(param_groups):
        for index, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            buffer = state.get(param, {}).get("momentum_buffer")
            for what, tensor in (("the parameter", param), ("its gradient", param.grad), ("its momentum buffer", buffer)):
                if tensor is None:
                    continue
                kind = "fake" if is_fake(tensor) else "meta" if tensor.is_meta else None
                if kind is not None:
                    described = "a FakeTensor (made under FakeTensorMode)" if kind == "fake" else "on the meta device"
                    raise ValueError(
                        f"{who} cannot step parameter {parameter_name(group, group_index, index)}: {what} is "
                        f"{described} and holds no data for a compiled kernel to read or write. {fixes[kind]}"
                        f"{fallback}."
                    )


def _step_without_global_hooks(inner: Optimizer) -> None:
    """The wrapped optimizer's step without torch's hook wrapper. ``LARS.step`` is the step that hooks
    see: global hooks and LARS's own fire once per step; hooks registered on the wrapped optimizer do
    not fire (over SGD, LARS never calls the wrapped step at all, so both paths agree)."""
    step = type(inner).step
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    step(inner)


@torch.compiler.disable
def _warn_float_lr_under_compile(inner: str) -> None:
    warnings.warn(
        f"torch.compile of LARS.step over {inner} with a float lr: torch recompiles {inner}'s step for every "
        "new lr value until Dynamo's recompile_limit, then runs it eagerly. Give the wrapped optimizer a tensor "
        f"lr, e.g. {inner}(..., lr=torch.tensor(0.001)), to compile it once",
        stacklevel=3,
    )


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling around another optimizer, as MindSpore's ``nn.LARS``.

    For every parameter ``w`` with gradient ``g`` for which ``lars_filter`` is true, the wrapped
    optimizer steps with ``coeff * (g + weight_decay * w)`` in place of ``g``, where
    ``coeff = coefficient * ||w|| / (||g|| + weight_decay * ||w|| + epsilon)`` (clipped to
    ``[0, 1]`` after dividing by the group's lr when ``use_clip``). Other parameters step with
    their plain gradient. LARS takes over the wrapped optimizer's weight decay: the group's
    ``weight_decay`` is applied inside the trust ratio and the wrapped optimizer applies none.

    Args:
        optimizer: the wrapped optimizer, built from named parameters (``model.named_parameters()``)
            so the filter can read names. Over ``torch.optim.SGD`` every SGD option is supported
            (its ``foreach``/``fused`` flags aside: LARS's own ``foreach`` and ``fused`` decide);
            over any other optimizer, the trust-ratio-scaled gradients are fed to its ``step``.
        epsilon: added to the trust ratio's denominator; MindSpore's default.
        coefficient: the trust coefficient (eta).
        use_clip: clip ``coeff / lr`` to ``[0, 1]``, with ``lr`` the group's current learning rate.
        lars_filter: ``ParamInfo -> bool``; True means the parameter gets LARS.
        unit_trust_on_zero_norm: use a trust ratio of 1 where ``||w||`` or ``||g||`` is 0 (timm,
            apex) instead of MindSpore's formula (which gives 0 where ``||w|| = 0``).
        lr_inside_momentum: the paper's momentum form ``v = m*v + lr*u; w = w - v`` instead of
            MindSpore's/torch's ``v = m*v + u; w = w - lr*v``. They differ only when lr changes.
            Requires SGD as the wrapped optimizer.
        skip_nonfinite: skip the whole step (parameters and state untouched) when any gradient
            has an inf or NaN; costs one device-to-host sync per step. By default, as MindSpore,
            non-finite gradients propagate into the parameters. Skipped steps are counted in
            ``skipped_steps``.
        foreach: use the multi-tensor kernels (default); False runs the per-tensor reference.
        fused: capture the step as an FX graph, rewrite it with lars-fx's passes and compile it
            with Inductor (SGD only); same numbers as the eager path.
        carry_weight_norms: with ``fused``, each step also computes the squared norms of the weights
            it writes, in the update's own loop, and the next step uses them instead of reading the
            weights once more (24 instead of 28 bytes per fp32 parameter). Weights written between
            steps are noticed through their version counter (in-place ops, ``load_state_dict``,
            ``copy_``) and the norms recomputed; writes that bypass it (through ``.data``, or from
            outside PyTorch) are not: set this to False when the weights are written that way. Graphs over
            sharded (DTensor) parameters never carry: writes through ``torch._foreach_*_`` on DTensors or
            through ``p.to_local()`` bump no version counter the carry could watch.
        telemetry: record each LARS parameter's ||w||, ||g|| and trust ratio every step, kept on
            the device (no host sync) and read on demand through ``telemetry``.

    The options are attributes of the same names. Assigning one (``opt.coefficient = 0.002``,
    ``opt.lars_filter = ...``) is checked as in the constructor and takes effect at the next step in
    every mode (a fused step compiles once for the new value). The param groups' ``lr``,
    ``weight_decay``, ``momentum`` and ``dampening`` are checked at every step (a tensor lr on a GPU
    only for its shape: reading its value would sync).

    Sharded parameters (DTensors: FSDP2's ``fully_shard``, tensor parallelism, both, HSDP) step in every mode:
    each rank computes its pieces' sums of squares, one all-reduce per sharding mesh dimension sums those of
    the whole step, and the update runs on the local shards (see docs/distributed.md). FSDP1's flat-parameter
    slices are refused (use FSDP2).

    Norms are computed in float32 for float32 and half-precision tensors (float64 for float64), as
    MindSpore's kernel does: a ``||w||`` or ``||g||`` above about 1.8e19 overflows to inf and the
    step writes inf/NaN, like a non-finite gradient.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        epsilon: float = 1e-5,
        coefficient: float = 0.001,
        use_clip: bool = False,
        lars_filter: Callable[[ParamInfo], bool] = default_lars_filter,
        *,
        unit_trust_on_zero_norm: bool = False,
        lr_inside_momentum: bool = False,
        skip_nonfinite: bool = False,
        foreach: bool = True,
        fused: bool = False,
        carry_weight_norms: bool = True,
        telemetry: bool = False,
    ) -> None:
        if isinstance(optimizer, LARS):
            raise TypeError("optimizer is already a lars_fx.LARS; wrap the inner optimizer only once")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer such as "
                f"torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), got {type(optimizer).__name__}"
            )
        self._wraps_sgd = type(optimizer) is SGD
        self.skipped_steps = 0
        self.telemetry: Telemetry | None = Telemetry() if _flag_option("telemetry", telemetry) else None
        self._fused_step: FusedStep | None = None

        # Optimizer.__init__ sets up hooks and registers the groups; afterwards the wrapper and the
        # wrapped optimizer share one list of groups and one state, so schedulers, state_dict and
        # the wrapped optimizer all see the same numbers.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._lars_masks: list[list[bool]] = []
        self._has_dtensors = False
        self._norm_reduction: sharding.NormReduction | None = None
        self._norm_weights: list[list[float]] = []

        self.epsilon = epsilon
        self.coefficient = coefficient
        self.use_clip = use_clip
        self.unit_trust_on_zero_norm = unit_trust_on_zero_norm
        self.lr_inside_momentum = lr_inside_momentum
        self.skip_nonfinite = skip_nonfinite
        self.foreach = foreach
        self.carry_weight_norms = carry_weight_norms
        self.lars_filter = lars_filter  # decides the masks
        self.fused = fused  # creates the fused step here, not in step(), so a torch.compile'd training step sees it

    # -- options: checked when set; every mode reads them at its next step ---------------------

    def _refresh_after_filter_change(self) -> None:
        self._refresh_lars_masks()

    def _check_inner_is_sgd(self) -> None:
        for name in ("fused", "lr_inside_momentum"):
            if getattr(self, "_option_" + name, False) and not self._wraps_sgd:
                raise ValueError(
                    f"{name}=True needs torch.optim.SGD as the wrapped optimizer, got "
                    f"{type(self.optimizer).__name__}; use {name}=False"
                )

    def _fused_changed(self) -> None:
        self._check_inner_is_sgd()
        if not self.fused:
            self._fused_step = None
        elif self._fused_step is None:
            from .fused import FusedStep

            self._fused_step = FusedStep(self)

    epsilon = _Option(_number_option(0.0, True, " (MindSpore's default is 1e-5)"))
    coefficient = _Option(_number_option(0.0, False, " (MindSpore's default is 0.001)"))
    use_clip = _Option(_flag_option)
    unit_trust_on_zero_norm = _Option(_flag_option)
    lr_inside_momentum = _Option(_flag_option, _check_inner_is_sgd)
    skip_nonfinite = _Option(_flag_option)
    foreach = _Option(_flag_option)
    carry_weight_norms = _Option(_flag_option)
    fused = _Option(_flag_option, _fused_changed)
    lars_filter = _Option(_check_filter, _refresh_after_filter_change)

    # -- groups and filter decisions ---------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "optimizer"):  # called by Optimizer.__init__ for the shared groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._refresh_lars_masks()

    def _refresh_lars_masks(self) -> None:
        masks, lars_params, lars_names, places = [], [], [], []
        for group_index, group in enumerate(self.param_groups):
            _check_group(group_index, group)
            names = group.get("param_names")
            if names is not None and len(names) != len(group["params"]):
                raise ValueError(
                    f"param_groups[{group_index}] has {len(group['params'])} params but {len(names)} param_names "
                    "(a parameter was added or removed without its name): add or remove the name in "
                    "group['param_names'] too, or add parameters with add_param_group"
                )
            mask = []
            for index, param in enumerate(group["params"]):
                info = ParamInfo(names[index] if names else None, param, group_index, index)
                mask.append(bool(self.lars_filter(info)))
                sharding.refuse_flat_parameters([param], [parameter_name(group, group_index, index)])
                if mask[-1]:
                    lars_params.append(param)
                    lars_names.append(parameter_name(group, group_index, index))
                    places.append((group_index, index))
            masks.append(mask)
        self._lars_masks = masks
        self._refresh_norm_reduction(lars_params, lars_names, places)

    def _refresh_norm_reduction(
        self, lars_params: list[Tensor], names: list[str], places: list[tuple[int, int]]
    ) -> None:
        """Sharded (DTensor) parameters: how the step reduces their norms (``lars_fx.sharding``), decided here
        once, with each LARS parameter's weight by group and index (read by the step, compiled or not)."""
        self._has_dtensors = any(sharding.is_dtensor(p) for group in self.param_groups for p in group["params"])
        self._norm_reduction = sharding.NormReduction.of(lars_params, names) if self._has_dtensors else None
        self._norm_weights = [[1.0] * len(group["params"]) for group in self.param_groups]
        if self._norm_reduction is not None:
            for (group_index, index), weight in zip(places, self._norm_reduction.weights):
                self._norm_weights[group_index][index] = weight

    def _masks_match_groups(self) -> bool:
        """False when groups or parameters were added to the shared groups behind the wrapper's back."""
        return len(self._lars_masks) == len(self.param_groups) and all(
            len(mask) == len(group["params"]) for mask, group in zip(self._lars_masks, self.param_groups)
        )

    def lars_mask(self, group_index: int) -> list[bool]:
        """Which parameters of ``param_groups[group_index]`` get LARS (the filter's decisions)."""
        return list(self._lars_masks[group_index])

    # -- state ------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults, state and groups; LARS needs its options and the
        # wrapped optimizer too. Hooks are dropped as torch.optim drops them; the fused step's compiled
        # graphs are not copied but made again on the first step of the copy.
        # The sharded norm reduction holds process groups, which do not copy: it is made again too.
        return {
            key: value
            for key, value in self.__dict__.items()
            if key not in ("_fused_step", "_norm_reduction") and not key.startswith("_optimizer_")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fused_step = None
        self._refresh_lars_masks()
        self._fused_changed()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict rebuilt our groups and state; share them again.
        self.optimizer.__setstate__({"state": self.state, "param_groups": self.param_groups})
        self._refresh_lars_masks()

    def __repr__(self) -> str:
        options = (
            f"epsilon={self.epsilon}, coefficient={self.coefficient}, use_clip={self.use_clip}, "
            f"unit_trust_on_zero_norm={self.unit_trust_on_zero_norm}, "
            f"lr_inside_momentum={self.lr_inside_momentum}"
        )
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"LARS({options},\n{inner}\n)"

    # -- the step ---------------------------------------------------------------------------

    def _lars_options(self, group: dict[str, Any]) -> dict[str, Any]:
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() > 0:
            lr = lr.reshape(())  # torch.optim.SGD takes a one-element lr of any shape; the math wants 0-d
        return {
            "weight_decay": group.get("weight_decay", 0.0),
            "coefficient": self.coefficient,
            "epsilon": self.epsilon,
            "use_clip": self.use_clip,
            "lr": lr,
            "unit_trust_on_zero_norm": self.unit_trust_on_zero_norm,
        }

    def _collect(self, group_index: int) -> tuple[list[Tensor], list[Tensor], list[bool]]:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        params, grads, mask = [], [], []
        for index, (param, use_lars) in enumerate(zip(group["params"], self._lars_masks[group_index], strict=True)):
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse or grad.is_complex() or param.is_complex():
                name = names[index] if names else f"param_groups[{group_index}]['params'][{index}]"
                raise ValueError(unsupported_gradient_message(name, param, grad))
            params.append(param)
            grads.append(grad)
            mask.append(use_lars)
        return params, grads, mask

    def _local_group(
        self, group_index: int, params: list[Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """This rank's pieces of ``params`` and of their gradients laid out as them (themselves without DTensors)."""
        if not self._has_dtensors:
            return params, grads
        group = self.param_groups[group_index]
        position = {id(p): i for i, p in enumerate(group["params"])}
        return [sharding.local(p) for p in params], [
            sharding.local_gradient(p, g, parameter_name(group, group_index, position[id(p)]))
            for p, g in zip(params, grads)
        ]

    def _step_norms(
        self,
        collected: list[tuple[list[Tensor], list[Tensor], list[bool]]],
        locals_: list[tuple[list[Tensor], list[Tensor]]],
    ) -> list[tuple[Tensor, Tensor] | None]:
        """``(||w||, ||g||)`` of every group's LARS tensors when they are sharded: local sums of squares of the
        whole step in one vector, one all-reduce per sharding process group (``lars_fx.sharding``). None per group
        without."""
        reduction = self._norm_reduction
        if reduction is None:
            return [None] * len(collected)
        ws, gs, weights, counts = [], [], [], []
        for group_index, ((params, _, mask), (local_params, local_grads)) in enumerate(zip(collected, locals_)):
            group_weights = self._norm_weights[group_index]
            position = {id(p): i for i, p in enumerate(self.param_groups[group_index]["params"])}
            count = 0
            for p, w, g, use_lars in zip(params, local_params, local_grads, mask):
                if use_lars:
                    ws.append(w)
                    gs.append(g)
                    weights.append(group_weights[position[id(p)]])
                    count += 1
            counts.append(count)
        if not ws:
            return [None] * len(collected)
        n = len(ws)
        dtype = functools.reduce(torch.promote_types, [F.compute_dtype(w.dtype) for w in ws])
        device = ws[0].device
        batches: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, w in enumerate(ws):
            batches.setdefault((w.device, F.compute_dtype(w.dtype)), []).append(i)
        squares: list[Tensor] = [ws[0]] * (2 * n)
        for (_, cdtype), positions in batches.items():
            for i, square in zip(positions, sharding.squared_norms([ws[i] for i in positions], cdtype)):
                squares[i] = square
            for i, square in zip(positions, sharding.squared_norms([gs[i] for i in positions], cdtype)):
                squares[n + i] = square
        vector = torch.stack([s.to(device=device, dtype=dtype) for s in squares])
        squared = reduction.reduce(vector, weights + weights)
        norms = squared.sqrt()
        if len(batches) > 1:  # mixed compute dtypes: each norm's sqrt in its own dtype, as the fused graph takes it
            narrow = [F.compute_dtype(w.dtype) != dtype for w in ws] * 2  # float32 beside float64
            if any(narrow):
                mask = torch.tensor(narrow, device=device)
                norms = torch.where(mask, squared.to(torch.float32).sqrt().to(dtype), norms)
        result: list[tuple[Tensor, Tensor] | None] = []
        start = 0
        for count in counts:
            result.append((norms[start : start + count], norms[n + start : n + start + count]) if count else None)
            start += count
        return result

    def _all_finite(self) -> bool:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self._has_dtensors:
            grads = [sharding.local(g) for g in grads]
        if not grads:
            finite = torch.ones(())
        else:
            # The largest magnitude: finite exactly when every element is (a sum could overflow, e.g. in fp16).
            largest = torch._foreach_norm(grads, math.inf)
            finite = torch.stack([s.float().to(largest[0].device) for s in largest]).isfinite().all().float()
        if self._norm_reduction is not None:  # every rank skips, or none: one more (tiny) all-reduce
            finite = self._norm_reduction.all_agree(finite)
        return bool(finite)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._masks_match_groups():
            self._refresh_lars_masks()  # groups or parameters added to the shared groups directly
        else:
            for group_index, group in enumerate(self.param_groups):
                _check_group(group_index, group)
        if self.skip_nonfinite and not self._all_finite():
            self.skipped_steps += 1
            return loss
        if self._fused_step is not None:
            self._fused_step()
        elif self._wraps_sgd:
            self._eager_sgd_step()
        else:
            self._inner_step()
        return loss

    def _eager_sgd_step(self) -> None:
        """The eager LARS-over-SGD step of every group (sharded norms reduced once for all of them)."""
        collected = [self._collect(group_index) for group_index in range(len(self.param_groups))]
        locals_ = [self._local_group(i, params, grads) for i, (params, grads, _) in enumerate(collected)]
        norms = self._step_norms(collected, locals_)
        for group_index in range(len(self.param_groups)):
            self._sgd_group_step(group_index, collected[group_index], locals_[group_index], norms[group_index])

    def _record_telemetry(self, group_index: int, params: list[Tensor], mask: list[bool], norms: F.LarsNorms) -> None:
        if self.telemetry is not None:
            lars_params = [p for p, use_lars in zip(params, mask) if use_lars]
            self.telemetry.record(self, group_index, lars_params, *norms)

    def _lars_updates(
        self,
        group_index: int,
        params: list[Tensor],
        local: tuple[list[Tensor], list[Tensor]],
        mask: list[bool],
        maximize: bool,
        norms: tuple[Tensor, Tensor] | None,
    ) -> list[Tensor]:
        """The LARS-scaled gradients of ``params`` (computed on their ``local`` pieces, with the sharded ``norms``)."""
        options = self._lars_options(self.param_groups[group_index])
        local_params, local_grads = local
        if self.foreach or self.telemetry is not None:
            result = F.lars_gradients_foreach(
                local_params, local_grads, mask, maximize=maximize, norms=norms, **options
            )
            self._record_telemetry(group_index, params, mask, result.norms)
            if self.foreach:
                return result.updates
        given = iter(zip(*norms)) if norms is not None else None
        return [
            F.lars_gradient(p, g, maximize=maximize, norms=next(given) if given is not None else None, **options)
            if use_lars
            else (-g if maximize else g)
            for p, g, use_lars in zip(local_params, local_grads, mask)
        ]

    def _sgd_group_step(
        self,
        group_index: int,
        collected: tuple[list[Tensor], list[Tensor], list[bool]],
        local: tuple[list[Tensor], list[Tensor]],
        norms: tuple[Tensor, Tensor] | None,
    ) -> None:
        """One group's step from ``_collect``, ``_local_group`` and ``_step_norms`` (sharded norms are reduced once
        for all groups)."""
        group = self.param_groups[group_index]
        params, grads, mask = collected
        if not params:
            return
        local_params, local_grads = local
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else [None] * len(params)
        local_buffers = [None if b is None else sharding.local(b) for b in buffers] if self._has_dtensors else buffers
        options = {
            **self._lars_options(group),
            "momentum": momentum,
            "dampening": group["dampening"],
            "nesterov": group["nesterov"],
            "maximize": group["maximize"],
            "lr_inside_momentum": self.lr_inside_momentum,
        }
        if self.foreach:
            new_buffers = list(local_buffers)
            result = F.lars_sgd_foreach(local_params, local_grads, new_buffers, mask, norms=norms, **options)
            self._record_telemetry(group_index, params, mask, result)
        else:
            if self.telemetry is not None:
                lars_options = self._lars_options(group)
                result = F.lars_gradients_foreach(local_params, local_grads, mask, norms=norms, **lars_options)
                self._record_telemetry(group_index, params, mask, result.norms)
            new_buffers = F.lars_sgd_reference(local_params, local_grads, local_buffers, mask, norms=norms, **options)
        if momentum != 0 and not self._has_dtensors:
            for p, buf in zip(params, new_buffers):
                self.state[p]["momentum_buffer"] = buf
        elif momentum != 0:  # DTensor buffers keep their identity (checkpoints hold them): write their pieces
            for p, previous, local_previous, buf in zip(params, buffers, local_buffers, new_buffers):
                if previous is None:
                    self.state[p]["momentum_buffer"] = sharding.wrap_like(p, buf)
                elif buf is not local_previous:
                    local_previous.copy_(buf)

    def _inner_step(self) -> None:
        """Any other optimizer: feed it the scaled gradients with its weight decay switched off."""
        if torch.compiler.is_compiling() and any(not isinstance(g["lr"], Tensor) for g in self.param_groups):
            _warn_float_lr_under_compile(type(self.optimizer).__name__)
        saved_grads: list[tuple[Tensor, Tensor]] = []
        saved_decay: list[tuple[dict, Any]] = []
        collected = [self._collect(group_index) for group_index in range(len(self.param_groups))]
        locals_ = [self._local_group(i, params, grads) for i, (params, grads, _) in enumerate(collected)]
        norms = self._step_norms(collected, locals_)
        try:
            for group_index, group in enumerate(self.param_groups):
                params, grads, mask = collected[group_index]
                if params:
                    maximize = group.get("maximize", False)
                    updates = self._lars_updates(
                        group_index, params, locals_[group_index], mask, maximize, norms[group_index]
                    )
                    for p, g, u in zip(params, grads, updates):
                        saved_grads.append((p, g))
                        u = -u if maximize else u
                        p.grad = sharding.wrap_like(p, u) if self._has_dtensors else u
                if "weight_decay" in group:
                    saved_decay.append((group, group["weight_decay"]))
                    group["weight_decay"] = 0.0
            _step_without_global_hooks(self.optimizer)
        finally:
            for p, g in saved_grads:
                p.grad = g
            for group, decay in saved_decay:
                group["weight_decay"] = decay

