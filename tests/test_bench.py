"""The step benchmark's machinery on a tiny shape list, and the model shape lists."""

from __future__ import annotations

import math

import pytest
import torch

from lars_fx.bench import (
    BenchReport,
    BenchRow,
    ParamShape,
    available_peers,
    format_markdown,
    resnet50_shapes,
    run_benchmark,
    vit_l16_shapes,
)

TINY = [
    ParamShape("conv.weight", (16, 8, 3, 3)),
    ParamShape("bn.weight", (16,)),
    ParamShape("bn.bias", (16,)),
    ParamShape("fc.weight", (10, 64)),
]


def _count(shapes: list[ParamShape]) -> tuple[int, int]:
    return len(shapes), sum(math.prod(s.shape) for s in shapes)


def test_resnet50_shapes() -> None:
    shapes = resnet50_shapes()
    assert _count(shapes) == (161, 25_557_032)
    assert shapes[0] == ParamShape("conv1.weight", (64, 3, 7, 7))
    assert ParamShape("layer1.0.downsample.0.weight", (256, 64, 1, 1)) in shapes
    assert shapes[-1] == ParamShape("fc.bias", (1000,))


def test_vit_l16_shapes() -> None:
    shapes = vit_l16_shapes()
    assert _count(shapes) == (296, 304_326_632)
    assert ParamShape("blocks.0.attn.qkv.weight", (3072, 1024)) in shapes
    assert ParamShape("blocks.23.mlp.fc2.weight", (1024, 4096)) in shapes
    assert len({s.name for s in shapes}) == len(shapes)


def test_run_benchmark_rows_and_table() -> None:
    peers = ["timm_eager", "lars_loop", "lars_foreach", "sgd_foreach"]
    messages: list[str] = []
    report = run_benchmark(
        "tiny", "cpu", peers=peers, warmup=1, iters=2, shapes=TINY, progress=messages.append
    )

    assert isinstance(report, BenchReport)
    # The default filter excludes biases and 'LayerNorm' only, so bn.weight gets LARS.
    assert (report.num_tensors, report.num_params, report.num_lars_tensors) == (4, 1_824, 3)
    assert report.copy_gbs > 0 and report.floor_ms > 0
    assert [row.peer for row in report.rows] == peers
    for row in report.rows:
        assert row.note == "" and row.median_ms > 0 and row.compile_s is None
        assert row.bandwidth_share == pytest.approx(row.bandwidth_gbs / report.copy_gbs)
        assert row.vs_compiled_sgd is None and row.vs_fused_lars is None  # their references did not run
    assert any(m.startswith("lars_foreach:") for m in messages)

    table = format_markdown(report, notes=["a note"])
    lines = table.splitlines()
    assert lines[0] == "# Optimizer step: tiny shapes on cpu"
    assert "- a note" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("| peer |"))
    body = lines[header + 2 :]
    assert len(body) == len(peers)
    assert all(line.count("|") == lines[header].count("|") for line in body)


@pytest.mark.parametrize("warmup", [0, 1], ids=["fails-when-timed", "fails-in-warmup"])
def test_failing_peer_is_a_row_note(monkeypatch: pytest.MonkeyPatch, warmup: int) -> None:
    import lars_fx.bench.peers as bench

    def broken_step() -> None:
        raise RuntimeError("capture failed\nsecond line")

    monkeypatch.setitem(
        bench.PEERS, "sgd_foreach", bench.Peer("sgd_foreach", "broken", lambda n: broken_step)
    )
    report = run_benchmark(
        "tiny", "cpu", peers=["sgd_foreach", "lars_foreach"], warmup=warmup, iters=2, shapes=TINY
    )
    ok, failed = report.rows
    assert (ok.peer, failed.peer) == ("lars_foreach", "sgd_foreach")
    assert ok.median_ms > 0 and ok.note == ""
    assert failed.median_ms is None and failed.note == "RuntimeError: capture failed"
    assert "RuntimeError: capture failed" in format_markdown(report)


def test_ratios_and_compile_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import lars_fx.bench.peers as bench

    # Stand-ins for the two reference peers, without paying Inductor's compile time.
    monkeypatch.setitem(
        bench.PEERS, "sgd_compiled", bench.Peer("sgd_compiled", "SGD", lambda n: bench._sgd(n).step, True)
    )
    monkeypatch.setitem(
        bench.PEERS,
        "lars_fused",
        bench.Peer("lars_fused", "LARS", lambda n: bench.LARS(bench._sgd(n)).step, True),
    )
    report = run_benchmark(
        "tiny", "cpu", peers=["lars_fused", "sgd_compiled"], warmup=2, iters=2, shapes=TINY
    )
    fused, sgd = report.rows
    assert fused.vs_fused_lars == pytest.approx(1.0) and sgd.vs_compiled_sgd == pytest.approx(1.0)
    assert fused.vs_compiled_sgd == pytest.approx(fused.median_ms / sgd.median_ms)
    assert fused.compile_s is not None and fused.compile_s >= 0


def test_peer_selection() -> None:
    assert "lars_foreach_cudagraph" not in available_peers("cpu")
    assert "lars_foreach_cudagraph" in available_peers("cuda")
    with pytest.raises(ValueError, match="do not run on cpu"):
        run_benchmark("tiny", "cpu", peers=["sgd_foreach_cudagraph"], shapes=TINY)
    with pytest.raises(ValueError, match="unknown model"):
        run_benchmark("resnet18", "cpu")


def test_each_peer_steps_parameters_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    import lars_fx.bench.peers as bench

    seen: dict[str, list] = {}

    def recording(key: str):
        def build(named):
            seen[key] = [(p, p.detach().clone(), p.grad) for _, p in named]
            return bench._sgd(named).step

        return build

    monkeypatch.setitem(bench.PEERS, "sgd_foreach", bench.Peer("sgd_foreach", "a", recording("a")))
    monkeypatch.setitem(bench.PEERS, "lars_foreach", bench.Peer("lars_foreach", "b", recording("b")))
    monkeypatch.setitem(
        bench.PEERS, "timm_eager", bench.Peer("timm_eager", "c", recording("c"), writes_grads=True)
    )
    run_benchmark(
        "tiny", "cpu", peers=["sgd_foreach", "lars_foreach", "timm_eager"], warmup=1, iters=1, shapes=TINY
    )
    for (pa, wa, ga), (pb, wb, gb), (pc, wc, gc) in zip(seen["a"], seen["b"], seen["c"], strict=True):
        assert pa is not pb and pa is not pc
        assert torch.equal(wa, wb) and torch.equal(wa, wc)  # the same starting weights
        assert ga is gb and gc is not ga  # gradients shared, except by a peer that scales them in place


def test_a_spread_wider_than_the_median_is_called_out() -> None:
    report = run_benchmark(
        "tiny", "cpu", peers=["sgd_foreach", "lars_foreach"], warmup=1, iters=2, shapes=TINY
    )
    for row in report.rows:
        row.iqr_ms = 0.0
    quiet = format_markdown(report)
    assert "unreliable" not in quiet and "as the issue counts" not in quiet
    report.rows.append(BenchRow("noisy", "a noisy peer", median_ms=1.0, iqr_ms=2.5))
    noisy = format_markdown(report)
    assert "**unreliable timings**: the spread (IQR) exceeds the median for a noisy peer" in noisy
