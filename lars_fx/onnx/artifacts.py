"""ONNX Runtime training artifacts that train with LARS: ``generate_artifacts`` and ``convert_artifacts``.

``generate_artifacts`` exports a PyTorch model, lets ORT's own ``onnxruntime.training.artifacts`` build
the training, eval and SGD optimizer models and the checkpoint, and hands them to
``convert_artifacts``, which rewrites them with the ONNX passes into LARS artifacts.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import onnx_ir as ir
import torch
from onnxruntime.training import artifacts as ort_artifacts
from onnxruntime.training import onnxblock
from torch import Tensor

from lars_fx.optimizer import LARS
from lars_fx.passes.onnx_embedding_padding import EmbeddingPaddingPass
from lars_fx.passes.onnx_ir_version import IrVersionPass
from lars_fx.passes.onnx_lars_gradients import LarsGradientsPass
from lars_fx.passes.onnx_momentum_optimizer import MomentumOptimizerPass

from .audit import refuse_gradient_hooks
from .checkpoint import write_optimizer_state
from .export import export_model
from .pipeline import run_passes
from .spec import LarsSpec

__all__ = ["generate_artifacts", "convert_artifacts", "ARTIFACT_FILES"]

ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
_LOSSES = {"mse": ort_artifacts.LossType.MSELoss, "cross_entropy": ort_artifacts.LossType.CrossEntropyLoss}

PathLike = str | os.PathLike


def convert_artifacts(
    artifact_directory: PathLike,
    optimizer: LARS | LarsSpec,
    *,
    output_directory: PathLike | None = None,
) -> None:
    """Turn the artifacts of ORT's ``generate_artifacts(..., optimizer=OptimType.SGD or AdamW)`` into LARS.

    ``optimizer`` is a ``lars_fx.LARS`` whose groups' ``param_names`` are the ONNX parameter names (build
    its SGD from ``model.named_parameters()`` of the model you exported), or a ``LarsSpec``. The
    artifacts are rewritten in place, or written to ``output_directory``.
    Another exporter's graph does not say which embedding lookups had ``padding_idx``: the parameters
    looked up by ``Gather`` are named in a warning (``generate_artifacts`` keeps the padding rule).
    """
    spec = optimizer if isinstance(optimizer, LarsSpec) else LarsSpec.from_optimizer(optimizer)
    source = Path(artifact_directory)
    target = Path(output_directory) if output_directory is not None else source
    _convert(source, target, spec, embedding_padding=None)


def _convert(
    source: Path, target: Path, spec: LarsSpec, *, embedding_padding: Mapping[str, Collection[int]] | None
) -> None:
    """``convert_artifacts``; ``embedding_padding``: the padded lookups ``export_model`` marked (None:
    unknown)."""
    if missing := [name for name in ARTIFACT_FILES if not (source / name).is_file()]:
        raise ValueError(
            f"artifact_directory {source} lacks {missing}; generate them with an optimizer (OptimType.SGD)"
        )
    target.mkdir(parents=True, exist_ok=True)
    gradients = LarsGradientsPass(
        spec.gradient_rules(),
        coefficient=spec.options.coefficient,
        epsilon=spec.options.epsilon,
        unit_trust_on_zero_norm=spec.options.unit_trust_on_zero_norm,
    )
    plan: dict[str, list[ir.passes.PassBase]] = {
        "training_model.onnx": [EmbeddingPaddingPass(embedding_padding), gradients, IrVersionPass()],
        "eval_model.onnx": [IrVersionPass()],
        "optimizer_model.onnx": [MomentumOptimizerPass(spec.momentum), IrVersionPass()],
    }
    try:  # all three in memory first, so a refused conversion leaves the directory as it was
        converted = {name: run_passes(source / name, passes) for name, passes in plan.items()}
    except ir.passes.InvariantError as error:
        cause = f": {error.__cause__}" if error.__cause__ else ""
        raise ValueError(f"cannot convert the artifacts in {source} to LARS: {error}{cause}") from error
    for name, model in converted.items():
        ir.save(model, target / name)
    if source != target:
        shutil.copyfile(source / "checkpoint", target / "checkpoint")
    write_optimizer_state(target, lr=spec.lr, first_moments=spec.first_order_moments())


def generate_artifacts(
    model: torch.nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    optimizer: LARS,
    loss: str | onnxblock.Block | Callable[[Tensor, Tensor], Tensor] = "mse",
    artifact_directory: PathLike | None = None,
    *,
    example_target: Tensor | None = None,
    opset_version: int = 14,
) -> None:
    """Write ``training_model.onnx``, ``eval_model.onnx``, ``optimizer_model.onnx`` and ``checkpoint``
    for ONNX Runtime's on-device training API, training ``model`` with the LARS ``optimizer``.

    Mirrors ``onnxruntime.training.artifacts.generate_artifacts``. ``loss`` is "mse", "cross_entropy"
    (targets are int64 class indices), an ``onnxblock.Block``, or a callable ``loss(output, target)``
    exported with the model (needs ``example_target``). The parameters the optimizer trains are
    trainable in the artifacts; the model's other parameters are frozen. The optimizer's learning rate,
    LARS hyperparameters, filter decisions, per-group weight decay and momentum buffers (once it has
    stepped) are exported; what ORT cannot run exactly raises ValueError.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError(
            "example_inputs must be a tensor or a sequence of tensors, e.g. (torch.randn(8, 784),)"
        )
    spec = LarsSpec.from_optimizer(optimizer, model)
    refuse_gradient_hooks(model, spec.params)
    if batch_norms := [
        name for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]:
        raise ValueError(
            f"batch norm layers {batch_norms} cannot be exported for on-device training: ORT's training "
            "graph does not update their running statistics, and ORT 1.19 cannot load the eval model made "
            "for them. Use LayerNorm or GroupNorm"
        )
    ort_loss, torch_loss = _resolve_loss(loss)
    exported = export_model(model, inputs, trained=spec.params, loss=torch_loss,
                            example_target=example_target, opset_version=opset_version)
    initializers = {i.name for i in exported.model.graph.initializer}
    if missing := sorted(set(spec.params) - initializers):
        raise ValueError(
            f"parameters {missing} are trained by the optimizer but do not appear in the exported graph "
            "(unused in forward?); keep them out of the optimizer or set requires_grad=False"
        )
    frozen = [
        name for name, _ in model.named_parameters() if name in initializers and name not in spec.params
    ]
    destination = Path(artifact_directory) if artifact_directory is not None else Path.cwd()
    with tempfile.TemporaryDirectory(prefix="lars_fx_ort_") as scratch:
        try:
            ort_artifacts.generate_artifacts(
                exported.model,
                requires_grad=sorted(spec.params),
                frozen_params=frozen,
                loss=ort_loss,
                optimizer=ort_artifacts.OptimType.SGD,
                artifact_directory=scratch,
            )
        except Exception as error:  # ORT raises RuntimeError, onnx raises ValidationError/ShapeInferenceError
            raise ValueError(_gradient_error(error, opset_version)) from error
        _convert(Path(scratch), destination, spec, embedding_padding=exported.embedding_padding)


def _gradient_error(error: Exception, opset_version: int) -> str:
    missing = re.search(r"has not been registered: (\S+) for node (\S*)", str(error))
    if missing:
        op, node = missing.groups()
        return (
            f"unsupported op {op} (node {node!r}): ONNX Runtime 1.19 has no gradient for it, so it cannot be "
            "trained on device; replace it in the model or move it out of the trained part"
        )
    return (
        f"ONNX Runtime could not build the training graph of this model (exported at opset {opset_version}; "
        f"14 works with LayerNorm): {error}"
    )


def _resolve_loss(
    loss: str | onnxblock.Block | Callable[[Tensor, Tensor], Tensor],
) -> tuple[ort_artifacts.LossType | onnxblock.Block | None, Callable[[Tensor, Tensor], Tensor] | None]:
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(
                f"loss must be one of {sorted(_LOSSES)}, an onnxblock.Block or a callable, got {loss!r}"
            )
        return _LOSSES[loss], None
    if isinstance(loss, onnxblock.Block):
        return loss, None
    if callable(loss):
        return None, loss
    raise TypeError(f"loss must be a string, an onnxblock.Block or a callable, got {type(loss).__name__}")
