"""The options of each layer-wise algorithm, once: their names, defaults and checks.

Every entry point (``lars_fx.LARS``, the ``fused`` step's passes, the ``lars_fx`` backend, the ONNX export,
the benchmarks) holds one of these frozen objects instead of spelling the options out. The hyperparameters a
param group holds (``lr``, ``weight_decay``, ``momentum``, ...) are not here: they change during training
(schedulers) and are read from the group at every step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LarsOptions", "LambOptions", "check_flag", "check_number"]


def check_number(name: str, value: Any, *, minimum: float, strict: bool = False, hint: str = "") -> float:
    """``value`` as a float if it is a finite number (or one-element tensor) ``>= minimum`` (``>`` if
    ``strict``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}{hint}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}{hint}")
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


@dataclass(frozen=True)
class LarsOptions:
    """LARS's options (MindSpore's ``nn.LARS`` defaults), checked when made.

    ``epsilon``: added to the trust ratio's denominator. ``coefficient``: the trust coefficient (eta).
    ``use_clip``: clip ``coeff / lr`` to ``[0, 1]``. ``unit_trust_on_zero_norm``: a trust ratio of 1 where
    ``||w||`` or ``||g||`` is 0 (timm, apex) instead of MindSpore's formula. ``lr_inside_momentum``: the
    paper's momentum form ``v = m*v + lr*u; w = w - v``.
    """

    epsilon: float = 1e-5
    coefficient: float = 0.001
    use_clip: bool = False
    unit_trust_on_zero_norm: bool = False
    lr_inside_momentum: bool = False

    def __post_init__(self) -> None:
        checked = {
            "epsilon": check_number(
                "epsilon", self.epsilon, minimum=0.0, strict=True, hint=" (MindSpore's default is 1e-5)"
            ),
            "coefficient": check_number(
                "coefficient", self.coefficient, minimum=0.0, hint=" (MindSpore's default is 0.001)"
            ),
            "use_clip": check_flag("use_clip", self.use_clip),
            "unit_trust_on_zero_norm": check_flag("unit_trust_on_zero_norm", self.unit_trust_on_zero_norm),
            "lr_inside_momentum": check_flag("lr_inside_momentum", self.lr_inside_momentum),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    def trust_ratio_options(self) -> dict[str, Any]:
        """The keyword arguments ``trust_ratio`` takes from these options (it also takes ``weight_decay``,
        ``lr``)."""
        return {
            "coefficient": self.coefficient,
            "epsilon": self.epsilon,
            "use_clip": self.use_clip,
            "unit_trust_on_zero_norm": self.unit_trust_on_zero_norm,
        }

    def replace(self, **changes: Any) -> LarsOptions:
        """A copy with ``changes`` (checked as in the constructor)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LambOptions:
    """LAMB's options beyond the param groups' hyperparameters (``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``maximize``, read from the groups at every step), checked when made.

    ``trust_clip``: the trust ratio is clipped to at most this (timm's "LAMBC" uses 1.0); None: no clip.
    """

    trust_clip: float | None = None

    def __post_init__(self) -> None:
        if self.trust_clip is not None:
            clip = check_number("trust_clip", self.trust_clip, minimum=0.0, strict=True,
                                hint=" (timm's LAMBC uses 1.0; None for no clip)")
            object.__setattr__(self, "trust_clip", clip)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    def trust_ratio_options(self) -> dict[str, Any]:
        """The keyword arguments ``lamb_trust_ratio`` takes from these options."""
        return {"trust_clip": self.trust_clip}

    def replace(self, **changes: Any) -> LambOptions:
        """A copy with ``changes`` (checked as in the constructor)."""
        return dataclasses.replace(self, **changes)
