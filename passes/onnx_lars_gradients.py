"""LARS gradients in an ONNX Runtime training graph.

Pattern: in a training graph made by ``onnxruntime.training`` (``generate_artifacts`` / onnxblock), every
trainable parameter ``p`` has a gradient ``G`` that enters
``com.microsoft.InPlaceAccumulatorV2("<p>_grad.accumulation.buffer", G, lazy_reset_grad)``; the buffer is
the gradient the runtime's optimizer graph reads.
Rewrite: the accumulator receives ``scale * u`` in place of ``G``, where ``u = coeff * (±G + wd * w)`` for
LARS parameters and ``u = ±G`` for the others (``-G`` with maximize). The ``ReduceL2`` norms of all LARS
parameters are gathered into two vectors and ``coeff`` comes from ``lars_fx.functional.trust_ratio``
itself, run once on symbolic ONNX values, so the graph's formula is the one the PyTorch optimizer uses.
``scale`` is a per-parameter constant (the group's lr ratio, the momentum-emulation factor), folded into
the two per-parameter scalars that multiply ``G`` and ``w``.
The decisions live here because the runtime hands the optimizer graph its parameters in an order
that changes from process to process, while in this graph every parameter is named.
Preconditions: float32 parameters with static shapes; each parameter in ``rules`` has exactly one such
accumulator and every accumulator's parameter has a rule; ``use_clip`` is not supported (the
learning rate lives in the optimizer, not in this graph).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor

from lars_fx.functional import trust_ratio

__all__ = ["GradientRule", "LarsGradientsPass", "emit_trust_ratio"]

ACCUMULATOR = ("com.microsoft", "InPlaceAccumulatorV2")
BUFFER_SUFFIX = "_grad.accumulation.buffer"
UPDATE_SUFFIX = "_grad.lars"


@dataclass(frozen=True)
class GradientRule:
    """What one parameter's gradient becomes: ``scale * coeff * (±G + weight_decay * w)`` or ``±scale * G``
    (``-G`` with ``maximize``)."""

    lars: bool
    weight_decay: float
    scale: float
    maximize: bool = False


class _Constants:
    """Initializers of one graph, one per distinct value: float32 numbers and vectors, int64 shapes."""

    def __init__(self, graph: ir.Graph) -> None:
        self._graph = graph
        self._values: dict[tuple, ir.Value] = {}

    def array(self, array: np.ndarray) -> ir.Value:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._values:
            name = f"lars.const.{len(self._values)}"
            value = ir.Value(
                name=name,
                shape=ir.Shape(array.shape),
                type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                const_value=ir.tensor(array, name=name),
            )
            self._graph.register_initializer(value)
            self._values[key] = value
        return self._values[key]

    def __call__(self, number: float) -> ir.Value:
        return self.array(np.array(number, dtype=np.float32))

    def shape(self, dims: Sequence[int]) -> ir.Value:
        return self.array(np.array(dims, dtype=np.int64))


class _Symbol:
    """An ONNX value that Python arithmetic and a few torch functions record onto a tape.

    ``trust_ratio`` runs on these unchanged; an operation not handled here raises, so a change to
    the formula that this translation cannot follow fails loudly instead of exporting wrong math.
    """

    def __init__(self, value: ir.Value, tape: ir.tape.Tape, constants: _Constants) -> None:
        self.value, self._tape, self._constants = value, tape, constants

    def _lift(self, other: Any) -> ir.Value:
        if isinstance(other, _Symbol):
            return other.value
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return self._constants(other)
        raise TypeError(
            f"emit_trust_ratio: cannot translate operand {other!r} of type {type(other).__name__} to ONNX"
        )

    def _op(self, op_type: str, *inputs: ir.Value) -> _Symbol:
        return _Symbol(self._tape.op(op_type, list(inputs)), self._tape, self._constants)

    def __add__(self, other: Any) -> _Symbol:
        return self._op("Add", self.value, self._lift(other))

    def __radd__(self, other: Any) -> _Symbol:
        return self._op("Add", self._lift(other), self.value)

    def __sub__(self, other: Any) -> _Symbol:
        return self._op("Sub", self.value, self._lift(other))

    def __rsub__(self, other: Any) -> _Symbol:
        return self._op("Sub", self._lift(other), self.value)

    def __mul__(self, other: Any) -> _Symbol:
        return self._op("Mul", self.value, self._lift(other))

    def __rmul__(self, other: Any) -> _Symbol:
        return self._op("Mul", self._lift(other), self.value)

    def __truediv__(self, other: Any) -> _Symbol:
        return self._op("Div", self.value, self._lift(other))

    def __rtruediv__(self, other: Any) -> _Symbol:
        return self._op("Div", self._lift(other), self.value)

    def __gt__(self, other: Any) -> _Symbol:
        return self._op("Greater", self.value, self._lift(other))

    def __and__(self, other: Any) -> _Symbol:
        return self._op("And", self.value, self._lift(other))

    def __eq__(self, other: Any) -> _Symbol:  # type: ignore[override]
        return self._op("Equal", self.value, self._lift(other))

    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        symbol = next(a for a in (*args, *kwargs.values()) if isinstance(a, _Symbol))
        if func in (torch.ones_like, torch.zeros_like) and len(args) == 1 and not kwargs:
            return _Symbol(
                symbol._constants(1.0 if func is torch.ones_like else 0.0), symbol._tape, symbol._constants
            )
        if func is torch.where and len(args) == 3 and not kwargs:
            condition, a, b = (symbol._lift(x) for x in args)
            return symbol._op("Where", condition, a, b)
        if func is torch.clamp and not kwargs and len(args) == 3:
            x, low, high = args
            return symbol._op(
                "Min", symbol._op("Max", symbol._lift(x), symbol._lift(low)).value, symbol._lift(high)
            )
        raise TypeError(f"emit_trust_ratio: no ONNX translation for {getattr(func, '__name__', func)}")


def emit_trust_ratio(
    tape: ir.tape.Tape,
    constants: _Constants,
    w_norm: ir.Value,
    g_norm: ir.Value,
    **options: Any,
) -> ir.Value:
    """Record ``lars_fx.functional.trust_ratio(w_norm, g_norm, **options)`` as ONNX nodes on ``tape``."""
    # _Symbol stands in for the tensors: its operators and __torch_function__ record the ONNX nodes
    w, g = (cast(Tensor, _Symbol(norm, tape, constants)) for norm in (w_norm, g_norm))
    return cast(_Symbol, trust_ratio(w, g, **options)).value


class LarsGradientsPass(ir.passes.InPlacePass):
    """Feed each gradient accumulator the LARS update of its parameter (see the module docstring)."""

    def __init__(
        self,
        rules: Mapping[str, GradientRule],
        *,
        coefficient: float,
        epsilon: float,
        unit_trust_on_zero_norm: bool = False,
    ) -> None:
        super().__init__()
        self.rules = dict(rules)
        self.trust_options = {
            "coefficient": coefficient,
            "epsilon": epsilon,
            "unit_trust_on_zero_norm": unit_trust_on_zero_norm,
        }

    def _accumulators(self, graph: ir.Graph) -> dict[str, ir.Node]:
        found: dict[str, ir.Node] = {}
        for node in graph:
            if (node.domain, node.op_type) != ACCUMULATOR:
                continue
            buffer = node.inputs[0]
            if buffer is None or buffer.name is None or not buffer.name.endswith(BUFFER_SUFFIX):
                raise ir.passes.PreconditionError(
                    f"gradient accumulator {node.name!r} does not read a buffer named "
                    f"'<param>{BUFFER_SUFFIX}'; the training graph must come from onnxruntime.training's "
                    "generate_artifacts"
                )
            name = buffer.name[: -len(BUFFER_SUFFIX)]
            gradient = node.inputs[1]
            if gradient is not None and gradient.name == f"{name}{UPDATE_SUFFIX}":
                raise ir.passes.PreconditionError(
                    f"the gradient of {name!r} already goes through LARS: these artifacts were converted "
                    "before"
                )
            if name in found:
                raise ir.passes.PreconditionError(f"parameter {name!r} has two gradient accumulators")
            found[name] = node
        return found

    def requires(self, model: ir.Model) -> None:
        accumulators = self._accumulators(model.graph)
        inputs = {v.name: v for v in model.graph.inputs}
        if missing := sorted(set(self.rules) - set(accumulators)):
            raise ir.passes.PreconditionError(
                f"parameters {missing} have LARS rules but no gradient in the training graph; "
                "export them with requires_grad (they must be trainable in the artifacts)"
            )
        if unruled := sorted(set(accumulators) - set(self.rules)):
            raise ir.passes.PreconditionError(
                f"trainable parameters {unruled} of the training graph are not in the LARS optimizer; "
                "add them to its param groups or freeze them (frozen_params) in the artifacts"
            )
        for name in accumulators:
            value = inputs.get(name)
            if value is None:
                raise ir.passes.PreconditionError(f"parameter {name!r} is not an input of the training graph")
            if value.shape is None or not value.shape.is_static():
                raise ir.passes.PreconditionError(
                    f"parameter {name!r} has no static shape in the training graph"
                )
            if value.dtype != ir.DataType.FLOAT:
                raise ir.passes.PreconditionError(
                    f"parameter {name!r} is {value.dtype}; the LARS export supports float32 parameters only"
                )
        for name, rule in self.rules.items():
            if not (math.isfinite(rule.scale) and math.isfinite(rule.weight_decay)):
                raise ir.passes.PreconditionError(f"rule for {name!r} has a non-finite number: {rule}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        constants = _Constants(graph)
        inputs = {v.name: v for v in graph.inputs}
        accumulators = self._accumulators(graph)
        tape = ir.tape.Tape()
        updates: dict[str, ir.Value] = {}

        # The LARS parameters' norms go into one [k, 1] vector each, so the trust ratios of all of them
        # are one traced trust_ratio (as lars_gradients_foreach) instead of k chains of scalar nodes.
        lars = [name for name in accumulators if self.rules[name].lars]
        if lars:
            row = constants.shape([1, -1])
            weights = {n: tape.op("Reshape", [inputs[n], row]) for n in lars}
            gradients = {n: tape.op("Reshape", [accumulators[n].inputs[1], row]) for n in lars}
            norms = [
                tape.op("Concat", [tape.op("ReduceL2", [rows[n]], attributes={"keepdims": 1}) for n in lars],
                        attributes={"axis": 0})
                for rows in (weights, gradients)
            ]
            rules = [self.rules[n] for n in lars]
            decay = constants.array(np.array([[r.weight_decay] for r in rules], dtype=np.float32))
            w_norm, g_norm = norms
            coeff = emit_trust_ratio(
                tape, constants, w_norm, g_norm, weight_decay=_Symbol(decay, tape, constants),
                **self.trust_options,
            )
            g_scale = np.array([[-r.scale if r.maximize else r.scale] for r in rules], dtype=np.float32)
            w_scale = np.array([[r.scale * r.weight_decay] for r in rules], dtype=np.float32)
            opset = graph.opset_imports.get("", 0)
            g_factors = _split(
                tape, constants, tape.op("Mul", [coeff, constants.array(g_scale)]), len(lars), opset
            )
            w_factors = _split(
                tape, constants, tape.op("Mul", [coeff, constants.array(w_scale)]), len(lars), opset
            )
            for index, name in enumerate(lars):
                # scale * coeff * (±G + wd*w) on [1, n] row views: one Mul, and one rank-1 Gemm that
                # adds the weight term in the same pass (Mul + Add would take two passes).
                update = tape.op("Mul", [gradients[name], g_factors[index]])
                if rules[index].weight_decay != 0:
                    update = tape.op("Gemm", [w_factors[index], weights[name], update])
                shape = inputs[name].shape
                assert shape is not None  # requires() checked that it is static
                updates[name] = tape.op("Reshape", [update, constants.shape(shape.numpy())])
        for name in accumulators:
            rule = self.rules[name]
            if not rule.lars and (rule.scale != 1.0 or rule.maximize):
                factor = constants(-rule.scale if rule.maximize else rule.scale)
                updates[name] = tape.op("Mul", [accumulators[name].inputs[1], factor])
        if not updates:
            return ir.passes.PassResult(model, False)

        graph.insert_before(min(accumulators.values(), key=graph.index), tape.nodes)
        for name, update in updates.items():
            update.name = f"{name}{UPDATE_SUFFIX}"
            update.type, update.shape = inputs[name].type, inputs[name].shape
            accumulators[name].replace_input_with(1, update)
        graph.sort()  # the gradients may be computed after the first accumulator
        return ir.passes.PassResult(model, True)


def _split(
    tape: ir.tape.Tape, constants: _Constants, vector: ir.Value, count: int, opset: int
) -> Sequence[ir.Value]:
    """A [count, 1] vector as count [1, 1] values (a Gemm's A input, a broadcast multiplier)."""
    if count == 1:
        return [vector]
    # Split's sizes: an attribute before opset 13, an input from 13 on (required from 18, or num_outputs).
    if opset < 13:
        return tape.op_multi_out(
            "Split", [vector], attributes={"axis": 0, "split": [1] * count}, num_outputs=count
        )
    sizes = constants.array(np.ones(count, dtype=np.int64))
    return tape.op_multi_out("Split", [vector, sizes], attributes={"axis": 0}, num_outputs=count)
