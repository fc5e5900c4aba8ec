"""The weight norms a compiled LARS step hands to its next run (see ``passes/fx_carry_weight_norms``)."""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor

from .functional.flat import Segments, segment_squared_norms
from .passes.fx_norms import squared_norms
from .passes.fx_spec import carried_batches

__all__ = ["CarriedNorms"]


class CarriedNorms:
    """``||w||^2`` per batch of a graph rewritten with ``carry_weight_norms``.

    ``batches``: per carried input, the positions of its weights among the graph's other inputs, the compute
    dtype, and for a flat buffer (``LARS(flat=True, fused=True)``) the positions of its ``Segments.chunks``
    and ``Segments.ranges`` inputs, its segment count and its most chunks per segment (its fresh norms are
    then ``segment_squared_norms``, one per segment). A run's outputs are reused by the next run only while
    every weight still has the version counter and data pointer that run left it with: a write by anything
    else (another graph, the eager step, ``load_state_dict``, an in-place edit) bumps the version and the
    norms are recomputed. Writes that bypass the version counter (``p.data``) are not seen, nor writes into
    DTensor parameters through ``torch._foreach_*_`` or ``to_local()``: ``lars_fx.fused`` carries no norms
    over them.
    """

    def __init__(
        self, batches: list[tuple[list[int], torch.dtype, tuple[int, int, int, int] | None]]
    ) -> None:
        self.batches = batches
        self._norms: list[Tensor] | None = None
        self._left_at: tuple | None = None

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> CarriedNorms | None:
        """The carried inputs the pipeline gave ``gm`` (``fx_carry_weight_norms``), or None if it gave
        none."""
        batches = carried_batches(gm)
        if not batches:
            return None
        position = {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        return cls([
            (
                [position[u.param.name] for u in b.updates],
                b.compute_dtype,
                None if b.segments is None else (
                    position[b.segments.chunks],
                    position[b.segments.ranges],
                    b.segments.num_segments,
                    b.segments.max_chunks,
                ),
            )
            for b in batches
        ])

    def _state(self, inputs: list[Tensor]) -> tuple:
        return tuple(
            (inputs[i]._version, inputs[i].data_ptr()) for positions, _, _ in self.batches for i in positions
        )

    def inputs(self, inputs: list[Tensor]) -> list[Tensor]:
        """The carried norms to pass after ``inputs``: the last run's, or fresh ones."""
        if self._norms is None or self._state(inputs) != self._left_at:
            self._norms = [
                squared_norms([inputs[i] for i in positions], dtype) if segments is None
                else segment_squared_norms(
                    inputs[positions[0]],
                    Segments(inputs[segments[0]], inputs[segments[1]], segments[2], segments[3]),
                    dtype,
                )
                for positions, dtype, segments in self.batches
            ]
        return self._norms

    def keep(self, inputs: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
        """Keep the carried norms from a run's ``outputs`` (they come last); returns the other outputs."""
        split = len(outputs) - len(self.batches)
        self._norms = list(outputs[split:])
        self._left_at = self._state(inputs)
        return list(outputs[:split])
