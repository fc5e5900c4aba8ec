"""A PyTorch model (and optionally its loss) as the ONNX model ORT's artifact generator takes."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import onnx
import torch
from torch import Tensor

from .audit import GradientAudit

__all__ = ["Exported", "export_model"]

_PREFIX = "model."  # _Traced's attribute: the exported initializers' names start with it


@dataclass(frozen=True)
class Exported:
    """The exported forward model and the padding rows of its trained embedding weights, by name."""

    model: onnx.ModelProto
    embedding_padding: dict[str, set[int]]


class _Traced(torch.nn.Module):
    """What the exporter traces: the model, then the loss if one is given, under a ``GradientAudit``."""

    def __init__(
        self, model: torch.nn.Module, loss: Callable[[Tensor, Tensor], Tensor] | None, audit: GradientAudit
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.audit = audit

    def forward(self, *args: Tensor) -> Tensor:
        with self.audit:
            if self.loss is None:
                result = self.model(*args)
            else:
                *inputs, target = args
                result = self.loss(self.model(*inputs), target)
        self.audit.finish(result)
        return result


def export_model(
    model: torch.nn.Module,
    example_inputs: Sequence[Tensor],
    *,
    trained: Iterable[str] | None = None,
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    example_target: Tensor | None = None,
    opset_version: int = 14,
) -> Exported:
    """Export ``model`` (or ``loss(model(*inputs), target)``) with torch's TorchScript exporter.

    Training mode, no constant folding, so every parameter stays an initializer under its
    ``named_parameters()`` name; dimension 0 of every input and output is dynamic (the batch).
    ``trained`` names the parameters the artifacts will train (default: those with requires_grad);
    a torch gradient rule the export would lose for them raises ValueError (see ``audit``).
    """
    if trained is None:
        trained = [name for name, p in model.named_parameters() if p.requires_grad]
    audit = GradientAudit(model, trained)
    args = tuple(example_inputs)
    input_names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    if loss is not None:
        if example_target is None:
            raise ValueError(
                "a callable loss needs example_target=, a tensor like the targets it will be trained on"
            )
        args = (*args, example_target)
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
                _Traced(model, loss, audit),
                args,
                # torch annotates f as a path, but the TorchScript exporter (dynamo=False) takes a file too
                buffer,  # type: ignore[arg-type]
                dynamo=False,
                opset_version=opset_version,
                training=torch.onnx.TrainingMode.TRAINING,
                do_constant_folding=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
    except Exception as error:  # torch raises several unrelated types for unsupported ops
        audit.check()  # what it found first: e.g. scale_grad_by_freq, which torch refuses naming no module
        raise ValueError(
            f"torch.onnx.export could not export the model at opset {opset_version}: {error}"
        ) from error
    exported = onnx.load_from_string(buffer.getvalue())
    if len(exported.graph.output) != 1:
        raise ValueError(
            f"the model has {len(exported.graph.output)} outputs; the ONNX export with "
            "loss='mse'/'cross_entropy' needs one tensor output (or pass a callable loss that reduces them "
            "to one number)"
        )
    # The wrapper's prefix off, back to the user's parameter names.
    renames = {
        i.name: i.name[len(_PREFIX) :] for i in exported.graph.initializer if i.name.startswith(_PREFIX)
    }
    _rename_initializers(exported, renames)
    return Exported(exported, audit.check())


def _rename_initializers(model: onnx.ModelProto, renames: dict[str, str]) -> None:
    for initializer in model.graph.initializer:
        initializer.name = renames.get(initializer.name, initializer.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
