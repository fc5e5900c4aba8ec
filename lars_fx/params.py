"""What the layer-wise optimizers read from their param groups: parameter names for filters and errors, the
filter's argument, and the checks every mode runs before a number moves."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._compat import is_fake

__all__ = [
    "ParamInfo", "default_lars_filter", "check_filter", "check_sgd_group", "hyperparameter_error",
    "parameter_name", "unsupported_gradient_message", "refuse_parameters_without_data", "filter_decisions",
    "GroupGradients", "group_gradients",
]


@dataclass(frozen=True)
class ParamInfo:
    """What a filter (``lars_filter``, ``lamb_filter``) receives: the parameter's qualified name and the
    tensor.

    Mirrors MindSpore's ``Parameter`` (``.name``), so filters port verbatim. ``filter_name`` names the filter
    in errors.
    """

    _name: str | None
    param: Tensor
    group_index: int
    index_in_group: int
    filter_name: str = "lars_filter"

    @property
    def name(self) -> str:
        if self._name is None:
            raise ValueError(
                f"{self.filter_name} read the name of parameter {self.index_in_group} of param group "
                f"{self.group_index}, but the optimizer has no parameter names. Build it from named "
                "parameters, e.g. torch.optim.SGD(model.named_parameters(), lr=0.1), or give each param "
                "group as {'params': list(module.named_parameters()), ...}; or pass a "
                f"{self.filter_name} that does not read `.name`."
            )
        return self._name


def filter_decisions(
    group: dict[str, Any], group_index: int, keep: Callable[[ParamInfo], bool], filter_name: str
) -> list[bool]:
    """The filter's decision for every parameter of a param group (checking that its ``param_names``
    match)."""
    names = group.get("param_names")
    params = group["params"]
    if names is not None and len(names) != len(params):
        raise ValueError(
            f"param_groups[{group_index}] has {len(params)} params but {len(names)} param_names (a parameter "
            "was added or removed without its name): add or remove the name in group['param_names'] too, or "
            "add parameters with add_param_group"
        )
    return [
        bool(keep(ParamInfo(names[index] if names else None, param, group_index, index, filter_name)))
        for index, param in enumerate(params)
    ]


class GroupGradients(NamedTuple):
    """The parameters of a param group that have gradients this step: themselves, their gradients, the
    filter's decisions and their indices in the group."""

    params: list[Tensor]
    grads: list[Tensor]
    mask: list[bool]
    indices: list[int]


def group_gradients(
    group: dict[str, Any], group_index: int, mask: list[bool], optimizer: str
) -> GroupGradients:
    """The group's parameters with a gradient (see ``GroupGradients``); refuses sparse and complex gradients
    and parameters, naming the parameter (``optimizer`` names the refusing optimizer)."""
    gathered = GroupGradients([], [], [], [])
    for index, (param, decision) in enumerate(zip(group["params"], mask, strict=True)):
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse or grad.is_complex() or param.is_complex():
            name = parameter_name(group, group_index, index)
            raise ValueError(unsupported_gradient_message(name, param, grad, optimizer))
        gathered.params.append(param)
        gathered.grads.append(grad)
        gathered.mask.append(decision)
        gathered.indices.append(index)
    return gathered


def default_lars_filter(p: ParamInfo) -> bool:
    """MindSpore's default: LARS for every parameter but LayerNorm parameters and biases."""
    return "LayerNorm" not in p.name and "bias" not in p.name


def hyperparameter_error(name: str, value: Any, requirement: str) -> ValueError:
    return ValueError(
        f"{name} must be {requirement}, got {value!r}; set it to such a value in the param group "
        "(or fix the scheduler that wrote it)"
    )


def check_sgd_group(group_index: int, group: dict[str, Any]) -> None:
    """The hyperparameters LARS reads from a param group, checked before any number moves.

    Written with plain comparisons (``not value >= 0`` is also true for NaN) so that under
    ``torch.compile`` they trace into guards instead of breaking the graph.
    """
    prefix = f"param_groups[{group_index}]"
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"{prefix}['lr'] must be a number or a one-element tensor, got shape {tuple(lr.shape)}"
            )
        if lr.device.type == "cpu" and not torch.compiler.is_compiling():
            value = lr.item()  # a device tensor is not read back: that would sync every step
            if not (value >= 0 and value != math.inf):
                raise hyperparameter_error(f"{prefix}['lr']", value, "a finite number >= 0")
    elif isinstance(lr, bool) or not (lr >= 0 and lr != math.inf):
        raise hyperparameter_error(f"{prefix}['lr']", lr, "a finite number >= 0")
    for key in ("weight_decay", "momentum", "dampening"):
        value = group.get(key, 0.0)
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"{prefix}[{key!r}] must be a number or a one-element tensor, "
                    f"got shape {tuple(value.shape)}"
                )
            continue
        if isinstance(value, bool) or not (value >= 0 and value != math.inf):
            raise hyperparameter_error(f"{prefix}[{key!r}]", value, "a finite number >= 0")
    if group.get("nesterov", False) and not (group["momentum"] > 0 and group["dampening"] == 0):
        raise ValueError(
            f"{prefix}: nesterov=True needs momentum > 0 and dampening = 0 (as torch.optim.SGD), got "
            f"momentum={group['momentum']!r}, dampening={group['dampening']!r}"
        )
    if group.get("differentiable", False):
        raise ValueError("LARS does not support differentiable=True in the wrapped optimizer")


def check_filter(name: str, value: Any) -> Callable[[ParamInfo], bool]:
    if not callable(value):
        raise TypeError(
            f"{name} must be callable (ParamInfo -> bool), e.g. lambda p: 'bias' not in p.name; "
            f"got {type(value).__name__}"
        )
    return value


def unsupported_gradient_message(name: str, param: Tensor, grad: Tensor, optimizer: str = "LARS") -> str:
    """Why ``optimizer`` refuses a sparse or complex gradient or parameter, and what to do (shared by every
    mode)."""
    if grad.is_sparse:
        return (
            f"{optimizer} got a sparse gradient for {name}; {optimizer} needs dense gradients (the trust "
            "ratio reads the whole tensor): use a dense embedding (sparse=False), or keep that parameter out "
            "of the optimizer"
        )
    return (
        f"{optimizer} got a complex gradient for {name}; {optimizer}'s norms and "
        "trust ratio are defined for real tensors: hold it as a real parameter (torch.view_as_real, or two "
        f"real parameters for its real and imaginary parts), or keep it out of the {optimizer} optimizer"
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
    fixes = {
        "meta": "Materialize the model first (e.g. model.to_empty(device=...) and initialize it) and build "
        "the optimizer from those parameters",
        "fake": "Step the optimizer outside FakeTensorMode",
    }
    for group_index, group in enumerate(param_groups):
        for index, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            buffer = state.get(param, {}).get("momentum_buffer")
            described_tensors = (
                ("the parameter", param), ("its gradient", param.grad), ("its momentum buffer", buffer)
            )
            for what, tensor in described_tensors:
                if tensor is None:
                    continue
                kind = "fake" if is_fake(tensor) else "meta" if tensor.is_meta else None
                if kind is not None:
                    if kind == "fake":
                        described = "a FakeTensor (made under FakeTensorMode)"
                    else:
                        described = "on the meta device"
                    raise ValueError(
                        f"{who} cannot step parameter {parameter_name(group, group_index, index)}: {what} is "
                        f"{described} and holds no data for a compiled kernel to read or write. {fixes[kind]}"
                        f"{fallback}."
                    )
