"""``ProgramSpec``: what an ExecuTorch training program takes from a ``lars_fx.LARS``, by parameter name.

The program steps with one lr input; each parameter's group decides its trust ratio (the filter), weight
decay, momentum, dampening, nesterov and maximize, and its lr as a fixed multiple of the program's. This
module checks that the optimizer can be expressed exactly and raises, naming the parameter and the fix,
before anything is exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lars_fx.functional import LarsOptions
from lars_fx.optimizer import LARS
from lars_fx.passes.fx_spec import JointParam

__all__ = ["ProgramSpec", "TrainedParam"]


@dataclass(frozen=True)
class TrainedParam:
    """One parameter the program trains: its name in ``model.named_parameters()``, its place in the
    optimizer, whether it gets the trust ratio, how SGD steps it, and torch's momentum buffer (None before
    the optimizer's first step, or without momentum)."""

    name: str
    group_index: int
    index_in_group: int
    use_lars: bool
    step: JointParam
    momentum_buffer: Tensor | None = None


@dataclass(frozen=True)
class ProgramSpec:
    """LARS over ``torch.optim.SGD`` for a training program: the options, the lr ``param_groups[0]`` has now
    (the program's lr input replaces it; other groups' lrs are fixed multiples of it) and the trained
    parameters in ``model.named_parameters()`` order."""

    lr: float
    options: LarsOptions
    params: tuple[TrainedParam, ...]

    def names(self) -> list[str]:
        return [param.name for param in self.params]

    def with_momentum(self) -> list[TrainedParam]:
        """The parameters with a momentum buffer in the program (their group's momentum is not 0)."""
        return [param for param in self.params if param.step.momentum != 0]

    @classmethod
    def from_optimizer(cls, optimizer: LARS, model: torch.nn.Module) -> ProgramSpec:
        """Read a ``lars_fx.LARS`` over ``torch.optim.SGD`` training ``model``'s parameters.

        Raises TypeError/ValueError for what a program cannot do exactly as ``optimizer.step()`` would.
        """
        if not isinstance(optimizer, LARS):
            raise TypeError(
                f"optimizer must be a lars_fx.LARS, got {type(optimizer).__name__}; wrap it: "
                "lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=..., momentum=...))"
            )
        if type(optimizer.optimizer) is not torch.optim.SGD:
            raise ValueError(
                "the ExecuTorch export supports LARS over torch.optim.SGD only, got "
                f"{type(optimizer.optimizer).__name__}; wrap torch.optim.SGD(model.named_parameters(), ...)"
            )
        if optimizer.skip_nonfinite:
            raise ValueError(
                "skip_nonfinite=True cannot be exported: the program always steps. Use skip_nonfinite=False "
                "and check the loss train_step returns on the device"
            )
        names = {id(param): name for name, param in model.named_parameters()}
        groups = optimizer.param_groups
        base_lr = float(groups[0]["lr"])
        trained: dict[str, TrainedParam] = {}
        for group_index, group in enumerate(groups):
            lr = float(group["lr"])
            if not math.isfinite(lr) or lr < 0:
                raise ValueError(
                    f"param_groups[{group_index}] has lr={lr}; the export needs a finite lr >= 0"
                )
            if base_lr == 0 and lr != 0:
                raise ValueError(
                    f"param_groups[0] has lr=0 but param_groups[{group_index}] has lr={lr}; the program has "
                    "one lr input (param_groups[0]'s) and steps the other groups with fixed multiples of "
                    "it. Give param_groups[0] a non-zero lr"
                )
            momentum = float(group["momentum"])
            for index, (param, use_lars) in enumerate(
                zip(group["params"], optimizer.lars_mask(group_index), strict=True)
            ):
                where = f"param_groups[{group_index}]['params'][{index}]"
                if id(param) not in names:
                    raise ValueError(
                        f"{where} is not a parameter of the model being exported; build the optimizer from "
                        "model.named_parameters()"
                    )
                name = names[id(param)]
                _check_tensor(name, param)
                if not param.requires_grad:
                    continue  # torch never steps it: a constant of the program
                buffer = optimizer.state.get(param, {}).get("momentum_buffer") if momentum != 0 else None
                dampening = float(group["dampening"])
                if momentum != 0 and dampening != 0 and buffer is None:
                    raise ValueError(
                        f"parameter {name!r} has no momentum buffer yet and its group has "
                        f"dampening={dampening}: torch's first step sets the buffer to the update, undamped, "
                        "and a program whose buffer starts at zeros would damp it. Export after the first "
                        "optimizer step, or use dampening=0"
                    )
                trained[name] = TrainedParam(
                    name=name,
                    group_index=group_index,
                    index_in_group=index,
                    use_lars=use_lars,
                    step=JointParam(
                        weight_decay=float(group["weight_decay"]) if use_lars else 0.0,
                        momentum=momentum,
                        dampening=dampening,
                        nesterov=bool(group["nesterov"]),
                        maximize=bool(group["maximize"]),
                        lr_scale=lr / base_lr if base_lr else 1.0,
                    ),
                    momentum_buffer=None if buffer is None else buffer.detach().clone(),
                )
        if not trained:
            raise ValueError("the optimizer has no parameter that requires grad: there is nothing to train")
        order = [name for name, _ in model.named_parameters() if name in trained]
        return cls(lr=base_lr, options=optimizer.options, params=tuple(trained[name] for name in order))


def _check_tensor(name: str, param: Tensor) -> None:
    if type(param) not in (torch.Tensor, torch.nn.Parameter):
        raise ValueError(
            f"parameter {name!r} is a {type(param).__name__}; the ExecuTorch export takes plain tensors. "
            "Export a model that is not sharded or wrapped (e.g. the module before FSDP/DTensor)"
        )
    if param.dtype != torch.float32:
        raise ValueError(
            f"parameter {name!r} is {param.dtype}; the ExecuTorch export supports float32 parameters. Use "
            "model.float()"
        )
    if param.device.type != "cpu":
        raise ValueError(
            f"parameter {name!r} is on {param.device}; the ExecuTorch export traces on the CPU. Use "
            "model.cpu() (and move the optimizer's state with it, e.g. by building it after)"
        )
