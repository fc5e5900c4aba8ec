"""LARS norms of sharded parameters (DTensor: FSDP2, tensor parallelism, HSDP): one all-reduce per step.

A sharded tensor's squared norm is the sum of its pieces' squared norms, each piece counted once. The
step computes on every rank the local sum of squares of each LARS weight and gradient (``to_local()``),
stacks all of them, of every param group, into one vector, and sums that vector over each process group
along which some LARS tensor is sharded: one all-reduce per sharding mesh dimension, whatever the number
of tensors. Then ``sqrt`` and the trust ratio (epsilon and weight decay applied to the reduced norms, never
to partial ones), and the update on the local shards.

Counting each piece once: along a process group where a tensor is sharded (``Shard``), every rank's piece
counts; along one where it is replicated (``Replicate``, a plain tensor, or a DTensor on a mesh without
that dimension, e.g. a LayerNorm FSDP2 shards over data parallel ranks only, beside tensor-parallel
weights), only the group's first rank counts it (a 0/1 weight): a sum of equal copies would not be
exact in floating point.

``NormReduction`` holds these decisions for every LARS parameter, made once when the optimizer's groups
are set up (not in the step, so a compiled step traces no process-group queries), and ``reduce`` performs
them. It uses functional collectives, which run eagerly and which Inductor compiles into the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

from . import _compat

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "NormReduction",
    "is_dtensor",
    "local",
    "local_gradient",
    "refuse_flat_parameters",
    "wrap_like",
]


def is_dtensor(tensor: object) -> TypeGuard[DTensor]:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The piece of ``tensor`` this rank holds (``tensor`` itself for a plain tensor); writes go through."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_gradient(param: Tensor, grad: Tensor, name: str) -> Tensor:
    """``grad``'s piece laid out as ``param``'s (a gradient placed differently is redistributed first)."""
    if not is_dtensor(param):
        if is_dtensor(grad):
            raise ValueError(
                f"LARS got a DTensor gradient for the plain parameter {name}: make the parameter a DTensor "
                "(distribute the module that owns it) or the gradient a plain tensor"
            )
        return grad
    if not is_dtensor(grad):
        raise ValueError(
            f"LARS got a plain gradient for the DTensor parameter {name}: a sharded parameter needs a "
            "DTensor gradient of the same mesh (as autograd, FSDP2 and tensor parallelism produce)"
        )
    if grad.device_mesh != param.device_mesh:
        raise ValueError(
            f"the gradient of {name} is on device mesh {grad.device_mesh}, its parameter on "
            f"{param.device_mesh}: LARS needs them on one mesh"
        )
    if tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad.to_local()


def wrap_like(param: Tensor, piece: Tensor) -> Tensor:
    """New state for ``param`` from this rank's ``piece``: a DTensor placed like ``param`` when it is one."""
    if not is_dtensor(param):
        return piece
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        piece, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def refuse_flat_parameters(params: Sequence[Tensor], names: Sequence[str]) -> None:
    """FSDP1 (``FullyShardedDataParallel``) hands the optimizer slices of a flat buffer: a rank's slice cuts
    layers at arbitrary points, so a per-tensor trust ratio of it would be wrong. Refuse before any step."""
    for param, name in zip(params, names, strict=True):
        if _compat.is_fsdp1_flat_parameter(param):
            raise ValueError(
                f"LARS cannot step {name}: it is a flat-parameter slice of FSDP1 (FullyShardedDataParallel), "
                "whose ranks hold arbitrary pieces of several layers, so a layer's norm is not the norm of "
                "any one tensor LARS sees. Shard the model with FSDP2 instead "
                "(torch.distributed.fsdp.fully_shard), whose parameters are DTensors that LARS reduces "
                "exactly, or use DistributedDataParallel"
            )


def _ranks(group: dist.ProcessGroup) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group))


def _order(ranks: tuple[int, ...]) -> tuple:
    """One order of collectives that all ranks agree on: groups of the same mesh dimension have the same
    size and the same rank offsets on every rank (e.g. (0, 2) and (1, 3) along a mesh's first dimension)."""
    return (len(ranks), tuple(r - ranks[0] for r in ranks))


class NormReduction:
    """Which process groups one step's squared-norm vector is summed over, and each LARS parameter's weight.

    Built from every LARS parameter of the optimizer (see the module docstring): ``weights[k]`` is 1.0 where
    this rank's piece of ``params[k]`` counts and 0.0 where another rank's copy does; ``reduce`` sums a vector
    of sums of squares over the ranks.
    """

    def __init__(self, groups: list[dist.ProcessGroup], weights: list[float]) -> None:
        self.groups = groups
        self.weights = weights

    @classmethod
    def of(cls, params: Sequence[Tensor], names: Sequence[str]) -> NormReduction | None:
        """The reduction for the LARS parameters ``params``; None when none is sharded (nothing to reduce).

        A parameter with a ``Partial`` placement is refused (a parameter holds values, not partial sums), and
        so are parameters sharded along process groups that are not dimensions of one mesh.
        """
        if not any(is_dtensor(p) for p in params):
            return None
        sharded_along: list[set[tuple[int, ...]]] = []
        groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        for param, name in zip(params, names, strict=True):
            along: set[tuple[int, ...]] = set()
            if is_dtensor(param):
                mesh = param.device_mesh
                for dim, placement in enumerate(param.placements):
                    if placement.is_partial():
                        raise ValueError(
                            f"LARS got parameter {name} with a Partial placement on mesh dimension {dim}: a "
                            "parameter must hold its values (Shard or Replicate); redistribute it first"
                        )
                    # Any placement but Replicate splits the tensor (Shard, and e.g. FSDP2's _StridedShard
                    # over TP).
                    if not placement.is_replicate() and mesh.size(dim) > 1:
                        group = mesh.get_group(dim)
                        ranks = _ranks(group)
                        groups.setdefault(ranks, group)
                        along.add(ranks)
            sharded_along.append(along)
        if not groups:
            return None  # DTensors replicated everywhere: every rank holds every value
        _check_orthogonal(list(groups), sharded_along, names)
        rank = dist.get_rank()
        # Along a group it is not sharded along, a parameter's piece counts on the group's first rank only.
        weights = [
            float(all(ranks in along or ranks[0] == rank for ranks in groups)) for along in sharded_along
        ]
        return cls([groups[ranks] for ranks in sorted(groups, key=_order)], weights)

    def reduce(self, squared: Tensor, weights: Sequence[float]) -> Tensor:
        """``squared`` (this rank's sums of squares, one entry per weight) summed over the ranks."""
        if not all(w == 1.0 for w in weights):
            squared = squared * torch.tensor(weights, dtype=squared.dtype, device=squared.device)
        for group in self.groups:
            squared = _all_reduce(squared, "sum", group)
        return squared

    def all_agree(self, flag: Tensor) -> Tensor:
        """The minimum of a 0/1 ``flag`` over the ranks (1 only where every rank says 1)."""
        for group in self.groups:
            flag = _all_reduce(flag, "min", group)
        return flag


def _check_orthogonal(
    groups: list[tuple[int, ...]], sharded_along: list[set[tuple[int, ...]]], names: Sequence[str]
) -> None:
    """Summing along one group after another counts every piece once only if the groups are the dimensions of
    one mesh (any two share this rank alone): parameters on unrelated meshes would be summed twice or lost."""
    for i, first in enumerate(groups):
        for second in groups[i + 1 :]:
            if len(set(first) & set(second)) != 1:
                on: dict[tuple[int, ...], str] = {}
                for along, name in zip(sharded_along, names, strict=True):
                    for ranks in along:
                        on.setdefault(ranks, name)
                raise ValueError(
                    f"LARS cannot reduce the norms of {on[first]} and {on[second]}: they are sharded along "
                    f"process groups {list(first)} and {list(second)}, which are not dimensions of one "
                    "device mesh. Put every parameter on one DeviceMesh or on submeshes of it (e.g. "
                    "mesh['dp'] and mesh['tp'])"
                )


def _all_reduce(tensor: Tensor, op: str, group: dist.ProcessGroup) -> Tensor:
    return _compat.functional_all_reduce(tensor, op, group)


def squared_norms(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``sum(t**2)`` of each tensor in ``dtype``, as 0-d tensors (one multi-tensor kernel where torch has
    one)."""
    if not tensors:
        return []
    one_kernel = _compat.foreach_powsum(tensors, dtype)  # under Dynamo, Inductor fuses the plain form anyway
    return one_kernel if one_kernel is not None else [torch.sum(torch.square(t.to(dtype))) for t in tensors]
