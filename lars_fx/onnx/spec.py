"""``LarsSpec``: what the ONNX export takes from a ``lars_fx.LARS``, by parameter name.

The training graph gets the per-parameter decisions (filter, weight decay, group lr ratio), the
optimizer graph the momentum, the checkpoint the learning rate and velocities. This module checks
that the optimizer can be expressed exactly on ONNX Runtime's training runtime and raises otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from lars_fx.functional import LarsOptions
from lars_fx.optimizer import LARS
from lars_fx.passes.onnx_lars_gradients import GradientRule

__all__ = ["LarsSpec", "ParamSpec"]


@dataclass(frozen=True)
class ParamSpec:
    """One trainable parameter: LARS or plain gradient, its group's weight decay, dampening,
    maximize, and its group's lr as a multiple of ``LarsSpec.lr`` (ORT has one learning rate)."""

    lars: bool
    weight_decay: float = 0.0
    lr_scale: float = 1.0
    dampening: float = 0.0
    maximize: bool = False


@dataclass(frozen=True)
class LarsSpec:
    """LARS over momentum SGD for ONNX Runtime: hyperparameters, per-parameter decisions, velocities.

    ``momentum_buffers`` are torch's ``momentum_buffer`` tensors by name (empty before the first step);
    the checkpoint holds them multiplied by the parameter's ``lr_scale``.
    """

    lr: float
    momentum: float
    params: Mapping[str, ParamSpec]
    options: LarsOptions = field(default_factory=LarsOptions)
    momentum_buffers: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _refuse_options(self.options)
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(
                f"momentum must be in [0, 1) for the ONNX export, got {self.momentum}: ORT's optimizer node "
                "computes m1 = m*m1 + (1-m)*g, which cannot express m >= 1"
            )
        if not self.params:
            raise ValueError("params is empty: the LARS optimizer has no trainable parameter to export")
        for name, param in self.params.items():
            if param.dampening != 0 and self.momentum != 0 and name not in self.momentum_buffers:
                raise ValueError(
                    f"dampening={param.dampening} can be exported only with momentum buffers (after the "
                    f"first optimizer step), and {name!r} has none: ORT's momentum starts from zero, so its "
                    "first step would give (1 - dampening) * u where torch gives u. Export after a step or "
                    "use dampening=0"
                )
        if unknown := sorted(set(self.momentum_buffers) - set(self.params)):
            raise ValueError(f"momentum_buffers has entries for unknown parameters {unknown}")

    def gradient_rules(self) -> dict[str, GradientRule]:
        """The training graph's rule per parameter: ``g' = lr_scale * (1-d)/(1-m) * u``."""
        rules = {}
        for name, param in self.params.items():
            scale = param.lr_scale
            if self.momentum != 0:
                scale *= (1.0 - param.dampening) / (1.0 - self.momentum)
            rules[name] = GradientRule(param.lars, param.weight_decay, scale, param.maximize)
        return rules

    def first_order_moments(self) -> dict[str, np.ndarray]:
        """The optimizer node's ``m1`` per parameter: velocity times the group's lr ratio."""
        return {
            name: (buffer * np.float32(self.params[name].lr_scale)).astype(np.float32)
            for name, buffer in self.momentum_buffers.items()
        }

    @classmethod
    def from_optimizer(cls, optimizer: LARS, model: torch.nn.Module | None = None) -> LarsSpec:
        """Read a ``lars_fx.LARS`` over ``torch.optim.SGD``; names come from ``model.named_parameters()``
        when ``model`` is given (they are the ONNX initializer names), else from the groups' ``param_names``.

        Raises ValueError/TypeError for what ONNX Runtime cannot run exactly.
        """
        if not isinstance(optimizer, LARS):
            raise TypeError(
                f"optimizer must be a lars_fx.LARS, got {type(optimizer).__name__}; for plain SGD or AdamW "
                "use onnxruntime.training.artifacts.generate_artifacts directly"
            )
        if type(optimizer.optimizer) is not torch.optim.SGD:
            raise ValueError(
                "the ONNX export supports LARS over torch.optim.SGD only, got "
                f"{type(optimizer.optimizer).__name__}; "
                "wrap torch.optim.SGD(model.named_parameters(), lr=..., momentum=...)"
            )
        _refuse_options(optimizer.options)
        _refuse(
            optimizer.skip_nonfinite,
            "skip_nonfinite=True",
            "ONNX Runtime's Optimizer.step cannot skip a step from inside its graph. Use "
            "skip_nonfinite=False and check the loss on the device",
        )

        names = _parameter_names(optimizer, model)
        groups = optimizer.param_groups
        momenta = {float(g["momentum"]) for g in groups}
        if len(momenta) != 1:
            raise ValueError(
                f"param groups have different momentum values {sorted(momenta)}; ONNX Runtime's optimizer "
                "node has one momentum for all parameters. Use one momentum"
            )
        momentum = momenta.pop()
        if any(g["nesterov"] for g in groups):
            raise ValueError(
                "nesterov=True cannot be exported: ONNX Runtime's optimizer steps by its first moment, while "
                "Nesterov steps by u + m*v, which needs the previous step's update. Use nesterov=False"
            )
        base_lr = float(groups[0]["lr"])
        params: dict[str, ParamSpec] = {}
        buffers: dict[str, np.ndarray] = {}
        for group_index, group in enumerate(groups):
            lr = float(group["lr"])
            if base_lr == 0 and lr != 0:
                raise ValueError(
                    f"param_groups[0] has lr=0 but param_groups[{group_index}] has lr={lr}; ONNX Runtime has "
                    "one learning rate (param_groups[0]'s) and the others are exported as fixed multiples of "
                    "it"
                )
            mask = optimizer.lars_mask(group_index)
            for param, use_lars in zip(group["params"], mask, strict=True):
                if not param.requires_grad:
                    continue
                if param.dtype != torch.float32:
                    raise ValueError(
                        f"parameter {names[id(param)]!r} is {param.dtype}; the export supports float32"
                    )
                name = names[id(param)]
                params[name] = ParamSpec(
                    lars=use_lars,
                    weight_decay=float(group.get("weight_decay", 0.0)) if use_lars else 0.0,
                    lr_scale=lr / base_lr if base_lr else 1.0,
                    dampening=float(group["dampening"]) if momentum else 0.0,
                    maximize=bool(group["maximize"]),
                )
                buffer = optimizer.state.get(param, {}).get("momentum_buffer") if momentum else None
                if buffer is not None:
                    buffers[name] = buffer.detach().cpu().numpy().astype(np.float32)
        return cls(
            lr=base_lr,
            momentum=momentum,
            params=params,
            options=optimizer.options,
            momentum_buffers=buffers,
        )


def _refuse_options(options: LarsOptions) -> None:
    _refuse(
        options.use_clip,
        "use_clip=True",
        "the clip divides by the learning rate, which ONNX Runtime keeps in the optimizer graph where "
        "parameters are unnamed (their order changes between runs); set_learning_rate could not reach the "
        "training graph. Use use_clip=False",
    )
    _refuse(
        options.lr_inside_momentum,
        "lr_inside_momentum=True",
        "ONNX Runtime's optimizer multiplies the velocity by the current lr (torch's form); the paper's form "
        "would need the lr in the training graph. Use lr_inside_momentum=False",
    )


def _refuse(flag: bool, option: str, why: str) -> None:
    if flag:
        raise ValueError(f"{option} cannot be exported to ONNX Runtime training: {why}")


def _parameter_names(optimizer: LARS, model: torch.nn.Module | None) -> dict[int, str]:
    # A tensor registered under several names (tied weights) is one ONNX initializer, under its first
    # name, whose gradient ORT sums over its uses as torch does.
    names: dict[int, str] = {}
    if model is not None:
        names = {id(param): name for name, param in model.named_parameters()}
    for group_index, group in enumerate(optimizer.param_groups):
        group_names = group.get("param_names")
        for index, param in enumerate(group["params"]):
            if id(param) in names:
                continue
            if model is not None:
                raise ValueError(
                    f"param_groups[{group_index}]['params'][{index}] is not a parameter of the model being "
                    "exported"
                )
            if not group_names:
                raise ValueError(
                    f"param_groups[{group_index}] has no 'param_names'; build the SGD from "
                    "model.named_parameters() so its names match the ONNX initializers"
                )
            names[id(param)] = group_names[index]
    return names

