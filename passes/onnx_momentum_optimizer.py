"""Momentum SGD as the one optimizer node ONNX Runtime's training ``Optimizer`` accepts.

Pattern: an optimizer graph made by ``onnxruntime.training`` (``OptimType.SGD`` or ``OptimType.AdamW``):
graph inputs ``learning_rate``, ``step``, ``params``, ``gradients``, ``first_order_moments``
[, ``second_order_moments``] and exactly one node, ``com.microsoft.SGDOptimizerV2`` or
``com.microsoft.AdamWOptimizer``.
Rewrite: with ``momentum == 0``, ``SGDOptimizerV2(learning_rate, params, gradients)``
(``w -= lr * g'``). Otherwise ``AdamWOptimizer`` with ``alpha = momentum, beta = 1, epsilon = 1,
weight_decay = 0, correct_bias = 0, adam_mode = 1``, which computes ``m1 = m*m1 + (1-m)*g'``,
``m2 = m2 = 0``, ``w -= lr * m1 / (sqrt(m2) + 1)``: momentum SGD with velocity ``m1`` when the training
graph feeds ``g' = u / (1 - m)`` (see ``onnx_lars_gradients``). The runtime's Optimizer accepts no other
optimizer node, so this is the only way to get momentum; it costs the unused second moments (one
more parameter-sized buffer and its read/write per step, as AdamW).
Preconditions: the graph holds the optimizer node and nothing else (a ``ClipGradNorm`` would act on
the LARS updates, not on the gradients); ``0 <= momentum < 1``.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["MomentumOptimizerPass"]

DOMAIN = "com.microsoft"
OPTIMIZERS = ("SGDOptimizerV2", "AdamWOptimizer")


class MomentumOptimizerPass(ir.passes.InPlacePass):
    """Replace the optimizer node with momentum SGD (see the module docstring)."""

    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = float(momentum)

    def requires(self, model: ir.Model) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ir.passes.PreconditionError(f"momentum must be in [0, 1), got {self.momentum}")
        nodes = list(model.graph)
        if len(nodes) != 1 or (nodes[0].domain, nodes[0].op_type) not in {(DOMAIN, op) for op in OPTIMIZERS}:
            found = [f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in nodes]
            raise ir.passes.PreconditionError(
                f"the optimizer graph must hold exactly one {DOMAIN} SGDOptimizerV2 or AdamWOptimizer node "
                f"and nothing else, found {found}; generate it with onnxruntime.training's OptimType.SGD or "
                "OptimType.AdamW and no clip_grad"
            )
        names = [v.name for v in model.graph.inputs]
        if names[:5] != ["learning_rate", "step", "params", "gradients", "first_order_moments"]:
            raise ir.passes.PreconditionError(f"unexpected optimizer graph inputs {names}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        (old,) = list(graph)
        inputs = {v.name: v for v in graph.inputs}
        lr, step, params, gradients = (inputs[n] for n in ("learning_rate", "step", "params", "gradients"))
        flag = old.outputs[0]
        if self.momentum == 0:
            op_type, node_inputs, attributes = "SGDOptimizerV2", [lr, params, gradients], {}
            if "second_order_moments" in inputs:
                graph.inputs.remove(inputs["second_order_moments"])
        else:
            second = inputs.get("second_order_moments")
            if second is None:
                second = ir.Value(name="second_order_moments", type=inputs["first_order_moments"].type)
                graph.inputs.append(second)
            op_type = "AdamWOptimizer"
            node_inputs = [lr, step, params, gradients, inputs["first_order_moments"], second]
            attributes = {
                "alpha": self.momentum,
                "beta": 1.0,
                "epsilon": 1.0,
                "weight_decay": 0.0,
                "correct_bias": 0,
                "adam_mode": 1,
            }
        new = ir.Node(DOMAIN, op_type, node_inputs, ir.convenience.convert_attributes(attributes),
                      num_outputs=1, name=op_type)
        if flag.dtype is not None:  # no shape: ORT infers a scalar flag where onnxblock declared [1]
            new.outputs[0].dtype = flag.dtype
        graph.insert_after(old, new)
        flag_name = flag.name
        ir.convenience.replace_all_uses_with(flag, new.outputs[0], replace_graph_outputs=True)
        flag.name = None
        new.outputs[0].name = flag_name
        graph.remove(old, safe=True)
        graph.opset_imports.setdefault(DOMAIN, 1)
        return ir.passes.PassResult(model, True)
