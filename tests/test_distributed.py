"""LARS under torch.distributed on loopback gloo: DDP, FSDP2, tensor parallelism, 2-D meshes (FSDP2 x TP,
HSDP), DCP, the collectives of a step, and what is refused.

Each layout runs once per module in one spawned job (``dist_workers``) that runs all its checks; the tests
assert on the cached results. Every trajectory is compared, step by step, with the single-process full-batch
float64 run of the per-tensor reference (same model, data and LARS options), computed here in the test
process. Every job is bounded by ``dist_harness`` (process-group timeout 60 s, a wall-clock bound per job).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest
import torch

import dist_workers as workers
from dist_harness import DistributedRunError, run_on_ranks

# Float64 rounding, grown over a few steps and reduction orders; a wrong trust ratio moves weights by ~1e-3.
TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}


@functools.cache
def reference(
    kind: str = "net", variant: str = "nesterov", steps: int = workers.STEPS, writes: bool = True
) -> list:
    """The single-process full-batch float64 run (with the variant's weight writes between steps)."""
    return workers.reference_trajectory(kind, variant, range(steps), writes)


def check_result(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The check's result on every rank; fails the test with the rank's traceback if the check raised."""
    per_rank = [rank_results[name] for rank_results in results]
    for result in per_rank:
        if "error" in result:
            pytest.fail(f"check {name!r} raised:\n{result['error']}", pytrace=False)
    return per_rank


def assert_trajectory(actual: list[dict], expected: list[dict], what: str, first_step: int = 0) -> None:
    assert len(actual) == len(expected), what
    for step, (got, want) in enumerate(zip(actual, expected, strict=True), start=first_step):
        assert got.keys() == want.keys(), f"{what}: parameters {sorted(got)} != {sorted(want)}"
        for name in want:
            torch.testing.assert_close(
                got[name],
                want[name],
                **TOLERANCE,
                msg=lambda m, n=name, s=step: f"{what}, step {s}, {n}: {m}",
            )


def assert_each_rank_matches(
    results: list[dict], name: str, expected: list[dict], first_step: int = 0
) -> list[dict]:
    per_rank = check_result(results, name)
    for rank, result in enumerate(per_rank):
        assert_trajectory(result["trajectory"], expected, f"{name} on rank {rank}", first_step)
        assert result.get("not_compiled") is None, f"{name} on rank {rank}: {result['not_compiled']}"
    return per_rank


def assert_all_reduces(per_rank: list[dict], expected: int, name: str) -> None:
    for rank, result in enumerate(per_rank):
        counts = result["collectives"]
        assert counts == ({"all_reduce": expected} if expected else {}), (
            f"{name} on rank {rank}: collectives in one optimizer step {counts}, expected {expected} "
            "all-reduce(s)"
        )


# -- the harness ------------------------------------------------------------------------------------


def test_harness_returns_every_ranks_value_and_counts_each_collective_once():
    results = run_on_ranks(workers.harness_self_check, 2, 1.5, bound_s=240)
    assert [r["rank_and_sum"] for r in results] == [(0, 4.5), (1, 4.5)]
    for result in results:
        assert result["eager all_reduce"] == {"all_reduce": 1}
        assert result["functional all_reduce"] == {"all_reduce": 1}
        assert result["compiled functional all_reduce"] == {"all_reduce": 1}
        assert result["reduce_scatter and all_gather"] == {"reduce_scatter": 1, "all_gather": 1}
        assert result["DTensor norm"] == {"all_reduce": 1}


@pytest.mark.parametrize(
    "rank_function, words",
    [
        (workers.rank_one_raises, ["rank 1: exit code 1", "KeyError", "rank one fails on purpose"]),
        (workers.rank_one_exits_early, ["rank 1: exit code 0 without a result"]),
    ],
)
def test_harness_fails_fast_when_a_rank_fails(rank_function, words):
    started = time.monotonic()
    with pytest.raises(DistributedRunError) as raised:
        run_on_ranks(rank_function, 2, bound_s=120)
    assert time.monotonic() - started < 30, "the harness waited for the process group's timeout"
    for word in words:
        assert word in str(raised.value)


def test_harness_kills_a_hung_run_at_its_bound_with_the_ranks_stacks():
    started = time.monotonic()
    with pytest.raises(DistributedRunError) as raised:
        run_on_ranks(workers.rank_one_hangs, 2, bound_s=8)
    assert time.monotonic() - started < 30
    message = str(raised.value)
    assert "longer than its bound of 8 s" in message
    assert "killed by the harness" in message
    assert "in rank_one_hangs" in message and "barrier" in message  # where each rank was stuck


# -- DDP --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_results():
    return run_on_ranks(workers.ddp_job, 2, bound_s=600)


DDP_CHECKS = [
    f"{config}/{mode}" for config in ("ddp", "ddp_bucket_view_static") for mode in (*workers.MODES, "backend")
]


@pytest.mark.parametrize("name", DDP_CHECKS)
def test_ddp_matches_full_batch_reference_with_no_collective_in_the_step(ddp_results, name):
    per_rank = assert_each_rank_matches(ddp_results, name, reference(variant="scheduled"))
    assert_all_reduces(per_rank, 0, name)


# -- FSDP2 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory):
    checkpoint_dir = tmp_path_factory.mktemp("dcp")
    full_state = workers.single_device_full_state()
    return run_on_ranks(workers.fsdp2_job, 2, str(checkpoint_dir), full_state, bound_s=900)


@pytest.mark.parametrize("mode", workers.MODES)
@pytest.mark.parametrize("variant", workers.VARIANTS)
def test_fsdp2_matches_full_batch_reference(fsdp2_results, variant, mode):
    """Uneven shards (7 rows on 2 ranks), LayerNorm and biases without LARS, two param groups; momentum with
    nesterov (and the weights written between steps), or dampening with a StepLR scheduler on a float lr."""
    assert_each_rank_matches(fsdp2_results, f"net/{variant}/{mode}", reference(variant=variant))


@pytest.mark.parametrize("mode", workers.MODES)
@pytest.mark.parametrize("kind, lars_tensors", [("net", 3), ("deep", 30)])
def test_fsdp2_step_issues_one_all_reduce(fsdp2_results, kind, lars_tensors, mode):
    name = f"net/nesterov/{mode}" if kind == "net" else f"deep/{mode}"
    steps = workers.STEPS if kind == "net" else workers.DEEP_STEPS
    per_rank = assert_each_rank_matches(fsdp2_results, name, reference(kind, steps=steps))
    assert_all_reduces(per_rank, 1, f"{name} ({lars_tensors} LARS tensors)")


@pytest.mark.parametrize("mode", workers.MODES)
def test_fsdp2_weights_written_between_steps_are_seen(fsdp2_results, mode):
    """torch._foreach_mul_ on the DTensor parameters after step 1, p.to_local().mul_ after step 3:
    fused=True's carried weight norms must not go stale; the run matches the reference that sees the same
    writes."""
    with_writes, without = reference(), reference(writes=False)
    assert not torch.allclose(with_writes[-1]["fc1.weight"], without[-1]["fc1.weight"], **TOLERANCE)
    assert_each_rank_matches(fsdp2_results, f"net/nesterov/{mode}", with_writes)


@pytest.mark.parametrize("mode", workers.CHECKPOINTED_MODES)
def test_dcp_round_trip_resumes_the_identical_trajectory(fsdp2_results, mode):
    """DCP save at step 3 (get_state_dict, dcp.save); a fresh model with other weights and a fresh optimizer
    load it (dcp.load, set_state_dict) and train on: the uninterrupted run's trajectory, bit for bit (momentum
    included)."""
    per_rank = assert_each_rank_matches(fsdp2_results, f"net/nesterov/{mode}", reference())
    for rank, result in enumerate(per_rank):
        what = f"dcp/{mode} resumed, rank {rank}"
        assert result["resumed_not_compiled"] is None, f"{what}: {result['resumed_not_compiled']}"
        for step, (resumed, uninterrupted) in enumerate(
            zip(result["resumed"], result["trajectory"][workers.RESUME_AT :], strict=True),
            start=workers.RESUME_AT,
        ):
            for name, value in uninterrupted.items():
                assert torch.equal(resumed[name], value), f"{what}, step {step}, {name}: not identical"


def test_sharded_full_state_dict_loads_into_a_single_device_run(fsdp2_results):
    """get_state_dict(..., StateDictOptions(full_state_dict=True)) of an FSDP2 run, loaded with set_state_dict
    into a single-device model and optimizer, which train on as the FSDP2 run and the reference do."""
    per_rank = assert_each_rank_matches(fsdp2_results, "net/nesterov/foreach", reference())
    resumed = workers.single_device_resume(per_rank[0]["full_state"])
    what = "single-device run resumed from the FSDP2 run's full state"
    assert_trajectory(resumed, per_rank[0]["trajectory"][workers.RESUME_AT :], what, workers.RESUME_AT)


@pytest.mark.parametrize("mode", workers.CHECKPOINTED_MODES)
def test_single_device_full_state_dict_loads_into_an_fsdp2_run(fsdp2_results, mode):
    """The reference run's full state dicts after step 3, loaded with set_state_dict(full_state_dict=True)
    into a fresh FSDP2 model and optimizer, which train on as the reference does."""
    assert_each_rank_matches(
        fsdp2_results, f"full_state_in/{mode}", reference()[workers.RESUME_AT :], workers.RESUME_AT
    )


# -- tensor parallelism -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp_results():
    return run_on_ranks(workers.tp_job, 2, bound_s=600)


@pytest.mark.parametrize("mode", workers.MODES)
def test_tensor_parallel_with_plain_layernorm_matches_reference(tp_results, mode):
    """fc1 column-wise (uneven), fc2 row-wise; LayerNorm and fc3 plain: mixed plain/DTensor lists."""
    per_rank = assert_each_rank_matches(tp_results, f"tp/{mode}", reference())
    assert_all_reduces(per_rank, 1, f"tp/{mode}")


# -- 2-D meshes on 4 ranks -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh2d_results():
    return run_on_ranks(workers.mesh2d_job, 4, bound_s=900)


@pytest.mark.parametrize("mode", workers.MODES)
@pytest.mark.parametrize("layout, sharding_dims", [("fsdp_tp", 2), ("hsdp", 1)])
def test_2d_mesh_matches_reference_with_one_all_reduce_per_sharding_dim(
    mesh2d_results, layout, sharding_dims, mode
):
    """FSDP2 x TP shards along both mesh dimensions; HSDP (replicate x shard) along one."""
    per_rank = assert_each_rank_matches(mesh2d_results, f"{layout}/{mode}", reference())
    assert_all_reduces(per_rank, sharding_dims, f"{layout}/{mode}")


def test_parameters_on_two_meshes_are_refused_naming_the_parameter(mesh2d_results):
    for rank, result in enumerate(check_result(mesh2d_results, "two_meshes")):
        raised = result["raised"]
        assert raised is not None, f"rank {rank}: one optimizer over parameters on two meshes raised nothing"
        assert raised["type"] == "ValueError", raised["traceback"]
        assert "fc1.weight" in raised["message"] or "fc2.weight" in raised["message"], raised["message"]
        assert result["moved"] == [], f"rank {rank}: parameters moved before the error: {result['moved']}"


# -- FSDP1 --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp1_results():
    return run_on_ranks(workers.fsdp1_job, 2, bound_s=300)


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_is_refused_before_any_parameter_moves(fsdp1_results, use_orig_params):
    """FSDP1 hands the optimizer slices of a flat parameter: per-rank trust ratios would be silently wrong."""
    for rank, result in enumerate(check_result(fsdp1_results, f"fsdp1/use_orig_params={use_orig_params}")):
        raised = result["raised"]
        if raised is None:
            deviation = max(
                (result["parameters_after"][n] - reference(steps=1)[0][n]).abs().max().item()
                for n in reference(steps=1)[0]
            )
            pytest.fail(
                f"rank {rank}: LARS stepped FSDP1 parameters without an error; the weights are off the "
                f"full-batch reference by up to {deviation:.3g} after one step"
            )
        assert raised["type"] == "ValueError", raised["traceback"]
        assert "fully_shard" in raised["message"] or "FSDP2" in raised["message"], raised["message"]
        assert result["moved"] == [], f"rank {rank}: parameters moved before the error: {result['moved']}"
