"""``torch.compile(sgd.step, backend="lars_fx")`` over sharded (DTensor) parameters on 2 gloo ranks.

One spawn (``dist_harness.run_on_ranks``) runs FSDP2 (an uneven layer, two param groups) and tensor
parallelism with plain parameters beside DTensors (over ``SGD(foreach=False)``: torch's foreach SGD cannot
take a mixed plain/DTensor list), FSDP2 with gradients placed unlike their parameters (LARS redistributes
them, the backend refuses them), and returns per rank the full parameters after each step, the all-reduces of
each step (``torch.profiler``) and the type of the momentum buffers; the tests compare them with the
single-process full-batch float64 run of ``lars_fx.LARS(..., foreach=False)``.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn

import lars_fx
from dist_harness import count_collectives, run_on_ranks

WORLD_SIZE = 2
STEPS = 5
COEFFICIENT = 0.02
GROUPS = ({"lr": 0.1, "weight_decay": 1e-3}, {"lr": 0.05, "weight_decay": 5e-4})
TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8, dtype=torch.float64)
        self.fc2 = nn.Linear(8, 7, dtype=torch.float64)  # 7 rows: uneven over 2 ranks under FSDP2
        self.LayerNorm = nn.LayerNorm(7, dtype=torch.float64)
        self.head = nn.Linear(7, 3, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.LayerNorm(self.fc2(torch.tanh(self.fc1(x)))))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(8, 6, generator=generator, dtype=torch.float64), torch.randn(8, 3, generator=generator,
                                                                                     dtype=torch.float64)


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if n.startswith("fc")], **GROUPS[0]},
        {"params": [(n, p) for n, p in named if not n.startswith("fc")], **GROUPS[1]},
    ]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # A copy: full_tensor() of a Replicate DTensor is its local tensor, which the next step writes.
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()).clone()


def _run(layout: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = _Net()
    mesh = init_device_mesh("cpu", (world,))
    x, y = _data()
    if layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)
        x, y, scale = x.chunk(world)[rank], y.chunk(world)[rank], float(world)  # FSDP2 averages the gradients
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        scale = 1.0
    sgd = torch.optim.SGD(_groups(model), lr=0.1, momentum=0.9, foreach=layout == "fsdp2")
    step = torch.compile(sgd.step, backend="lars_fx", options={"coefficient": COEFFICIENT})
    trajectory, all_reduces = [], []
    for _ in range(STEPS):
        (((model(x) - y) ** 2).sum() * scale).backward()
        _, counts = count_collectives(step)
        all_reduces.append(counts.get("all_reduce", 0))
        sgd.zero_grad()
        trajectory.append([_full(p) for p in model.parameters()])
    from torch.distributed.tensor import DTensor

    buffer_types = {
        name: tuple(
            "DTensor" if isinstance(t, DTensor) else "plain" for t in (p, sgd.state[p]["momentum_buffer"])
        )
        for name, p in model.named_parameters()
    }
    return {"trajectory": trajectory, "all_reduces": all_reduces, "buffer_types": buffer_types}


def _replicated_gradients() -> dict[str, Any]:
    """FSDP2 parameters whose gradients are Replicate DTensors (placed unlike them): LARS redistributes them
    to the parameters' Shard(0) before it steps; the backend refuses them."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = _Net()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    x, y = _data()
    x, y = x.chunk(world)[rank], y.chunk(world)[rank]

    def backward() -> None:
        (((model(x) - y) ** 2).sum() * world).backward()
        for p in model.parameters():
            p.grad = p.grad.redistribute(mesh, [Replicate()])

    backward()
    sgd = torch.optim.SGD(_groups(model), lr=0.1, momentum=0.9)
    try:
        torch.compile(sgd.step, backend="lars_fx", options={"coefficient": COEFFICIENT})()
        refusal = None
    except Exception as error:  # Dynamo wraps the backend's error
        refusal = str(error)
    torch._dynamo.reset()
    sgd = torch.optim.SGD(_groups(model), lr=0.1, momentum=0.9)  # a fresh one: the backend claimed the first
    opt = lars_fx.LARS(sgd, coefficient=COEFFICIENT)
    trajectory = []
    for step in range(STEPS):
        if step:
            backward()
        opt.step()
        opt.zero_grad()
        trajectory.append([_full(p) for p in model.parameters()])
    return {"trajectory": trajectory, "refusal": refusal}


def _ranks() -> dict[str, Any]:
    results = {layout: _run(layout) for layout in ("fsdp2", "tp")}
    results["replicated_gradients"] = _replicated_gradients()
    return results


@functools.cache
def _results() -> list[dict[str, Any]]:
    return run_on_ranks(_ranks, WORLD_SIZE, bound_s=300)


@functools.cache
def _reference() -> list[list[torch.Tensor]]:
    torch.manual_seed(0)
    model = _Net()
    opt = lars_fx.LARS(
        torch.optim.SGD(_groups(model), lr=0.1, momentum=0.9), coefficient=COEFFICIENT, foreach=False
    )
    x, y = _data()
    trajectory = []
    for _ in range(STEPS):
        ((model(x) - y) ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory


@pytest.mark.parametrize("layout", ["fsdp2", "tp"])
def test_backend_over_dtensors_matches_the_full_batch_reference(layout: str) -> None:
    for rank_result in _results():
        for step, (got, want) in enumerate(zip(rank_result[layout]["trajectory"], _reference(), strict=True)):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, **TOLERANCE, msg=f"{layout}, step {step}")


@pytest.mark.parametrize("layout", ["fsdp2", "tp"])
def test_backend_over_dtensors_issues_one_all_reduce_per_step(layout: str) -> None:
    for rank_result in _results():
        assert rank_result[layout]["all_reduces"] == [1] * STEPS


@pytest.mark.parametrize("layout", ["fsdp2", "tp"])
def test_backend_momentum_buffers_stay_placed_as_their_parameters(layout: str) -> None:
    for rank_result in _results():
        for name, (param_type, buffer_type) in rank_result[layout]["buffer_types"].items():
            assert buffer_type == param_type, (
                f"{name}: a {param_type} parameter with a {buffer_type} momentum buffer"
            )


def test_lars_redistributes_gradients_placed_unlike_their_parameters() -> None:
    for rank_result in _results():
        for step, (got, want) in enumerate(
            zip(rank_result["replicated_gradients"]["trajectory"], _reference(), strict=True)
        ):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, **TOLERANCE, msg=f"step {step}")


def test_backend_refuses_gradients_placed_unlike_their_parameters() -> None:
    for rank_result in _results():
        refusal = rank_result["replicated_gradients"]["refusal"]
        assert refusal is not None and "placed" in refusal and "lars_fx.LARS(sgd" in refusal, refusal
