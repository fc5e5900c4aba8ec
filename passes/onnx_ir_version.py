"""Cap a model's IR version at what ONNX Runtime 1.19 loads.

Pattern: any model; onnx >= 1.19 stamps IR 11+ on the models it builds (ORT's optimizer graph among
them), which ORT 1.19 refuses ("Unsupported model IR version").
Rewrite: ``ir_version = min(ir_version, max_ir_version)``.
Preconditions: the default-domain opset is at most ``max_opset`` (21 for ORT 1.19), and no value uses
a data type newer than the target IR (the float8/4-bit/float4 types), which the lower IR cannot hold.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir

__all__ = ["IrVersionPass"]

# Data types introduced after IR 10; a model that uses them cannot be stamped IR 10.
_POST_IR10_TYPES = {
    name for name in ("FLOAT4E2M1", "FLOAT8E8M0", "INT2", "UINT2") if hasattr(ir.DataType, name)
}


class IrVersionPass(ir.passes.InPlacePass):
    """Stamp the model with an IR version ORT can load (see the module docstring)."""

    def __init__(self, max_ir_version: int = 10, max_opset: int = 21) -> None:
        super().__init__()
        self.max_ir_version = max_ir_version
        self.max_opset = max_opset

    def requires(self, model: ir.Model) -> None:
        opset = model.graph.opset_imports.get("", model.graph.opset_imports.get("ai.onnx", 0))
        if opset > self.max_opset:
            raise ir.passes.PreconditionError(
                f"the model uses opset {opset}; ONNX Runtime 1.19 supports opset <= {self.max_opset}: "
                "export with a lower opset_version (14 works with LayerNorm)"
            )
        used = {v.dtype.name for v in _values(model.graph) if v.dtype is not None}
        if newer := sorted(used & _POST_IR10_TYPES):
            raise ir.passes.PreconditionError(
                f"data types {newer} need an IR version above {self.max_ir_version}"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.ir_version <= self.max_ir_version:
            return ir.passes.PassResult(model, False)
        model.ir_version = self.max_ir_version
        return ir.passes.PassResult(model, True)


def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs
