"""Run ONNX passes on a model file, with before/after dumps.

With the environment variable ``LARS_FX_DUMP=<dir>`` each pass writes ``<dir>/<model>.<n>.<pass>.before.txt``
and ``.after.txt`` (onnx-ir's text form of the model; large tensors are summarized).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

__all__ = ["run_passes"]


def _dump(directory: Path, stem: str, model: ir.Model) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.txt").write_text(str(model), encoding="utf-8")


def run_passes(source: Path, passes: Sequence[ir.passes.PassBase]) -> ir.Model:
    """Load ``source`` and apply ``passes`` in order."""
    model = ir.load(source)
    dump = os.environ.get("LARS_FX_DUMP")
    for index, graph_pass in enumerate(passes):
        stem = f"{source.stem}.{index}.{type(graph_pass).__name__}"
        if dump:
            _dump(Path(dump), f"{stem}.before", model)
        model = graph_pass(model).model
        if dump:
            _dump(Path(dump), f"{stem}.after", model)
    return model
