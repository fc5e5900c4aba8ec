"""One LARS step of given parameters in any mode, for tests that check every mode alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import lars_fx


def lars_step_in_mode(
    mode: str,
    named_params: list[tuple[str, torch.nn.Parameter]],
    sgd_options: dict[str, Any],
    **lars_options: Any,
) -> Callable[[], Any]:
    """The step of ``mode`` ("foreach", "per_tensor", "fused", "flat", "flat_fused", "compiled_step" or
    "backend") over an SGD with
    ``sgd_options``; every parameter gets LARS. Dynamo's caches are reset for the compiled modes."""
    sgd = torch.optim.SGD([{"params": named_params}], **sgd_options)
    if mode == "backend":
        torch._dynamo.reset()
        return torch.compile(
            sgd.step, backend="lars_fx", options={"lars_filter": lambda info: True, **lars_options}
        )
    lars = lars_fx.LARS(
        sgd, lars_filter=lambda info: True, foreach=mode != "per_tensor",
        fused=mode in ("fused", "flat_fused"), flat=mode in ("flat", "flat_fused"), **lars_options,
    )
    if mode == "compiled_step":
        torch._dynamo.reset()
        return torch.compile(lars.step)
    return lars.step
