"""``nn.Embedding(padding_idx=p)``'s gradient rule in an ONNX Runtime training graph.

torch's embedding backward skips every position whose index is ``p``, so the padding row gets no
gradient from the lookup. torch.onnx exports the lookup as a plain ``Gather``, and ORT's gradient of
it, ``com.microsoft.GatherGrad(Shape(weight), indices, dY)``, scatters every position, padding
included: the padding row trains, and ``||G||`` (hence LARS's trust ratio) of the whole weight
changes.
Pattern: ``lars_fx.onnx``'s export marks each padded lookup by feeding it the indices
``Where(Equal(i, p), p, i)`` (the same indices; ``i`` may be cast before ``Equal``), so the marked
``GatherGrad(Shape(weight), Where(...), dY)`` says which lookup has which padding row, and lookups of
the same weight without padding (``weight[ids]``, an unpadded ``F.embedding``) stay as they are.
Rewrite: ``dY`` becomes ``Where(Unsqueeze(Equal(i, p), -1), 0, dY)``, so positions that look up row
``p`` contribute nothing, as in torch. Only the lookup's contribution is masked: a weight also used
elsewhere (an LM head tied to the embedding) keeps that use's gradient on its padding row, as in
torch. Costs one pass over ``dY`` per padded lookup.
Preconditions: opset >= 13; each named weight is a graph input whose marked lookups all exist
(at least one) with ``axis = 0`` and a padding row the caller expects. With ``padding=None`` (the
artifacts come from another exporter, whose padding rules are unknown) nothing is rewritten and
embedding lookups of trainable parameters raise a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping

import numpy as np
import onnx_ir as ir

__all__ = ["EmbeddingPaddingPass", "padded_lookups"]

GATHER_GRAD = ("com.microsoft", "GatherGrad")


def _constant(value: ir.Value | None) -> int | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1 or tensor.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return None
    return int(tensor.numpy().reshape(()))


def _padding_marker(indices: ir.Value | None) -> tuple[int, ir.Value] | None:
    """``(p, Equal(i, p))`` when ``indices`` is the export's marker ``Where(Equal(i, p), p, i)``."""
    where = indices.producer() if indices is not None else None
    if where is None or (where.domain, where.op_type) != ("", "Where"):
        return None
    condition, then, otherwise = where.inputs
    if condition is None:
        return None
    equal = condition.producer()
    if equal is None or (equal.domain, equal.op_type) != ("", "Equal"):
        return None
    compared, row = equal.inputs
    cast = compared.producer() if compared is not None else None
    if cast is not None and (cast.domain, cast.op_type) == ("", "Cast"):
        compared = cast.inputs[0]
    p = _constant(row)
    if compared is not otherwise or p is None or _constant(then) != p:
        return None
    return p, condition


def padded_lookups(graph: ir.Graph) -> dict[str, list[tuple[ir.Node, tuple[int, ir.Value] | None]]]:
    """Each graph input's ``GatherGrad`` nodes (those reading its ``Shape``), by name, with the padding
    row and the ``Equal(i, p)`` mask of the marked ones (None for unmarked lookups)."""
    found: dict[str, list[tuple[ir.Node, tuple[int, ir.Value] | None]]] = {}
    for node in graph:
        if (node.domain, node.op_type) != GATHER_GRAD or len(node.inputs) != 3:
            continue
        shape_input, _, gradient = node.inputs
        if shape_input is None or gradient is None:
            continue
        shape = shape_input.producer()
        if shape is None or (shape.domain, shape.op_type) != ("", "Shape") or shape.inputs[0] is None:
            continue
        weight = shape.inputs[0]
        if weight.is_graph_input() and weight.name is not None:
            found.setdefault(weight.name, []).append((node, _padding_marker(node.inputs[1])))
    return found


class EmbeddingPaddingPass(ir.passes.InPlacePass):
    """Leave each embedding's padding row out of its lookups' gradients (see the module docstring)."""

    def __init__(self, padding: Mapping[str, Collection[int]] | None) -> None:
        """``padding``: the padding rows of each weight's padded lookups, by weight name, as the export
        marked them; None when unknown (see the module docstring)."""
        super().__init__()
        self.padding = None if padding is None else {name: set(rows) for name, rows in padding.items()}

    def requires(self, model: ir.Model) -> None:
        if not self.padding:
            return
        if model.graph.opset_imports.get("", 0) < 13:
            raise ir.passes.PreconditionError(
                "the padding rule needs opset >= 13 (Unsqueeze with an axes input)"
            )
        lookups = padded_lookups(model.graph)
        dtypes = {v.name: v.dtype for v in model.graph.inputs}
        for name, rows in self.padding.items():
            marked = [(node, marker[0]) for node, marker in lookups.get(name, []) if marker is not None]
            if not marked:
                raise ir.passes.PreconditionError(
                    f"no marked embedding lookup of {name!r} in the training graph: its padding_idx "
                    f"{sorted(rows)} cannot be applied (was the model exported by "
                    "lars_fx.onnx.generate_artifacts?)"
                )
            if dtypes[name] is None:
                raise ir.passes.PreconditionError(
                    f"the training graph's input {name!r} has no element type: the padding rule needs the "
                    "weight's dtype"
                )
            for node, row in marked:
                if row not in rows or node.attributes.get_int("axis", 0) != 0:
                    raise ir.passes.PreconditionError(
                        f"GatherGrad {node.name!r} of {name!r} (padding row {row}, axis "
                        f"{node.attributes.get_int('axis', 0)}) is not one of its embedding lookups with "
                        f"padding_idx {sorted(rows)}"
                    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lookups = padded_lookups(graph)
        if self.padding is None:
            if looked_up := sorted(lookups):
                warnings.warn(
                    f"parameters {looked_up} are looked up by Gather (embeddings): if one has padding_idx, "
                    "ONNX Runtime trains its padding row, which torch leaves alone. Export with "
                    "lars_fx.onnx.generate_artifacts, which keeps the padding rule",
                    stacklevel=2,
                )
            return ir.passes.PassResult(model, False)
        dtypes = {v.name: v.dtype for v in graph.inputs}
        modified = False
        for name in self.padding:
            dtype = dtypes[name]
            assert dtype is not None  # requires() checked it
            for index, (node, marker) in enumerate(lookups[name]):
                if marker is not None:
                    _mask_padding(graph, node, marker[1], dtype, f"{name}.padding_idx.{index}")
                    modified = True
        return ir.passes.PassResult(model, modified)


def _mask_padding(
    graph: ir.Graph, node: ir.Node, is_padding: ir.Value, dtype: ir.DataType, prefix: str
) -> None:
    """``dY`` of ``node`` (a GatherGrad) zeroed where ``is_padding``; ``dtype``: the weight's (and dY's)."""
    gradient = node.inputs[2]
    assert gradient is not None  # padded_lookups takes only GatherGrads with all three inputs
    zero = _initializer(graph, f"{prefix}.zero", np.array(0, dtype=dtype.numpy()))
    axes = _initializer(graph, f"{prefix}.axes", np.array([-1], dtype=np.int64))
    tape = ir.tape.Tape()
    masked = tape.op("Where", [tape.op("Unsqueeze", [is_padding, axes]), zero, gradient])
    masked.name, masked.type, masked.shape = f"{prefix}.masked_grad", ir.TensorType(dtype), gradient.shape
    graph.insert_before(node, tape.nodes)
    node.replace_input_with(2, masked)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value
