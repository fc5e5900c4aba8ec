"""The FX pass pipeline, in one place: the order the LARS rewrite runs in, dumps and switches.

``FX_PIPELINE`` lists ``(name, pass)`` in order. ``run_pipeline`` runs it on a canonical graph (see
``fx_canonicalize``) carrying a ``LarsRequest`` and returns the rewritten graph with its stages.
``compile_with_inductor`` lowers the result, as a graph of its own (``standalone``), with
``INDUCTOR_POST_GRAD_PASSES`` run inside Inductor on its post-grad graph (the graph AOT autograd
re-functionalizes from ours).

For researchers:

* ``LARS_FX_DUMP=<dir>`` writes the graph before and after every pass as readable text, one file per
  stage, named ``<tag>.<NN>.<stage>.txt``.
* ``LARS_FX_DISABLE=name[,name]`` (or ``disabled=``) switches passes off (Inductor's too), logged as a warning; a
  pipeline missing a pass the next one needs stops with a ``PatternMismatch`` and the entry point
  falls back as it documents (never a silent half rewrite).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.fx
from torch import Tensor
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx.passes.infra.pass_base import PassBase

from .fx_carry_weight_norms import CarryWeightNorms
from .fx_match_sgd import MatchSgdUpdate
from .fx_momentum import RewriteMomentum
from .fx_norm_after_write_back import NormAfterWriteBack
from .fx_norms import InsertLarsNorms
from .fx_reduce_sharded_norms import ReduceShardedNorms
from .fx_spec import LarsRequest
from .fx_trust_ratio import InsertTrustRatio

__all__ = [
    "FX_PIPELINE", "INDUCTOR_POST_GRAD_PASSES", "Stage", "pipeline_names", "run_pipeline", "compile_with_inductor",
    "graph_text", "standalone",
]

log = logging.getLogger("lars_fx.passes")

FX_PIPELINE: list[tuple[str, PassBase]] = [
    ("match_sgd_update", MatchSgdUpdate()),
    ("insert_lars_norms", InsertLarsNorms()),
    ("reduce_sharded_norms", ReduceShardedNorms()),
    ("insert_trust_ratio", InsertTrustRatio()),
    ("rewrite_momentum", RewriteMomentum()),
    ("carry_weight_norms", CarryWeightNorms()),
]

INDUCTOR_POST_GRAD_PASSES: list[tuple[str, CustomGraphPass]] = [
    ("norm_after_write_back", NormAfterWriteBack()),
]


class Stage(NamedTuple):
    """The graph after one pass (``name == "captured"``: before the first)."""

    name: str
    text: str
    node_count: int  # call_function nodes


def _stage(name: str, gm: torch.fx.GraphModule) -> Stage:
    return Stage(name, graph_text(gm), sum(1 for n in gm.graph.nodes if n.op == "call_function"))


def pipeline_names() -> list[str]:
    """The FX passes' names, in order (``run_pipeline``'s stages)."""
    return [name for name, _ in FX_PIPELINE]


def _switchable_names() -> list[str]:
    return pipeline_names() + [name for name, _ in INDUCTOR_POST_GRAD_PASSES]


def graph_text(gm: torch.fx.GraphModule) -> str:
    """The graph as readable Python, with shapes and dtypes where the tracer recorded them."""
    return gm.print_readable(print_output=False)


def _disabled_from_env() -> set[str]:
    return {name.strip() for name in os.environ.get("LARS_FX_DISABLE", "").split(",") if name.strip()}


def run_pipeline(
    gm: torch.fx.GraphModule,
    request: LarsRequest,
    *,
    tag: str = "graph",
    disabled: Iterable[str] | None = None,
    dump_dir: str | os.PathLike | None = None,
) -> tuple[torch.fx.GraphModule, list[Stage]]:
    """Run ``FX_PIPELINE`` on ``gm``; returns it rewritten and its ``Stage`` after every pass.

    ``disabled`` defaults to ``$LARS_FX_DISABLE`` and ``dump_dir`` to ``$LARS_FX_DUMP``.
    Raises ``PatternMismatch`` when the graph is not one the passes understand.
    """
    disabled = _checked(_disabled_from_env() if disabled is None else set(disabled))
    dump_dir = dump_dir if dump_dir is not None else os.environ.get("LARS_FX_DUMP") or None
    gm.meta["lars_fx"] = request
    stages = [_stage("captured", gm)]
    for name, graph_pass in FX_PIPELINE:
        if name in disabled:
            log.warning("lars-fx: pass %s is switched off", name)
            continue
        result = graph_pass(gm)
        gm = result.graph_module
        stages.append(_stage(name, gm))
    if dump_dir is not None:
        directory = Path(dump_dir)
        directory.mkdir(parents=True, exist_ok=True)
        safe_tag = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)
        for index, stage in enumerate(stages):
            (directory / f"{safe_tag}.{index:02d}.{stage.name}.txt").write_text(stage.text)
        log.info("lars-fx: wrote %d graph stages of %s to %s", len(stages), tag, directory)
    return gm, stages


def _checked(disabled: set[str]) -> set[str]:
    unknown = disabled - set(_switchable_names())
    if unknown:
        raise ValueError(f"LARS_FX_DISABLE/disabled names unknown passes {sorted(unknown)}; the passes are {_switchable_names()}")
    return disabled


class _Chained(CustomGraphPass):
    """Several post-grad passes where Inductor's config holds one."""

    def __init__(self, passes: list[CustomGraphPass]) -> None:
        self.passes = passes

    def __call__(self, graph: torch.fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> tuple:
        return tuple(graph_pass.uuid() for graph_pass in self.passes)


def compile_with_inductor(
    gm: torch.fx.GraphModule,
    example_inputs: list[Tensor],
    *,
    check_input_layout: bool = True,
    disabled: Iterable[str] | None = None,
):
    """``compile_fx(gm, example_inputs)`` with ``INDUCTOR_POST_GRAD_PASSES`` added after any post-grad
    pass the user configured; ``disabled`` defaults to ``$LARS_FX_DISABLE``.

    ``gm`` is compiled as a graph of its own (``standalone``), also when a Dynamo backend calls this.
    ``check_input_layout=False`` drops Inductor's per-call asserts on every input's size and stride (a
    Python call per input per step), for a caller whose own guards already pin them.
    """
    from torch._inductor.compile_fx import compile_fx

    disabled = _checked(_disabled_from_env() if disabled is None else set(disabled))
    passes = [graph_pass for name, graph_pass in INDUCTOR_POST_GRAD_PASSES if name not in disabled]
    for name in sorted(disabled & {name for name, _ in INDUCTOR_POST_GRAD_PASSES}):
        log.warning("lars-fx: Inductor pass %s is switched off", name)
    existing = inductor_config.post_grad_custom_post_pass  # torch >= 2.12 also takes a list
    passes = (list(existing) if isinstance(existing, (list, tuple)) else [existing] if existing is not None else []) + passes
    post_grad = passes[0] if len(passes) == 1 else _Chained(passes) if passes else None
    with standalone(), inductor_config.patch(post_grad_custom_post_pass=post_grad, size_asserts=check_input_layout):
        return compile_fx(gm, example_inputs)


@contextlib.contextmanager
def standalone() -> Iterator[None]:
    """A tracing context of its own for Inductor: a fresh fake mode and shape env, static shapes.

    Not the caller's: inside a Dynamo backend, AOT autograd's tensorify pass would specialise every
    float that changes between calls (and have Dynamo re-trace with a guard on its value) since the
    graphs the passes rewrite read those as tensors, not ``.item()``s (see ``fx_canonicalize``). With a
    shape env of its own, Inductor's FX graph cache works (without one it is bypassed).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)
    with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
        yield
