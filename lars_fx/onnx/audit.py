"""Torch gradient rules that the ONNX export would drop, found while the exporter traces the model.

torch.onnx exports the forward ops; ONNX Runtime then builds the backward from them with its own
gradient rules. Whatever torch's autograd does beyond differentiating those ops is lost: a
``detach()`` or ``torch.no_grad()`` (exported as nothing), a custom ``autograd.Function``'s backward, a
gradient hook, ``nn.Embedding``'s ``padding_idx`` (ORT's gradient of ``Gather`` trains the padding
row), ``max_norm`` (the in-place renorm is not exported), ``scale_grad_by_freq``, ``sparse``, and
buffers written in forward (state ORT never updates). A
``GradientAudit`` is a ``TorchFunctionMode`` active only while the model (and a callable loss) runs
under the exporter's trace: it checks every embedding call, marks the indices of padded lookups
(so that ``EmbeddingPaddingPass`` finds them in the training graph and restores the padding rule),
and follows every gradient stop to see whether the model's output depends on it. ``check`` raises
ValueError for what cannot be exported exactly.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["GradientAudit", "refuse_gradient_hooks"]

# Ops whose results depend on their inputs' shapes only: no gradient path, in torch or in ORT.
_VALUE_FREE = {
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
    torch.rand_like, torch.randn_like, torch.randint_like,
    Tensor.new_zeros, Tensor.new_ones, Tensor.new_empty, Tensor.new_full,
}  # fmt: skip
_EMBEDDING_SIGNATURE = inspect.signature(F.embedding)


class GradientAudit(TorchFunctionMode):
    """Checks, while active, the embedding calls and the gradient stops of a forward pass.

    ``trained`` are the parameters whose gradients the artifacts compute: a ``detach()`` or
    ``no_grad`` matters only where a trained parameter lies behind it (a frozen backbone run under
    ``torch.no_grad()`` exports exactly, since ORT computes no gradient for frozen parameters).
    """

    def __init__(self, model: torch.nn.Module, trained: Iterable[str]) -> None:
        super().__init__()
        self._names = {id(p): name for name, p in model.named_parameters()}  # first names: the exporter's
        self._modules = dict(model.named_modules())
        self._model = model
        self._buffers = {id(b): name for name, b in model.named_buffers()}
        self._changed_buffers: list[str] = []
        trained = set(trained)
        self._trained = {id(p) for name, p in model.named_parameters() if name in trained}
        self.padding: dict[str, set[int]] = {}
        self.refusals: list[str] = []
        # id(tensor) -> (weak reference, the gradient stop it descends from); ids of dead tensors are reused.
        self._cuts: dict[int, tuple[weakref.ref, str]] = {}
        self._output_cut: str | None = None
        self._custom_functions: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            args, kwargs = self._embedding(args, kwargs)
        elif func is torch.embedding and _aten_padding_idx(args, kwargs) >= 0:
            self.refusals.append(
                f"torch.embedding(..., padding_idx={_aten_padding_idx(args, kwargs)}) is called directly; "
                "the export keeps padding_idx for F.embedding and nn.Embedding. Call F.embedding"
            )
        elif func is F.embedding_bag:
            self.refusals.append(
                f"{self._owner(args[1] if len(args) > 1 else kwargs.get('weight'), 'nn.EmbeddingBag')} is "
                "exported as an ONNX Loop, whose gradient ONNX Runtime 1.19 cannot build. Use nn.Embedding "
                "and reduce the bag yourself (e.g. .sum(dim=1), .mean(dim=1) or .amax(dim=1))"
            )
        elif func is F.batch_norm and _batch_norm_tracks_stats(args, kwargs):
            self.refusals.append(
                "F.batch_norm in training mode with running statistics cannot be exported for on-device "
                "training: ORT's training graph does not update running_mean/running_var. Use LayerNorm or "
                "GroupNorm"
            )
        if self._buffers and (buffer := self._buffers.get(id(_written_tensor(func, args, kwargs)))):
            self._changed_buffers.append(buffer)
        inputs = list(_tensors((args, kwargs)))
        inherited = next((cut for t in inputs if (cut := self._cut_of(t)) is not None), None)
        # Histories taken before the call: detach_() erases its input's.
        histories = [(t, t.grad_fn) for t in inputs if t.requires_grad and t.is_floating_point()]
        result = func(*args, **kwargs)
        written = [args[0]] if func is Tensor.__setitem__ else []  # the one in-place op that returns None
        for output in [*_tensors(result), *written]:
            if not output.is_floating_point():
                continue
            if inherited is not None:
                self._mark(output, inherited)
            elif self._stops_gradient(func, histories, output):
                self._mark(output, _describe_stop(func))
        return result

    def finish(self, output: Any) -> None:
        """Called with the traced forward's result (inside the trace, before its tensors are freed)."""
        tensors = list(_tensors(output))
        self._output_cut = next((cut for t in tensors if (cut := self._cut_of(t)) is not None), None)
        self._custom_functions = sorted(
            _custom_functions(t.grad_fn for t in tensors if t.grad_fn is not None)
        )
        self._changed_buffers += [
            name for name, b in self._model.named_buffers() if id(b) not in self._buffers
        ]

    def check(self) -> dict[str, set[int]]:
        """Raise ValueError for what cannot be exported exactly; else the padding rows of the trained
        embedding weights' padded lookups, by parameter name."""
        refusals = list(dict.fromkeys(self.refusals))
        if self._changed_buffers:
            refusals.append(
                f"buffers {sorted(set(self._changed_buffers))} change in forward (written in place or "
                "replaced): torch carries that state from step to step, while the exported graph holds their "
                "values at export, which ONNX Runtime never updates. Keep that state out of the model's "
                "forward"
            )
        if self._custom_functions:  # a Function's forward runs under no_grad: its stops are its own
            refusals += [_custom_function_refusal(name) for name in self._custom_functions]
        elif self._output_cut is not None:
            refusals.append(
                f"the model's output depends on {self._output_cut} of a value computed from trained "
                "parameters: torch's gradient stops there, but the ONNX export drops the stop and ONNX "
                "Runtime would differentiate through it. Remove the stop, or freeze the parameters behind it "
                "(keep them out of the optimizer or set requires_grad=False)"
            )
        if refusals:
            raise ValueError("; ".join(refusals))
        return {name: set(rows) for name, rows in self.padding.items()}

    # -- embeddings --------------------------------------------------------------------------------

    def _embedding(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Check one ``F.embedding`` call; a padded lookup of a trained weight gets its indices marked."""
        bound = _EMBEDDING_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        weight, padding_idx = call["weight"], call["padding_idx"]
        name = self._names.get(id(weight))
        owner = self._owner(weight, "nn.Embedding")
        if call["max_norm"] is not None:
            self.refusals.append(
                f"{owner} has max_norm={call['max_norm']}: torch renormalises the looked-up rows of the "
                "weight in place in every forward, which the ONNX export drops. Use max_norm=None"
            )
        trained = id(weight) in self._trained if name is not None else weight.requires_grad
        if not trained:
            return args, kwargs
        if call["scale_grad_by_freq"]:
            self.refusals.append(
                f"{owner} has scale_grad_by_freq=True: ONNX Runtime's gradient of Gather does not divide by "
                "the frequency of each index in the batch. Use scale_grad_by_freq=False"
            )
        if call["sparse"]:
            self.refusals.append(
                f"{owner} has sparse=True: its gradient is sparse in torch, which lars_fx.LARS refuses (the "
                "trust ratio needs the whole gradient). Use sparse=False"
            )
        if padding_idx is None:
            return args, kwargs
        if name is None:
            self.refusals.append(
                f"an embedding with padding_idx={padding_idx} looks up a tensor computed in forward, not a "
                "parameter of the model; the export applies padding_idx to parameters only. Look up the "
                "parameter itself"
            )
            return args, kwargs
        row = padding_idx + weight.size(0) if padding_idx < 0 else padding_idx
        self.padding.setdefault(name, set()).add(row)
        # The same indices, in a form EmbeddingPaddingPass finds in the training graph (see its docstring).
        indices = call["input"]
        call["input"] = torch.where(indices == row, row, indices)
        return bound.args, bound.kwargs

    # -- gradient stops ----------------------------------------------------------------------------

    def _mark(self, tensor: Tensor, cut: str) -> None:
        self._cuts[id(tensor)] = (weakref.ref(tensor), cut)

    def _cut_of(self, tensor: Tensor) -> str | None:
        entry = self._cuts.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    def _stops_gradient(self, func: Any, histories: list[tuple[Tensor, Any]], output: Tensor) -> bool:
        """Whether ``func`` cut ``output`` off from the autograd history of a trained parameter."""
        if not histories or output.requires_grad or func in _VALUE_FREE:
            return False
        return any(self._behind_trained(t, grad_fn) for t, grad_fn in histories)

    def _behind_trained(self, tensor: Tensor, grad_fn: Any) -> bool:
        """Whether a trained parameter lies in the autograd history (``grad_fn``) of ``tensor``."""
        if grad_fn is None:
            return id(tensor) in self._trained
        return any(id(leaf) in self._trained for leaf in _leaves(grad_fn))

    # -- names ---------------------------------------------------------------------------------------

    def _owner(self, weight: Tensor | None, kind: str) -> str:
        """``nn.Embedding 'emb'`` for a module's weight, else the parameter's name or a computed tensor."""
        name = self._names.get(id(weight)) if weight is not None else None
        if name is None:
            return f"an {kind} lookup of a computed tensor"
        module_name, _, attribute = name.rpartition(".")
        module = self._modules.get(module_name)
        if attribute == "weight" and module is not None and type(module).__name__ == kind.removeprefix("nn."):
            return f"{kind} {module_name or '(the model)'!r}"
        return f"the {kind} lookup of parameter {name!r}"


def refuse_gradient_hooks(model: torch.nn.Module, trained: Iterable[str]) -> None:
    """Raise ValueError if a trained parameter has a gradient hook: it would not be exported."""
    trained = set(trained)
    hooked = [
        name
        for name, p in model.named_parameters()
        if name in trained
        and (getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None))
    ]
    if hooked:
        raise ValueError(
            f"parameters {hooked} have gradient hooks (register_hook or register_post_accumulate_grad_hook); "
            "the ONNX export cannot run them on the device, so ONNX Runtime's gradients would differ. Remove "
            "the hooks"
        )


def _tensors(tree: Any) -> Iterator[Tensor]:
    """The tensors in nested tuples, lists and dicts (the arguments and results of torch calls)."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _written_tensor(func: Any, args: tuple, kwargs: dict) -> Any:
    """The tensor an in-place call writes (``x.add_(...)``, ``x[i] = ...``, ``out=x``), else None."""
    if isinstance(kwargs.get("out"), Tensor):
        return kwargs["out"]
    name = getattr(func, "__name__", "")
    in_place = name in {"__setitem__", "__set__"} or (name.endswith("_") and not name.startswith("_"))
    return args[0] if in_place and args else None


def _aten_padding_idx(args: tuple, kwargs: dict) -> int:
    """``torch.embedding(weight, indices, padding_idx=-1, ...)``'s padding_idx (-1: none)."""
    padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx", -1)
    return int(padding_idx) if padding_idx is not None else -1


def _batch_norm_tracks_stats(args: tuple, kwargs: dict) -> bool:
    names = ("input", "running_mean", "running_var", "weight", "bias", "training")
    call = dict(zip(names, args, strict=False)) | kwargs  # the positional ones, however many were given
    return bool(call.get("training", False)) and call.get("running_mean") is not None


def _describe_stop(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a property, e.g. Tensor.data
        name = f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', '?')}"
    elif name in {"detach", "detach_"}:
        name = f"Tensor.{name}()"
    if not torch.is_grad_enabled():
        return f"{name} under torch.no_grad()"
    return name


def _nodes(roots: Iterable[Any]) -> Iterator[Any]:
    """The autograd graph's nodes reachable from ``roots``, each once."""
    seen: dict[int, Any] = {}  # holds the nodes, so that their ids stay theirs
    stack = list(roots)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        yield node
        stack.extend(child for child, _ in node.next_functions if child is not None)


def _leaves(grad_fn: Any) -> Iterator[Tensor]:
    for node in _nodes([grad_fn]):
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf tensor
        if variable is not None:
            yield variable


def _custom_functions(roots: Iterable[Any]) -> set[str]:
    """The names of the custom ``autograd.Function`` classes in the graph (``MyFn`` for ``MyFnBackward``)."""
    return {
        type(node).__name__.removesuffix("Backward")
        for node in _nodes(roots)
        if isinstance(node, torch.autograd.function.BackwardCFunction)
    }


def _custom_function_refusal(name: str) -> str:
    if name == "BackwardHookFunction":  # what register_full_backward_hook wraps a module's output in
        return (
            "a module has a backward hook (register_full_backward_hook or register_full_backward_pre_hook): "
            "the ONNX export cannot run it on the device, so ONNX Runtime's gradients would differ. Remove "
            "the hook"
        )
    return (
        f"the model uses the custom autograd.Function {name}: its backward is not exported, ONNX Runtime "
        "differentiates the exported forward ops instead. Write it with differentiable torch ops"
    )

