"""One ExecuTorch program (``.pte``) that trains with LARS: ``export_program``.

The program's four methods share its state, the trained parameters' weights and momentum buffers, which
start as the model's weights and the optimizer's buffers at export:

* ``train_step(*inputs, target, lr) -> loss``: the captured step (``capture``): forward, backward and the
  LARS momentum-SGD step, written back into the state; ``lr`` a 0-d float32 tensor (a schedule needs no new
  program);
* ``predict(*inputs) -> output``: the model's forward on the state's weights;
* ``get_state() -> (weights..., momentum buffers...)`` and ``set_state(weights..., momentum buffers...)``,
  in ``model.named_parameters()`` order, to checkpoint and resume on the device.

The state is shared across methods by ExecuTorch's ``share_mutable_buffers`` planning: one mutable buffer per
tensor that every method reads and writes. Those buffers hold no data in the program. ExecuTorch's way to
start them initialized (``InitializedMutableBufferPass``) copies the initial data in again whenever a method
is first loaded, so a device that loads ``predict`` after training (the C++ ``Module`` loads a method at its
first call), or ``train_step`` after ``set_state``, would silently lose its state. Instead the initial
values are constants of the program (stored once) and a mutable mark says whether the state has been written:
until ``train_step`` or ``set_state`` writes it (and sets the mark), every method reads the initial values.
The mark is a 64-bit pattern, not a flag, because the runtime does not promise to zero a planned buffer.

The written program is loaded back with ``executorch.runtime`` and every method loaded: a method the runtime
cannot load (an operator without a kernel) is an error here, not on the device.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

try:
    from executorch.exir import ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
except ImportError as missing:
    raise ImportError(
        "lars_fx.executorch needs ExecuTorch: pip install 'lars-fx[executorch]' (executorch>=1.5.1)"
    ) from missing

from lars_fx.optimizer import LARS

from .capture import CapturedStep, capture_step
from .spec import ProgramSpec

__all__ = ["METHODS", "TrainingProgram", "export_program", "program_modules"]

METHODS = ("train_step", "predict", "get_state", "set_state")
_WEIGHT, _MOMENTUM, _CONSTANT = "lars_weight_", "lars_momentum_", "lars_constant_"
_INITIAL = "initial_"
# The state's mark once written: a fixed random 63-bit pattern that a fresh arena's bytes will not hold.
_WRITTEN = 0x2F6A_91C4_5B3E_D807
PathLike = str | os.PathLike


@dataclass(frozen=True)
class TrainingProgram:
    """A written program: its path and the captured step (with its stages and spec)."""

    path: Path
    step: CapturedStep

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The weights ``get_state``/``set_state`` list, in this order (then the momentum buffers of
        ``momentum_names``)."""
        return tuple(self.step.spec.names())

    @property
    def momentum_names(self) -> tuple[str, ...]:
        """The parameters whose momentum buffers follow the weights in the state."""
        return tuple(param.name for param in self.step.spec.with_momentum())


class _State(torch.nn.Module):
    """The program's state: a mutable buffer per trained weight (``spec.params`` order) and momentum buffer
    (``spec.with_momentum()`` order), each with its initial value as a constant, the mark, and the step's
    constants in its input order. The buffers' names are what ``share_mutable_buffers`` shares by."""

    mark: Tensor

    def __init__(self, step: CapturedStep, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        spec = step.spec
        for index, param in enumerate(spec.params):
            initial = weights[param.name].detach().clone()
            self.register_buffer(f"{_WEIGHT}{index}", torch.zeros_like(initial))
            self.register_buffer(f"{_INITIAL}{_WEIGHT}{index}", initial)
        for index, param in enumerate(spec.with_momentum()):
            self.register_buffer(f"{_MOMENTUM}{index}", torch.zeros_like(weights[param.name]))
            if param.momentum_buffer is not None:  # else zeros, made in the graph rather than stored
                self.register_buffer(f"{_INITIAL}{_MOMENTUM}{index}", param.momentum_buffer.detach().clone())
        constants = [source.value for source in step.sources if source.kind == "constant"]
        for index, value in enumerate(constants):
            assert value is not None
            self.register_buffer(f"{_CONSTANT}{index}", value.clone())
        self.register_buffer("mark", torch.zeros((), dtype=torch.int64))

    def _named(self, prefix: str) -> list[Tensor]:
        return [buffer for name, buffer in self.named_buffers() if name.startswith(prefix)]

    def _current(self, prefix: str) -> list[Tensor]:
        written = self.mark == _WRITTEN
        buffers = dict(self.named_buffers())
        current = []
        for name, buffer in self.named_buffers():
            if name.startswith(prefix):
                initial = buffers.get(_INITIAL + name)
                initial = torch.zeros_like(buffer) if initial is None else initial
                # A condition of the buffer's shape: ExecuTorch's portable where broadcasts a 0-d one element
                # by element, which cost more than the LARS step (2.4 ms of 4.2 on a 784-256-10 MLP).
                current.append(torch.where(written.expand(buffer.shape), buffer, initial))
        return current

    def weights(self) -> list[Tensor]:
        """The trained weights now: the written ones, or the initial ones before any write."""
        return self._current(_WEIGHT)

    def momenta(self) -> list[Tensor]:
        return self._current(_MOMENTUM)

    def constants(self) -> list[Tensor]:
        return self._named(_CONSTANT)

    def write(self, values: Sequence[Tensor]) -> None:
        """Write the weights then the momentum buffers, and mark the state written."""
        for buffer, value in zip(self._named(_WEIGHT) + self._named(_MOMENTUM), values, strict=True):
            buffer.copy_(value)
        self.mark.fill_(_WRITTEN)


class _TrainStep(torch.nn.Module):
    """``train_step(*inputs, target, lr) -> loss``: the captured step, its new state written back."""

    def __init__(self, state: _State, step: CapturedStep) -> None:
        super().__init__()
        self.state = state
        self.step = step.graph
        weight_index = {name: i for i, name in enumerate(step.spec.names())}
        momentum_index = {param.name: i for i, param in enumerate(step.spec.with_momentum())}
        constants = 0
        self.plan: list[tuple[str, int]] = []  # (what, index) per graph input
        for source in step.sources:
            if source.kind == "weight":
                self.plan.append(("weight", weight_index[source.name]))
            elif source.kind == "momentum":
                self.plan.append(("momentum", momentum_index[source.name]))
            elif source.kind == "constant":
                self.plan.append(("constant", constants))
                constants += 1
            else:
                self.plan.append((source.kind, source.index))

    def forward(self, *args: Tensor) -> Tensor:
        *inputs, target, lr = args
        pools = {
            "weight": self.state.weights(),
            "momentum": self.state.momenta(),
            "constant": self.state.constants(),
            "input": inputs,
        }
        graph_inputs = [
            target if what == "target" else lr if what == "lr" else pools[what][index]
            for what, index in self.plan
        ]
        loss, *stepped = self.step(*graph_inputs)
        self.state.write(stepped)
        return loss


class _Predict(torch.nn.Module):
    """``predict(*inputs) -> output``: the model's forward on the state's weights."""

    def __init__(self, state: _State, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.state = state
        self.model = model
        self.names = names

    def forward(self, *inputs: Tensor) -> Tensor:
        weights = dict(zip(self.names, self.state.weights(), strict=True))
        return torch.func.functional_call(self.model, weights, inputs)


class _GetState(torch.nn.Module):
    """``get_state() -> (weights..., momentum buffers...)``."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def forward(self) -> tuple[Tensor, ...]:
        return tuple(buffer.clone() for buffer in self.state.weights() + self.state.momenta())


class _SetState(torch.nn.Module):
    """``set_state(weights..., momentum buffers...)``."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def forward(self, *values: Tensor) -> None:
        self.state.write(values)


def program_modules(
    model: torch.nn.Module, step: CapturedStep
) -> tuple[dict[str, torch.nn.Module], _State]:
    """The four methods as modules over one shared ``_State`` (for ``torch.export``; they run in eager
    too)."""
    weights = dict(model.named_parameters())
    state = _State(step, weights)
    modules: dict[str, torch.nn.Module] = {
        "train_step": _TrainStep(state, step),
        "predict": _Predict(state, model, step.spec.names()),
        "get_state": _GetState(state),
        "set_state": _SetState(state),
    }
    return modules, state


def export_program(
    model: torch.nn.Module,
    example_inputs: Sequence[Tensor],
    example_target: Tensor,
    *,
    optimizer: LARS,
    loss: str | Callable[[Tensor, Tensor], Tensor] = "mse",
    path: PathLike,
    partitioner: str | None = None,
    max_batch: int | None = None,
) -> TrainingProgram:
    """Write ``model`` trained by ``optimizer`` (a ``lars_fx.LARS`` over ``torch.optim.SGD``) as one
    ExecuTorch program at ``path`` (see the module docstring).

    ``loss``: ``"mse"``, ``"cross_entropy"`` or a callable ``loss(output, target)``. ``partitioner``: None
    (the portable kernels) or ``"xnnpack"`` (XNNPACK delegates what it can). ``max_batch``: dimension 0 of
    every input and of the target (the batch) may then be any size from 1 to ``max_batch`` at each call
    (memory is planned for ``max_batch``); by default the examples' shapes are the only ones. The program
    starts from the model's weights and the optimizer's momentum buffers now. Raises TypeError/ValueError,
    naming the parameter or module and the fix, for what the program cannot do exactly as
    ``optimizer.step()`` would.
    """
    if partitioner not in (None, "xnnpack"):
        raise ValueError(f"partitioner must be None or 'xnnpack', got {partitioner!r}")
    inputs = tuple(example_inputs)
    batch = _batch_dim(max_batch, inputs, example_target)
    spec = ProgramSpec.from_optimizer(optimizer, model)
    step = capture_step(model, inputs, example_target, spec, loss=loss, batch=batch)
    modules, state = program_modules(model, step)
    lr = torch.tensor(spec.lr, dtype=torch.float32)
    state_values = tuple(buffer.clone() for buffer in state.weights() + state.momenta())
    examples: dict[str, tuple[Tensor, ...]] = {
        "train_step": (*inputs, example_target, lr),
        "predict": inputs,
        "get_state": (),
        "set_state": state_values,
    }
    batched = () if batch is None else tuple({0: batch} for _ in inputs)
    dynamic_shapes: dict[str, Any] = {
        "train_step": None if batch is None else ((*batched, {0: batch}, None),),
        "predict": None if batch is None else (batched,),
        "get_state": None,
        "set_state": None,
    }
    with torch.no_grad():
        exported = {
            name: torch.export.export(
                modules[name], examples[name], dynamic_shapes=dynamic_shapes[name], strict=False
            )
            for name in METHODS
        }
    _refuse_sym_float(exported["train_step"])
    try:
        if partitioner == "xnnpack":
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

            # The weights are the program's state, not constants: XNNPACK takes the matmuls only when told
            # that their weights may change between calls.
            xnnpack = XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)
            edge = to_edge_transform_and_lower(exported, partitioner=[xnnpack])
        else:
            edge = to_edge(exported)
    except Exception as error:  # ExecuTorch's verifier: an op outside the Core ATen opset it has kernels for
        raise ValueError(_lowering_error(error)) from error
    program = edge.to_executorch(
        ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
        )
    )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    checked = target.with_name(target.name + ".partial")  # a program that does not load never reaches path
    checked.write_bytes(program.buffer)
    try:
        _check_loads(checked)
    except ValueError:
        checked.unlink()
        raise
    os.replace(checked, target)
    return TrainingProgram(target, step)


def _batch_dim(max_batch: int | None, inputs: tuple[Tensor, ...], target: Tensor) -> torch.export.Dim | None:
    if max_batch is None:
        return None
    sizes = {tensor.shape[0] if tensor.dim() else -1 for tensor in (*inputs, target)}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            f"max_batch={max_batch} makes dimension 0 of every input and of the target the batch, but the "
            f"examples' first dimensions are {[tuple(t.shape[:1]) for t in (*inputs, target)]}; give "
            "examples of one batch size, or max_batch=None for fixed shapes"
        )
    (size,) = sizes
    if not (isinstance(max_batch, int) and 2 <= size <= max_batch):
        raise ValueError(
            f"max_batch={max_batch!r} must be an int >= the examples' batch size {size}, and the examples' "
            "batch size at least 2 (torch.export specializes a size of 1)"
        )
    return torch.export.Dim("batch", min=1, max=max_batch)


def _refuse_sym_float(train_step: torch.export.ExportedProgram) -> None:
    if any(node.op == "call_function" and node.target is torch.sym_float for node in train_step.graph.nodes):
        raise ValueError(
            "the step divides by the batch size as a Python float (torch.sym_float; F.mse_loss's backward "
            "does so), which ExecuTorch cannot lower when max_batch lets the batch size change. Reduce the "
            "loss with .mean(dim=...) over every dimension, as loss='mse' does, or use max_batch=None"
        )


def _lowering_error(error: Exception) -> str:
    found = re.search(r"Operator (?:torch\._ops\.)?(\S+) is not in Core ATen opset", str(error))
    if found:
        return (
            f"the training step uses {found.group(1)}, which is not in the Core ATen opset ExecuTorch has "
            "kernels for (in the model's forward or its backward). Replace the layer that uses it"
        )
    first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return f"ExecuTorch could not lower the training program: {first_line}"


def _check_loads(path: Path) -> None:
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path)
    for name in METHODS:
        try:
            program.load_method(name)
        except Exception as error:  # the runtime raises RuntimeError, and logs the missing kernel's name
            raise ValueError(
                f"ExecuTorch's runtime cannot load the program's {name!r} method ({error}): an operator "
                "of the model has no kernel in this runtime (its log names it). Replace that layer, or try "
                "partitioner='xnnpack'"
            ) from error
