"""The compiled graphs of a fused step (``LARS(fused=True)``, ``LAMB(fused=True)``), one per cache key.

A new key is captured (``canonicalize`` of the wrapped optimizer's step), rewritten by the optimizer's
pipeline and compiled by Inductor; a graph the passes do not understand is logged with the ``PatternMismatch``
and its key runs the eager step. Past the limit, new keys run the eager step too, with one warning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _compat
from .carried_norms import CarriedNorms
from .passes.fx_canonicalize import canonicalize
from .passes.fx_pipeline import compile_with_inductor, run_pipeline
from .passes.fx_spec import LayerwiseRequest, PatternMismatch, telemetry_outputs
from .passes.pipelines import FxPass

__all__ = ["CompiledGraph", "GraphCache", "InspectReport", "inspect_graph", "lower"]

log = logging.getLogger("lars_fx.fused")


@dataclass
class CompiledGraph:
    """One key's graph: ``run`` (None: the key runs the eager step), the telemetry batches its extra outputs
    hold (``fx_spec.telemetry_outputs``), and its carried weight norms, if the pipeline gave it any."""

    run: Callable[..., object] | None
    telemetry: list[tuple[int, list[int]]]
    carry: CarriedNorms | None = None

    def __call__(self, inputs: list[Tensor]) -> list[Tensor]:
        """Run on ``inputs`` (feeding and keeping the carried norms); the graph's other outputs."""
        assert self.run is not None
        if self.carry is None:
            return list(self.run(*inputs) or ())  # type: ignore[call-overload]
        return self.carry.keep(inputs, self.run(*inputs, *self.carry.inputs(inputs)))  # type: ignore[arg-type]


def lower(
    gm: torch.fx.GraphModule, inputs: list[Tensor]
) -> tuple[Callable[..., object], CarriedNorms | None]:
    """Compile a rewritten graph with Inductor; with its carried weight norms, if the pipeline gave it any."""
    carry = CarriedNorms.of(gm)
    example = inputs + (carry.inputs(inputs) if carry is not None else [])
    with torch.no_grad():  # the cache key pins every input's shape, strides, dtype and device
        return compile_with_inductor(gm, example, check_input_layout=False), carry


@dataclass
class InspectReport:
    """What an inspection saw: the graph at every stage, node counts, Inductor's kernel count, or the
    diagnostic of a graph the passes do not understand (stages then empty)."""

    stages: list[tuple[str, str]] = field(default_factory=list)
    node_counts: list[tuple[str, int]] = field(default_factory=list)
    kernel_count: int | None = None
    fallback: str | None = None


def inspect_graph(
    pipeline: Sequence[FxPass],
    step: Callable[..., None],
    inputs: list[Tensor],
    request_for: Callable[[torch.fx.GraphModule], LayerwiseRequest],
    *,
    tag: str,
    compile: bool,
) -> InspectReport:
    """Capture ``step(*inputs)``, run ``pipeline`` and report every stage (nothing runs); ``compile`` also
    compiles the result with Inductor (its cache off) to count the kernels it generates."""
    report = InspectReport()
    gm = canonicalize(step, inputs)
    try:
        gm, stages = run_pipeline(gm, pipeline, request_for(gm), tag=tag)
    except PatternMismatch as error:
        report.fallback = str(error)
        return report
    report.stages = [(stage.name, stage.text) for stage in stages]
    report.node_counts = [(stage.name, stage.node_count) for stage in stages]
    if compile:
        _compat.reset_inductor_metrics()
        with _compat.inductor_config_patch(fx_graph_cache=False):
            lower(gm, inputs)
        report.kernel_count = _compat.generated_kernel_count()
    return report


class GraphCache:
    """Compiled graphs by key for one fused step. ``compile_count`` counts captures (compiled or fallen back);
    ``fallback`` holds the last diagnostic that sent a key to the eager step (None if none did).

    ``optimizer`` names the optimizer in messages (``"LARS"``); ``tag`` prefixes the graphs' dump names;
    ``max_graphs`` is read at every new key (a module setting users may change); ``limit_advice`` ends the
    warning given when it is reached.
    """

    def __init__(
        self,
        pipeline: Sequence[FxPass],
        optimizer: str,
        tag: str,
        max_graphs: Callable[[], int],
        limit_advice: str,
    ) -> None:
        self.pipeline = pipeline
        self.optimizer = optimizer
        self.tag = tag
        self.max_graphs = max_graphs
        self.limit_advice = limit_advice
        self.compile_count = 0
        self.fallback: str | None = None
        self._graphs: dict[tuple, CompiledGraph] = {}
        self._warned_limit = False

    def __contains__(self, key: tuple) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def graphs(self) -> list[CompiledGraph]:
        return list(self._graphs.values())

    def get(
        self,
        key: tuple,
        step: Callable[..., None],
        inputs: list[Tensor],
        request_for: Callable[[torch.fx.GraphModule], LayerwiseRequest],
    ) -> CompiledGraph | None:
        """The graph of ``key``, captured from ``step(*inputs)`` and compiled now if new; None past the
        limit."""
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= self.max_graphs():
                self._warn_limit()
                return None
            graph = self._graphs[key] = self._compile(step, inputs, request_for)
        return graph

    def _compile(
        self,
        step: Callable[..., None],
        inputs: list[Tensor],
        request_for: Callable[[torch.fx.GraphModule], LayerwiseRequest],
    ) -> CompiledGraph:
        tag = f"{self.tag}{self.compile_count}"
        self.compile_count += 1
        try:
            gm = canonicalize(step, inputs)
            gm, _ = run_pipeline(gm, self.pipeline, request_for(gm), tag=tag)
        except PatternMismatch as error:
            self.fallback = str(error)
            log.warning(
                "lars-fx: %s(fused=True) falls back to the eager %s step for this configuration: %s",
                self.optimizer, self.optimizer, error,
            )
            return CompiledGraph(None, [])
        telemetry = telemetry_outputs(gm)
        run, carry = lower(gm, inputs)
        return CompiledGraph(run, telemetry, carry)

    def _warn_limit(self) -> None:
        if self._warned_limit:
            return
        self._warned_limit = True
        warnings.warn(
            f"{self.optimizer}(fused=True) has compiled {len(self._graphs)} graphs, its limit "
            f"(lars_fx.fused.MAX_GRAPHS = {self.max_graphs()}): steps whose configuration is new from now on "
            f"run the eager {self.optimizer} step (same "
            f"numbers, slower); the graphs compiled so far are still used. {self.limit_advice}",
            stacklevel=4,
        )
