"""Per-layer LARS telemetry (placeholder interface; implemented in the users'-door work)."""

from __future__ import annotations

from typing import Any

from torch import Tensor


class Telemetry:
    """Records ||w||, ||g|| and the trust ratio of every LARS parameter at every step."""

    def record(
        self, optimizer: Any, group_index: int, params: list[Tensor], w_norm: Tensor, g_norm: Tensor, trust_ratio: Tensor
    ) -> None:
        raise NotImplementedError("lars_fx.telemetry.Telemetry.record")
