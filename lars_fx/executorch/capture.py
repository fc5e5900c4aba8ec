"""The training step as one graph: the model's loss captured with its backward, then ``LARS_JOINT``.

``capture_step`` exports ``loss(model(*inputs), target)`` with ``torch.export``, takes its joint
forward-backward graph (loss, then gradients) and runs the ``LARS_JOINT`` pipeline on it, which appends the
LARS momentum-SGD step. The result is a plain ``torch.fx.GraphModule``: it runs in eager PyTorch as well
(the tests run it against ``lars_fx.LARS``) and is what ``program`` exports for ExecuTorch. What the graph
cannot do as torch would (buffers the forward writes, random numbers) is refused here, naming the module.
Imports no ExecuTorch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx
from torch import Tensor
from torch.export.graph_signature import InputKind, OutputKind

from lars_fx._compat import export_forward_backward
from lars_fx.passes.fx_max_pool_backward import ScatterMaxPoolBackward
from lars_fx.passes.fx_pipeline import Stage, run_pipeline
from lars_fx.passes.fx_spec import JointStepRequest, JointUpdate, ParamRole, updates_of
from lars_fx.passes.pipelines import LARS_JOINT

from .spec import ProgramSpec

__all__ = ["LOSSES", "CapturedStep", "Source", "capture_step", "loss_function"]

def mean_squared_error(output: Tensor, target: Tensor) -> Tensor:
    """``F.mse_loss`` (mean reduction) as a mean over every dimension: with a batch that changes between
    calls, ``mse_loss``'s backward divides by a ``sym_float`` that ExecuTorch 1.5.1 cannot lower; this form
    can."""
    squared = (output - target).square()
    return squared.mean(dim=tuple(range(squared.dim())))


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": mean_squared_error,
    "cross_entropy": torch.nn.functional.cross_entropy,
}
_PREFIX = "model."  # _LossOf's attribute: the captured parameters' names start with it
LR_INPUT = "lr"


@dataclass(frozen=True)
class Source:
    """Where one input of the step graph comes from: a trained parameter's weights or momentum buffer
    (``name`` is the parameter's), a constant of the model (a frozen parameter, a buffer or a tensor constant,
    ``value``), the ``index``-th example input, the target, or the lr."""

    kind: Literal["weight", "momentum", "constant", "input", "target", "lr"]
    name: str = ""
    index: int = -1
    value: Tensor | None = None


@dataclass(frozen=True)
class CapturedStep:
    """``graph(*sources) -> (loss, new weights..., new momentum buffers...)``, in ``spec``'s parameter order
    (momentum buffers of the parameters ``spec.with_momentum()`` lists), with the pipeline's stages."""

    graph: torch.fx.GraphModule
    sources: tuple[Source, ...]
    spec: ProgramSpec
    stages: tuple[Stage, ...]


class _LossOf(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, loss: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, *args: Tensor) -> tuple[Tensor]:
        *inputs, target = args
        return (self.loss(self.model(*inputs), target),)


def loss_function(loss: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(
            f"loss must be one of {sorted(LOSSES)} or a callable loss(output, target), got {loss!r}"
        )
    return LOSSES[loss]


def capture_step(
    model: torch.nn.Module,
    example_inputs: Sequence[Tensor],
    example_target: Tensor,
    spec: ProgramSpec,
    *,
    loss: str | Callable[[Tensor, Tensor], Tensor] = "mse",
    batch: torch.export.Dim | None = None,
    dump_dir: str | os.PathLike[str] | None = None,
) -> CapturedStep:
    """The training step of ``model`` under ``spec`` as one graph (see the module docstring).

    ``batch``: the size of dimension 0 of every input and the target, when it may change between steps (by
    default the examples' sizes are fixed). ``dump_dir`` (default ``$LARS_FX_DUMP``) gets the graph before
    and after each pass. Raises ValueError for a model whose step the graph cannot take exactly as torch
    does.
    """
    _refuse_tied_parameters(model)
    inputs = tuple(example_inputs)
    wrapped = _LossOf(model, loss_function(loss))
    dynamic_shapes = None if batch is None else (tuple({0: batch} for _ in (*inputs, example_target)),)
    try:
        exported = torch.export.export(
            wrapped, (*inputs, example_target), dynamic_shapes=dynamic_shapes, strict=False
        )
    except Exception as error:  # torch.export raises many unrelated types for what it cannot capture
        raise ValueError(f"torch.export could not capture the model's loss: {error}") from error
    if len(exported.graph_signature.user_outputs) != 1:
        raise ValueError("the loss must be one tensor")
    # Both checks read the decomposed graph: before it, batch_norm and dropout are ops of their own that
    # hide their writes and their random numbers.
    try:
        joint = export_forward_backward(exported)
    except AssertionError as error:  # torch asserts every trainable parameter gets a gradient
        _refuse_parameters_without_gradient(wrapped, (*inputs, example_target))
        raise ValueError(f"torch could not build the loss's backward graph: {error}") from error
    _refuse_buffer_writes(joint, model)
    _refuse_random_ops(exported, joint)
    gm = joint.graph_module
    ScatterMaxPoolBackward()(gm)  # an ExecuTorch kernel's bug, not LARS: see the pass
    request, sources = _request(joint, spec, inputs)
    gm, stages = run_pipeline(gm, LARS_JOINT, request, tag="executorch_train_step", dump_dir=dump_dir)
    momentum_of = {u.momentum_buffer.name: u.param.name for u in updates_of(gm)
                   if isinstance(u, JointUpdate) and u.momentum_buffer is not None}
    param_names = {placeholder: s.name for placeholder, s in sources.items() if s.kind == "weight"}
    ordered = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name == LR_INPUT:
            ordered.append(Source("lr"))
        elif node.name in momentum_of:
            ordered.append(Source("momentum", name=param_names[momentum_of[node.name]]))
        else:
            ordered.append(sources[node.name])
    return CapturedStep(gm, tuple(ordered), spec, tuple(stages))


def _request(
    joint: torch.export.ExportedProgram, spec: ProgramSpec, inputs: tuple[Tensor, ...]
) -> tuple[JointStepRequest, dict[str, Source]]:
    signature = joint.graph_signature
    trained = {param.name: param for param in spec.params}
    state = joint.state_dict
    constants = joint.constants
    sources: dict[str, Source] = {}
    user_inputs = 0
    placeholder_of: dict[str, str] = {}  # parameter name -> placeholder
    for input_spec in signature.input_specs:
        placeholder = input_spec.arg.name
        target = input_spec.target or ""
        name = target.removeprefix(_PREFIX)
        if input_spec.kind == InputKind.PARAMETER and name in trained:
            sources[placeholder] = Source("weight", name=name)
            placeholder_of[name] = placeholder
        elif input_spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            # a non-persistent buffer is among the constants, not in the state dict
            value = state[target] if target in state else constants[target]
            sources[placeholder] = Source("constant", name=name, value=value.detach().clone())
        elif input_spec.kind == InputKind.USER_INPUT:
            if user_inputs < len(inputs):
                sources[placeholder] = Source("input", index=user_inputs)
            else:
                sources[placeholder] = Source("target")
            user_inputs += 1
        else:
            raise ValueError(f"the captured loss has an input of kind {input_spec.kind.name} ({target}), "
                             "which the export does not handle")
    gradients: dict[str, int] = {}
    for index, output_spec in enumerate(signature.output_specs):
        if output_spec.kind == OutputKind.GRADIENT_TO_PARAMETER:
            target = output_spec.target or ""
            name = target.removeprefix(_PREFIX)
            if name in trained:
                gradients[placeholder_of[name]] = index
    if missing := [name for name in trained if placeholder_of.get(name) not in gradients]:
        raise ValueError(_no_gradient(missing[0]))
    request = JointStepRequest(
        params={
            placeholder_of[p.name]: ParamRole(p.group_index, p.index_in_group, p.use_lars)
            for p in spec.params
        },
        options=spec.options,
        gradients=gradients,
        steps={placeholder_of[p.name]: p.step for p in spec.params},
        lr_input=LR_INPUT,
    )
    return request, sources


def _refuse_tied_parameters(model: torch.nn.Module) -> None:
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            raise ValueError(
                f"parameters {first_name[id(param)]!r} and {name!r} are one tensor (tied weights), which "
                "torch's joint forward-backward export does not support. Register it once and use it in both "
                "places in forward (e.g. F.linear(h, self.embed.weight))"
            )
        first_name[id(param)] = name


def _refuse_buffer_writes(joint: torch.export.ExportedProgram, model: torch.nn.Module) -> None:
    for target in joint.graph_signature.buffers_to_mutate.values():
        name = target.removeprefix(_PREFIX)
        owner_name = name.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        raise ValueError(
            f"the model's forward writes its buffer {name!r} ({type(owner).__name__}: e.g. BatchNorm's "
            "running statistics), which the training program would not keep as torch does. Use a "
            "normalization without running statistics (LayerNorm, GroupNorm, BatchNorm with "
            "track_running_stats=False)"
        )


def _refuse_random_ops(exported: torch.export.ExportedProgram, joint: torch.export.ExportedProgram) -> None:
    """The joint graph names every random op (dropout decomposed); the exported one, before decomposition,
    still knows the module a dropout sits in."""
    for node in [*exported.graph.nodes, *joint.graph.nodes]:
        target = node.target
        if node.op != "call_function" or not (
            torch.Tag.nondeterministic_seeded in getattr(target, "tags", ()) or "dropout" in str(target)
        ):
            continue
        if target is torch.ops.aten.dropout.default and node.args[2] is False:
            continue  # a Dropout in eval mode: the identity
        stack = node.meta.get("nn_module_stack") or {}
        owner = list(stack.values())[-1][0].removeprefix("L['self'].") if stack else "model"
        module = "the model's forward" if owner == "model" else owner.removeprefix(_PREFIX)
        raise ValueError(
            f"the model draws random numbers ({target} in {module}), and the program's generator is not "
            "torch's: its steps could not equal torch's. Put Dropout and other random layers in eval "
            "mode (module.eval()) or remove them before exporting"
        )


def _no_gradient(name: str) -> str:
    return (
        f"parameter {name!r} gets no gradient from the loss: torch's optimizer skips a parameter without a "
        "gradient, and a program would step it with a zero gradient (weight decay, momentum). Freeze it "
        "(requires_grad=False) or leave it out of the model"
    )


def _refuse_parameters_without_gradient(wrapped: _LossOf, args: tuple[Tensor, ...]) -> None:
    """Name the parameter that gets no gradient (``export_forward_backward`` only asserts there is one), from
    an eager backward through a copy of the model."""
    copied = copy.deepcopy(wrapped)
    params = dict(copied.model.named_parameters())
    trainable = [name for name, p in params.items() if p.requires_grad]
    (loss,) = copied(*args)
    grads = torch.autograd.grad(loss, [params[name] for name in trainable], allow_unused=True)
    for name, grad in zip(trainable, grads, strict=True):
        if grad is None:
            raise ValueError(_no_gradient(name))
