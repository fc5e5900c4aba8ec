"""``LARS(fused=True)`` over sharded (DTensor) parameters on 2 gloo ranks: FSDP2 and tensor parallelism with
plain parameters beside DTensors.

One spawn (``dist_harness.run_on_ranks``) runs every configuration and returns, per rank, the full parameters
after each step, the collectives of each ``opt.step()`` (counted with ``torch.profiler``), telemetry and the
compiled graph's text; the tests compare them with the single-process full-batch float64 run of the per-tensor
reference (``foreach=False``), computed here. The FSDP2 run also writes its weights between steps in the ways
a carried ``||w||^2`` would miss (``torch._foreach_mul_`` on DTensors, ``p.to_local().mul_``); the reference
sees the same writes.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import lars_fx
from dist_harness import count_collectives, run_on_ranks

WORLD_SIZE = 2
STEPS = 6
GLOBAL_BATCH = 8
COEFFICIENT = 0.02  # larger than the default so that a wrong trust ratio moves the weights visibly
TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}  # float64 rounding over a few steps; a stale norm is ~1e-3 off
GROUP_SETTINGS = ({"lr": 0.1, "weight_decay": 1e-3}, {"lr": 0.05, "weight_decay": 5e-4})
VARIANTS = {"momentum": {"momentum": 0.9, "dampening": 0.1}, "nesterov": {"momentum": 0.9, "nesterov": True}}
# Writes into every weight before these steps: (step, how). Step 0 is eager (it creates the momentum buffers),
# step 1 the first compiled one, so the writes come between compiled steps.
WRITES = ((2, "foreach"), (4, "to_local"))
CONFIGS = {  # name: (layout, variant, writes, telemetry)
    "fsdp2_momentum": ("fsdp2", "momentum", WRITES, True),
    "fsdp2_nesterov": ("fsdp2", "nesterov", (), False),
    "tp_mixed": ("tp", "momentum", (), True),
}


class Net(nn.Module):
    """fc1 (``hidden`` output rows) -> tanh -> fc2 -> LayerNorm -> tanh -> fc3 (3 rows: uneven under FSDP2).

    LARS weights fc1, fc2, fc3; biases and the LayerNorm are not LARS (the default filter). FSDP2 gets 7
    hidden rows (uneven shards); tensor parallelism (fc1 column-wise, fc2 row-wise, whose implicit
    ``from_local`` needs even pieces) 8, and the LayerNorm and fc3 stay plain tensors there.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, hidden)
        self.fc2 = nn.Linear(hidden, 6)
        self.LayerNorm = nn.LayerNorm(6)
        self.fc3 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.tanh(self.LayerNorm(self.fc2(torch.tanh(self.fc1(x))))))


def build_net(layout: str) -> Net:
    torch.manual_seed(0)
    return Net(7 if layout == "fsdp2" else 8).double()


def batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return (
        torch.randn(GLOBAL_BATCH, 5, dtype=torch.float64, generator=generator),
        torch.randn(GLOBAL_BATCH, 3, dtype=torch.float64, generator=generator),
    )


def make_lars(model: nn.Module, variant: str, telemetry: bool, **options: Any) -> lars_fx.LARS:
    """Two param groups (fc1 and the LayerNorm; fc2 and fc3) with their own lr and weight decay."""
    named = list(model.named_parameters())
    groups = [
        {
            "params": [(n, p) for n, p in named if n.startswith(("fc1", "LayerNorm")) == (index == 0)],
            **settings,
        }
        for index, settings in enumerate(GROUP_SETTINGS)
    ]
    sgd = torch.optim.SGD(groups, lr=0.1, **VARIANTS[variant])
    return lars_fx.LARS(sgd, coefficient=COEFFICIENT, telemetry=telemetry, **options)


def write_weights(model: nn.Module, how: str) -> None:
    params = list(model.parameters())
    if how == "foreach":
        torch._foreach_mul_(params, 0.5)
    else:
        for p in params:
            (p.to_local() if hasattr(p, "to_local") else p).mul_(0.5)


def telemetry_records(opt: lars_fx.LARS) -> list[dict[str, Any]]:
    return [] if opt.telemetry is None else opt.telemetry.to_records()


# -- the single-process reference (in the test process) ---------------------------------------


@functools.cache
def reference(layout: str, variant: str, writes: tuple, telemetry: bool) -> dict[str, Any]:
    model = build_net(layout)
    opt = make_lars(model, variant, telemetry, foreach=False)
    trajectory = []
    with torch.no_grad():
        for step in range(STEPS):
            if step in dict(writes):
                write_weights(model, dict(writes)[step])
            x, y = batch(step)
            with torch.enable_grad():
                nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return {"trajectory": trajectory, "telemetry": telemetry_records(opt)}


# -- on the ranks -----------------------------------------------------------------------------


def _sharded_net(layout: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    model = build_net(layout)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    if layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    return model


def _local_batch(layout: str, step: int) -> tuple[Tensor, Tensor]:
    """FSDP2: this rank's half of the batch (FSDP2 averages the gradients); TP: the whole batch."""
    import torch.distributed as dist

    x, y = batch(step)
    if layout == "tp":
        return x, y
    return x.chunk(WORLD_SIZE)[dist.get_rank()], y.chunk(WORLD_SIZE)[dist.get_rank()]


def _full(tensor: Tensor) -> Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _run(layout: str, variant: str, writes: tuple, telemetry: bool, steps: int = STEPS) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from lars_fx.fused import inspect_step

    model = _sharded_net(layout)
    opt = make_lars(model, variant, telemetry, fused=True, carry_weight_norms=True)
    trajectory, collectives, graph = [], [], None
    for step in range(steps):
        if step in dict(writes):
            with torch.no_grad():
                write_weights(model, dict(writes)[step])
        x, y = _local_batch(layout, step)
        nn.functional.mse_loss(model(x), y).backward()
        if step == 1:  # the graph the compiled steps run (nothing is stepped)
            report = inspect_step(opt, compile=False)
            graph = report.stages[-1][1] if report.stages else f"fallback: {report.fallback}"
        _, counts = count_collectives(opt.step)
        collectives.append(dict(counts))
        opt.zero_grad()
        trajectory.append({n: _full(p) for n, p in model.named_parameters()})
    fused = opt.fused_step
    return {
        "trajectory": trajectory,
        "collectives": collectives,
        "compile_count": fused.compile_count,
        "fallback": fused.fallback,
        "carried": [compiled.carry is not None for compiled in fused.cache.graphs()],
        "graph": graph,
        "buffers": {  # a DTensor exactly where the parameter is one
            n: isinstance(opt.state[p]["momentum_buffer"], DTensor) == isinstance(p, DTensor)
            for n, p in model.named_parameters()
        },
        "dtensors": [n for n, p in model.named_parameters() if isinstance(p, DTensor)],
        "telemetry": telemetry_records(opt),
    }


def _run_with_reduction_switched_off() -> dict[str, Any]:
    """``LARS_FX_DISABLE=reduce_sharded_norms``: the graph would use a shard's norms, so the step runs
    eagerly."""
    os.environ["LARS_FX_DISABLE"] = "reduce_sharded_norms"
    try:
        return _run("fsdp2", "nesterov", (), False, steps=3)
    finally:
        del os.environ["LARS_FX_DISABLE"]


def sharded_job() -> dict[str, Any]:
    results = {name: _run(*config) for name, config in CONFIGS.items()}
    results["reduction_switched_off"] = _run_with_reduction_switched_off()
    return results


# -- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_on_ranks(sharded_job, WORLD_SIZE, bound_s=240)


def per_rank(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [rank_results[name] for rank_results in results]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trajectory_equals_single_process_reference(results: list[dict[str, Any]], name: str) -> None:
    layout, variant, writes, telemetry = CONFIGS[name]
    expected = reference(layout, variant, writes, telemetry)["trajectory"]
    for rank, result in enumerate(per_rank(results, name)):
        assert result["fallback"] is None and result["compile_count"] == 1, (rank, result["fallback"])
        for step, (got, want) in enumerate(zip(result["trajectory"], expected, strict=True)):
            assert got.keys() == want.keys()
            for param in want:
                torch.testing.assert_close(
                    got[param],
                    want[param],
                    **TOLERANCE,
                    msg=lambda m, s=step, p=param, r=rank: f"{name} rank {r} step {s} {p}: {m}",
                )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_all_reduce_per_step_inside_the_graph(results: list[dict[str, Any]], name: str) -> None:
    """Every step issues exactly one collective, an all-reduce: the eager first step, the compiling one, and
    the compiled ones, whose graph holds the functional all-reduce (and no carried weight norms)."""
    for rank, result in enumerate(per_rank(results, name)):
        assert result["collectives"] == [{"all_reduce": 1}] * STEPS, (rank, result["collectives"])
        assert result["graph"].count("torch.ops._c10d_functional.all_reduce.default(") == 1, result["graph"]
        assert result["graph"].count("torch.ops._c10d_functional.wait_tensor.default(") == 1
        assert "carried_w_sq_norm" not in result["graph"]
        assert result["carried"] == [False]


def test_graph_counts_replicated_pieces_once(results: list[dict[str, Any]]) -> None:
    """TP with plain fc3 and LayerNorm: the plain LARS weight fc3 counts on rank 0 only (its squared norms are
    multiplied by 0 on rank 1); FSDP2 shards every LARS weight, so nothing is weighted."""
    for rank, result in enumerate(per_rank(results, "tp_mixed")):
        assert set(result["dtensors"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        # [||w||^2 of fc1, fc2, fc3, ||g||^2 of fc1, fc2, fc3]
        weighted = (
            r"lars_fx_passes_fx_reduce_sharded_norms_weighted\(\w+, \(1\.0, 1\.0, 0\.0, 1\.0, 1\.0, 0\.0\)\)"
        )
        assert (re.search(weighted, result["graph"]) is not None) == (rank == 1), result["graph"]
        assert rank == 1 or "weighted(" not in result["graph"]
    for result in per_rank(results, "fsdp2_momentum"):
        assert len(result["dtensors"]) == 8
        assert "weighted(" not in result["graph"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_momentum_buffers_stay_dtensors(results: list[dict[str, Any]], name: str) -> None:
    for result in per_rank(results, name):
        assert all(result["buffers"].values()), result["buffers"]


@pytest.mark.parametrize("name", ["fsdp2_momentum", "tp_mixed"])
def test_telemetry_records_global_norms(results: list[dict[str, Any]], name: str) -> None:
    layout, variant, writes, telemetry = CONFIGS[name]
    expected = reference(layout, variant, writes, telemetry)["telemetry"]
    assert len(expected) == 3 * STEPS
    for rank, result in enumerate(per_rank(results, name)):
        got = {(r["step"], r["param"]): r for r in result["telemetry"]}
        assert sorted(got) == sorted((r["step"], r["param"]) for r in expected)
        for record in expected:
            actual = got[record["step"], record["param"]]
            for field in ("w_norm", "g_norm", "trust_ratio"):
                assert actual[field] == pytest.approx(record[field], rel=1e-12), (rank, record, actual)


def test_without_the_reduction_pass_the_step_runs_eagerly(results: list[dict[str, Any]]) -> None:
    expected = reference("fsdp2", "nesterov", (), False)["trajectory"][:3]
    for result in per_rank(results, "reduction_switched_off"):
        assert "reduce_sharded_norms must run before insert_trust_ratio" in result["fallback"]
        # inspect_step reports it too
        assert "reduce_sharded_norms must run before insert_trust_ratio" in result["graph"]
        assert result["collectives"] == [{"all_reduce": 1}] * 3
        for got, want in zip(result["trajectory"], expected, strict=True):
            for param in want:
                torch.testing.assert_close(got[param], want[param], **TOLERANCE)


def test_graphs_without_sharded_parameters_are_untouched() -> None:
    """The pass leaves a graph over plain tensors as it is: every later stage equals the pipeline's without
    it."""
    from lars_fx.fused import FusedStep, _plan, _request, _step_function
    from lars_fx.passes.fx_canonicalize import canonicalize
    from lars_fx.passes.fx_pipeline import run_pipeline
    from lars_fx.passes.pipelines import LARS_SGD

    model = build_net("fsdp2")
    opt = make_lars(model, "nesterov", True, fused=True)
    nn.functional.mse_loss(model(batch(0)[0]), batch(0)[1]).backward()
    opt.step()  # creates the momentum buffers
    nn.functional.mse_loss(model(batch(1)[0]), batch(1)[1]).backward()
    plan = _plan(opt, opt.gather())
    assert plan is not None and plan.lars_options["norm_process_groups"] == ()
    inputs = plan.inputs(FusedStep(opt)._hyper_tensors(plan.devices()))
    texts = []
    for disabled in ((), ("reduce_sharded_norms",)):
        gm = canonicalize(_step_function(plan), inputs)
        _, stages = run_pipeline(gm, LARS_SGD, _request(plan, gm), disabled=disabled)
        texts.append([stage.text for stage in stages if stage.name != "reduce_sharded_norms"])
    assert texts[0] == texts[1]
    assert "_c10d_functional" not in texts[0][-1]
