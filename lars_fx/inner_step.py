"""LARS over an optimizer other than SGD: its own step, fed the LARS-scaled gradients with its weight decay
switched off (LARS applies the weight decay inside the trust ratio)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import sharding

__all__ = ["step_with_gradients"]


def step_with_gradients(
    inner: Optimizer, gradients: list[tuple[list[Tensor], list[Tensor]]], sharded: bool = False
) -> None:
    """Step ``inner`` with each group's ``(params, gradients)`` in place of its parameters' ``.grad`` and its
    ``weight_decay`` at 0, then put both back. ``gradients`` holds one pair per param group of ``inner``, as
    ``maximize=False`` sees them (negated here for a group that maximizes: ``inner`` negates them again); with
    ``sharded``, this rank's pieces (wrapped as their parameters' DTensors here)."""
    if torch.compiler.is_compiling() and any(not isinstance(g["lr"], Tensor) for g in inner.param_groups):
        _warn_float_lr_under_compile(type(inner).__name__)
    saved_grads: list[tuple[Tensor, Tensor | None]] = []
    saved_decay: list[tuple[dict[str, Any], Any]] = []
    try:
        for group, (params, updates) in zip(inner.param_groups, gradients, strict=True):
            maximize = group.get("maximize", False)
            for p, u in zip(params, updates, strict=True):
                saved_grads.append((p, p.grad))
                u = -u if maximize else u
                p.grad = sharding.wrap_like(p, u) if sharded else u
            if "weight_decay" in group:
                saved_decay.append((group, group["weight_decay"]))
                group["weight_decay"] = 0.0
        _step_without_global_hooks(inner)
    finally:
        for p, g in saved_grads:
            p.grad = g
        for group, decay in saved_decay:
            group["weight_decay"] = decay


def _step_without_global_hooks(inner: Optimizer) -> None:
    """The wrapped optimizer's step without torch's hook wrapper. ``LARS.step`` is the step that hooks
    see: global hooks and LARS's own fire once per step; hooks registered on the wrapped optimizer do
    not fire (over SGD, LARS never calls the wrapped step at all, so both paths agree)."""
    step: Callable[[Optimizer], object] = type(inner).step
    if getattr(step, "hooked", False):
        step = getattr(step, "__wrapped__", step)  # torch's hook wrapper is made with functools.wraps
    step(inner)


@torch.compiler.disable
def _warn_float_lr_under_compile(inner: str) -> None:
    warnings.warn(
        f"torch.compile of LARS.step over {inner} with a float lr: torch recompiles {inner}'s step for "
        "every new lr value until Dynamo's recompile_limit, then runs it eagerly. Give the wrapped optimizer "
        f"a tensor lr, e.g. {inner}(..., lr=torch.tensor(0.001)), to compile it once",
        stacklevel=4,
    )
