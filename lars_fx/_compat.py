"""The one place lars-fx touches private torch APIs.

Each need is one small function (for a base class, one name) whose docstring says on which torch versions
it was checked: "2.13" means run here by ``tests/test_compat.py`` (torch 2.13.0, CPU); "2.11" means the same
call ran in the whole suite on torch 2.11 before it moved here (docs/compiler.md, "Status and limits"), with
a fallback where the versions are known to differ. A torch that moves one of these breaks this module only,
and ``tests/test_compat.py`` names the function.

Imports only torch and the standard library: it sits below everything in lars-fx but the math
(``lars_fx.functional``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import CodeType
from typing import Any, cast

import torch
from torch import Tensor

# The base class of a pass Inductor runs on its post-grad graph, with a ``uuid`` for its caches (2.13, 2.11).
from torch._inductor.custom_graph_pass import CustomGraphPass

__all__ = [
    "CustomGraphPass",
    "TracedFrame",
    "as_compiling",
    "c10d_all_reduce_ops",
    "cache_entry_count",
    "compile_fx",
    "configured_post_grad_passes",
    "dynamo_is_tracing",
    "export_forward_backward",
    "foreach_powsum",
    "fresh_fake_mode",
    "functional_all_reduce",
    "generated_kernel_count",
    "hash_of_files",
    "inductor_config_patch",
    "is_fake",
    "is_fsdp1_flat_parameter",
    "override_init_group",
    "own_init_group",
    "recompile_limit",
    "recompile_limit_patch",
    "reset_inductor_metrics",
    "stable_topological_sort",
    "symint_hint",
    "traced_frame",
    "tracing",
]


# -- Dynamo: the frame it traces, its cache, its limit ---------------------------------------------


@dataclass(frozen=True)
class TracedFrame:
    """The frame Dynamo is tracing now: its local variables, its code object, and the backend it compiles
    for, unwrapped from torch.compile's and Dynamo's wrappers (the object given as ``backend=``, or the
    function a backend name resolved to)."""

    f_locals: dict[str, Any]
    code: CodeType
    backend: object


def traced_frame() -> TracedFrame | None:
    """The frame Dynamo is tracing on this thread; None outside a trace (2.13, 2.11:
    ``InstructionTranslator.current_tx()``)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        tx = InstructionTranslator.current_tx()  # its thread-local is unset outside a trace: AttributeError
    except AttributeError:
        return None
    if tx is None:
        return None
    return TracedFrame(dict(tx.f_locals), tx.f_code, _unwrapped_backend(tx.output.compiler_fn))


def _unwrapped_backend(backend: object) -> object:
    # WrapBackendDebug -> torch.compile's _TorchCompileWrapper -> [functools.partial ->] the backend
    for _ in range(8):
        attributes = ("_torchdynamo_orig_backend", "compiler_fn", "func")
        inner = next((getattr(backend, a) for a in attributes if hasattr(backend, a)), None)
        if inner is None or inner is backend:
            break
        backend = inner
    return backend


def cache_entry_count(code: CodeType) -> int:
    """How many compiled entries Dynamo's cache holds for ``code`` (2.13, 2.11:
    ``_debug_get_cache_entry_list``)."""
    return len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code))


def recompile_limit() -> int:
    """``torch._dynamo.config.recompile_limit`` (2.13, 2.11; ``cache_size_limit`` before torch 2.6)."""
    config = torch._dynamo.config
    return config.recompile_limit if hasattr(config, "recompile_limit") else config.cache_size_limit


def recompile_limit_patch(limit: int) -> contextlib.AbstractContextManager[None]:
    """Dynamo's recompile limit set to ``limit`` inside the block (2.13, 2.11; ``cache_size_limit`` before
    torch 2.6)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch({name: limit})


def dynamo_is_tracing() -> bool:
    """Whether Dynamo is tracing on this thread, also inside a function it runs untraced
    (``torch.compiler.disable``) (2.13: ``is_compiling()``; 2.11: its tracing context, which 2.13 has too)."""
    return torch.compiler.is_compiling() or torch._guards.TracingContext.try_get() is not None


# -- tracing: fake tensors and tracing contexts ----------------------------------------------------


@contextlib.contextmanager
def as_compiling() -> Iterator[None]:
    """``torch.compiler.is_compiling()`` is True inside the block, as in a trace (2.13, 2.11:
    ``_is_compiling_flag``)."""
    previous = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = previous


def fresh_fake_mode() -> Any:
    """A ``FakeTensorMode`` with a shape environment of its own and static shapes (2.13, 2.11)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)


def tracing(fake_mode: Any) -> contextlib.AbstractContextManager[Any]:
    """A tracing context of its own over ``fake_mode`` inside the block, where Inductor reads it
    (2.13, 2.11)."""
    return torch._guards.tracing(torch._guards.TracingContext(fake_mode))


def is_fake(tensor: object) -> bool:
    """Whether ``tensor`` is a FakeTensor (or a tensor subclass over one) (2.13, 2.11)."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return bool(_is_fake(tensor))


def symint_hint(value: Any) -> Any:
    """A symbolic integer as the number it stands for now (its hint); anything else unchanged
    (2.13, 2.11)."""
    return value.node.hint if isinstance(value, torch.SymInt) else value


# -- Inductor --------------------------------------------------------------------------------------


def compile_fx(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """Inductor's compiler for an ATen graph, called directly (2.13, 2.11: ``torch._inductor.compile_fx``)."""
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    return cast(Callable[..., Any], _compile_fx(gm, list(example_inputs)))


def inductor_config_patch(**settings: Any) -> contextlib.AbstractContextManager[None]:
    """Inductor's config set to ``settings`` inside the block, e.g. ``post_grad_custom_post_pass``,
    ``size_asserts``, ``fx_graph_cache`` (2.13, 2.11)."""
    from torch._inductor import config

    return config.patch(**settings)


def configured_post_grad_passes() -> list[Any]:
    """The post-grad passes configured in Inductor, as a list (2.13 holds one pass or a list; 2.11 one)."""
    from torch._inductor import config

    existing = config.post_grad_custom_post_pass
    if existing is None:
        return []
    return list(existing) if isinstance(existing, (list, tuple)) else [existing]


def hash_of_files(paths: tuple[str, ...]) -> bytes:
    """A hash of the files' contents, for a ``CustomGraphPass.uuid`` (2.13, 2.11: ``get_hash_for_files``)."""
    from torch._inductor.custom_graph_pass import get_hash_for_files

    return get_hash_for_files(paths)


def stable_topological_sort(graph: torch.fx.Graph) -> None:
    """Reorder ``graph`` in place so that every node follows its inputs, keeping the order otherwise
    (2.13, 2.11: Inductor's pattern matcher's)."""
    from torch._inductor.pattern_matcher import stable_topological_sort as _sort

    _sort(graph)


def reset_inductor_metrics() -> None:
    """Zero Inductor's counters, ``generated_kernel_count`` among them (2.13, 2.11)."""
    from torch._inductor import metrics

    metrics.reset()


def generated_kernel_count() -> int:
    """How many kernels Inductor generated since ``reset_inductor_metrics`` (2.13, 2.11)."""
    from torch._inductor import metrics

    return int(metrics.generated_kernel_count)


# -- distributed -----------------------------------------------------------------------------------


def functional_all_reduce(tensor: Tensor, op: str, group: Any) -> Tensor:
    """``tensor`` reduced with ``op`` ("sum", "min", ...) over ``group`` by a functional collective, waited
    for (2.13, 2.11: ``torch.distributed._functional_collectives``)."""
    import torch.distributed._functional_collectives as funcol

    reduced = funcol.all_reduce(tensor, op, group)
    if isinstance(reduced, funcol.AsyncCollectiveTensor):
        reduced = reduced.wait()
    return reduced


def c10d_all_reduce_ops() -> tuple[Any, Any]:
    """The graph ops ``all_reduce(tensor, op, group_name)`` and ``wait_tensor(tensor)`` that Inductor
    compiles into a graph (2.13, 2.11: ``torch.ops._c10d_functional``)."""
    ops = torch.ops._c10d_functional
    return ops.all_reduce.default, ops.wait_tensor.default


def is_fsdp1_flat_parameter(tensor: object) -> bool:
    """Whether ``tensor`` is a slice of an FSDP1 (``FullyShardedDataParallel``) flat parameter
    (2.13, 2.11: ``_fsdp_flattened``)."""
    return bool(getattr(tensor, "_fsdp_flattened", False))


# -- torch.export ----------------------------------------------------------------------------------


def export_forward_backward(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The joint forward-backward graph of an exported program whose first output is a loss: the loss, then
    one gradient per trainable parameter, outputs of kind ``GRADIENT_TO_PARAMETER`` (2.13: the API
    ExecuTorch's training uses, ``torch.export.experimental._export_forward_backward``)."""
    from torch.export.experimental import _export_forward_backward

    return _export_forward_backward(program)


# -- kernels ---------------------------------------------------------------------------------------


def foreach_powsum(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor] | None:
    """``sum(t**2)`` of each tensor in ``dtype`` by one multi-tensor kernel (2.13: ``_foreach_powsum``);
    None where torch has none (2.11) or while Dynamo traces (it cannot trace this kernel)."""
    if not hasattr(torch, "_foreach_powsum") or torch.compiler.is_compiling():
        return None
    return list(torch._foreach_powsum(list(tensors), 2, dtype=dtype))


# -- torch.optim.SGD -------------------------------------------------------------------------------


def own_init_group(optimizer: torch.optim.Optimizer, group: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """The optimizer type's own ``_init_group`` (``torch.optim.SGD``'s, ``Adam``'s, which ``AdamW``
    inherits): its ``step`` calls it per param group before it moves anything, and Dynamo runs it for real
    while it traces the step (SGD: 2.13, 2.11; Adam: 2.13)."""
    return type(optimizer)._init_group(optimizer, group, *args, **kwargs)  # type: ignore[attr-defined]


def override_init_group(optimizer: torch.optim.Optimizer, replacement: Callable[..., Any]) -> bool:
    """Make ``replacement`` the ``_init_group`` of ``optimizer`` (on the instance: ``step`` calls it through
    ``self``); False, changing nothing, if the instance has one of its own already (2.13, 2.11)."""
    if "_init_group" in vars(optimizer):
        return False
    optimizer._init_group = replacement  # type: ignore[attr-defined]
    return True
