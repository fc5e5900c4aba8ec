"""A PyTorch model (and optionally its loss) as the ONNX model ORT's artifact generator takes."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence

import onnx
import torch
from torch import Tensor

__all__ = ["export_model"]


class _WithLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, loss: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, *args: Tensor) -> Tensor:
        *inputs, target = args
        return self.loss(self.model(*inputs), target)


def export_model(
    model: torch.nn.Module,
    example_inputs: Sequence[Tensor],
    *,
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    example_target: Tensor | None = None,
    opset_version: int = 14,
) -> onnx.ModelProto:
    """Export ``model`` (or ``loss(model(*inputs), target)``) with torch's TorchScript exporter.

    Training mode, no constant folding, so every parameter stays an initializer under its
    ``named_parameters()`` name; dimension 0 of every input and output is dynamic (the batch).
    """
    module: torch.nn.Module = model
    args = tuple(example_inputs)
    prefix = ""
    input_names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    if loss is not None:
        if example_target is None:
            raise ValueError("a callable loss needs example_target=, a tensor like the targets it will be trained on")
        module, args, prefix = _WithLoss(model, loss), (*args, example_target), "model."
        input_names.append("target")
    output_names = ["loss" if loss is not None else "output"]
    dynamic_axes = {name: {0: "batch"} for name in input_names}
    if loss is None:
        dynamic_axes["output"] = {0: "batch"}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(
                module,
                args,
                buffer,
                dynamo=False,
                opset_version=opset_version,
                training=torch.onnx.TrainingMode.TRAINING,
                do_constant_folding=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
    except Exception as error:  # torch raises several unrelated types for unsupported ops
        raise ValueError(f"torch.onnx.export could not export the model at opset {opset_version}: {error}") from error
    exported = onnx.load_from_string(buffer.getvalue())
    if len(exported.graph.output) != 1:
        raise ValueError(
            f"the model has {len(exported.graph.output)} outputs; the ONNX export with loss='mse'/'cross_entropy' "
            "needs one tensor output (or pass a callable loss that reduces them to one number)"
        )
    if prefix:  # the wrapper's "model." prefix off, back to the user's parameter names
        renames = {i.name: i.name[len(prefix) :] for i in exported.graph.initializer if i.name.startswith(prefix)}
        _rename_initializers(exported, renames)
    return exported


def _rename_initializers(model: onnx.ModelProto, renames: dict[str, str]) -> None:
    for initializer in model.graph.initializer:
        initializer.name = renames.get(initializer.name, initializer.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
