"""Running a pipeline: dumps, switches, and lowering with Inductor.

``run_pipeline(gm, pipeline, request)`` runs a pipeline (a list of passes, see ``pipelines``) on a
canonical graph (see ``fx_canonicalize``) for the request an entry point makes (``fx_spec``), and returns the
rewritten graph with its stages. ``compile_with_inductor`` lowers the result, as a graph of its own
(``standalone``), with ``pipelines.INDUCTOR_POST_GRAD`` run inside Inductor on its post-grad graph (the graph
AOT autograd re-functionalizes from ours).

For researchers:

* ``LARS_FX_DUMP=<dir>`` writes the graph before and after every pass as readable text, one file per
  stage, named ``<tag>.<NN>.<stage>.txt``.
* ``LARS_FX_DISABLE=name[,name]`` (or ``disabled=``) switches passes off (Inductor's too), logged as a
  warning; a pipeline missing a pass the next one needs stops with a ``PatternMismatch`` from that pass's
  ``requires`` and the entry point falls back as it documents (never a silent half rewrite).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import Tensor

from lars_fx._compat import (
    CustomGraphPass,
    compile_fx,
    configured_post_grad_passes,
    fresh_fake_mode,
    inductor_config_patch,
    tracing,
)

from .fx_spec import REQUEST, LayerwiseRequest
from .pipelines import INDUCTOR_POST_GRAD, PIPELINES, FxPass

__all__ = ["Stage", "pipeline_names", "run_pipeline", "compile_with_inductor", "graph_text", "standalone"]

log = logging.getLogger("lars_fx.passes")


class Stage(NamedTuple):
    """The graph after one pass (``name == "captured"``: before the first)."""

    name: str
    text: str
    node_count: int  # call_function nodes


def _stage(name: str, gm: torch.fx.GraphModule) -> Stage:
    return Stage(name, graph_text(gm), sum(1 for n in gm.graph.nodes if n.op == "call_function"))


def pipeline_names(pipeline: Sequence[FxPass]) -> list[str]:
    """The passes' names, in order (``run_pipeline``'s stages after ``captured``)."""
    return [graph_pass.name for graph_pass in pipeline]


def _switchable_names() -> list[str]:
    names = [name for pipeline in PIPELINES.values() for name in pipeline_names(pipeline)]
    names += [graph_pass.name for graph_pass in INDUCTOR_POST_GRAD]
    return list(dict.fromkeys(names))


def graph_text(gm: torch.fx.GraphModule) -> str:
    """The graph as readable Python, with shapes and dtypes where the tracer recorded them."""
    return gm.print_readable(print_output=False)


def _disabled_from_env() -> set[str]:
    return {name.strip() for name in os.environ.get("LARS_FX_DISABLE", "").split(",") if name.strip()}


def run_pipeline(
    gm: torch.fx.GraphModule,
    pipeline: Sequence[FxPass],
    request: LayerwiseRequest,
    *,
    tag: str = "graph",
    disabled: Iterable[str] | None = None,
    dump_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.fx.GraphModule, list[Stage]]:
    """Run ``pipeline``'s passes on ``gm`` for ``request``; returns it rewritten and its ``Stage`` after every
    pass.

    ``disabled`` defaults to ``$LARS_FX_DISABLE`` and ``dump_dir`` to ``$LARS_FX_DUMP``.
    Raises ``PatternMismatch`` when the graph is not one the passes understand.
    """
    disabled = _checked(_disabled_from_env() if disabled is None else set(disabled))
    dump_dir = dump_dir if dump_dir is not None else os.environ.get("LARS_FX_DUMP") or None
    gm.meta[REQUEST] = request
    stages = [_stage("captured", gm)]
    for graph_pass in pipeline:
        if graph_pass.name in disabled:
            log.warning("lars-fx: pass %s is switched off", graph_pass.name)
            continue
        result = graph_pass(gm)
        if result is not None:  # None: changed in place (torch's pass_result_wrapper reads it so)
            gm = result.graph_module
        stages.append(_stage(graph_pass.name, gm))
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
        raise ValueError(
            f"LARS_FX_DISABLE/disabled names unknown passes {sorted(unknown)}; the passes are "
            f"{_switchable_names()}"
        )
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
) -> Callable[..., Any]:
    """``compile_fx(gm, example_inputs)`` with ``pipelines.INDUCTOR_POST_GRAD`` added after any post-grad
    pass the user configured; ``disabled`` defaults to ``$LARS_FX_DISABLE``.

    ``gm`` is compiled as a graph of its own (``standalone``), also when a Dynamo backend calls this.
    ``check_input_layout=False`` drops Inductor's per-call asserts on every input's size and stride (a
    Python call per input per step), for a caller whose own guards already pin them.
    """
    disabled = _checked(_disabled_from_env() if disabled is None else set(disabled))
    passes: list[Any] = [graph_pass for graph_pass in INDUCTOR_POST_GRAD if graph_pass.name not in disabled]
    for name in sorted(disabled & {graph_pass.name for graph_pass in INDUCTOR_POST_GRAD}):
        log.warning("lars-fx: Inductor pass %s is switched off", name)
    passes = configured_post_grad_passes() + passes
    post_grad = passes[0] if len(passes) == 1 else _Chained(passes) if passes else None
    with (
        standalone(),
        inductor_config_patch(post_grad_custom_post_pass=post_grad, size_asserts=check_input_layout),
    ):
        return compile_fx(gm, example_inputs)


@contextlib.contextmanager
def standalone() -> Iterator[None]:
    """A tracing context of its own for Inductor: a fresh fake mode and shape env, static shapes.

    Not the caller's: inside a Dynamo backend, AOT autograd's tensorify pass would specialise every
    float that changes between calls (and have Dynamo re-trace with a guard on its value) since the
    graphs the passes rewrite read those as tensors, not ``.item()``s (see ``fx_canonicalize``). With a
    shape env of its own, Inductor's FX graph cache works (without one it is bypassed).
    """
    with tracing(fresh_fake_mode()):
        yield
