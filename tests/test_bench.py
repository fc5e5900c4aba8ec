"""The step benchmark's machinery on a tiny shape list, and the model shape lists."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from lars_fx.bench import (
    FIGURE_SETS,
    MODELS,
    BenchReport,
    BenchRow,
    FigureSet,
    ParamShape,
    available_peers,
    figure_rows,
    format_figures,
    format_markdown,
    resnet50_shapes,
    run_benchmark,
    run_figure_set,
    shrunk,
    small_shapes,
    vit_l16_shapes,
)

ROOT = Path(__file__).resolve().parent.parent

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


def test_small_and_shrunk_shapes() -> None:
    small = small_shapes(1_000)
    assert _count(small) == (1_000, 64_000)
    assert small[:2] == [ParamShape("layer0.weight", (64,)), ParamShape("layer0.bias", (64,))]
    assert len({s.name for s in small}) == 1_000
    assert _count(MODELS["small_10000"]()) == (10_000, 640_000)
    tiny = MODELS["resnet50_tiny"]()
    assert [s.name for s in tiny] == [s.name for s in resnet50_shapes()]
    assert {s.shape for s in tiny} == {(4,)}
    assert shrunk([ParamShape("a", (2, 3)), ParamShape("b", (9,))], 4) == [
        ParamShape("a", (4,)), ParamShape("b", (4,))
    ]
    assert shrunk([ParamShape("a", (3,))], 4) == [ParamShape("a", (3,))]


def test_run_benchmark_rows_and_table() -> None:
    peers = ["timm_eager", "lars_loop", "lars_foreach", "lars_flat", "sgd_foreach"]
    messages: list[str] = []
    report = run_benchmark(
        "tiny", "cpu", peers=peers, warmup=1, iters=2, shapes=TINY, progress=messages.append
    )

    assert isinstance(report, BenchReport)
    # The default filter excludes biases and 'LayerNorm' only, so bn.weight gets LARS.
    assert (report.num_tensors, report.num_params, report.num_lars_tensors) == (4, 1_824, 3)
    assert report.copy_gbs > 0 and report.floor_ms > 0
    assert report.prime_s is None  # no compiled peer: no throwaway compile
    assert [row.peer for row in report.rows] == peers
    for row in report.rows:
        assert row.note == "" and row.median_ms > 0 and row.compile_s is None and row.kernels is None
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

    # Stand-ins for the two reference peers, without paying Inductor's compile time (nor its start-up).
    primed: list[torch.device] = []
    monkeypatch.setattr("lars_fx.bench.run._prime_compiler", lambda device: primed.append(device) or 0.5)
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
    assert primed == [torch.device("cpu")] and report.prime_s == 0.5  # once, before the compiled peers


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


# -- issue 11's figures --------------------------------------------------------------------------


def _report(rows: list[BenchRow], device: str = "cpu", key: str = "resnet50") -> BenchReport:
    """A made-up run of figure set ``key`` at full size."""
    num_tensors = len(MODELS[FIGURE_SETS[key].model]())
    return BenchReport(
        model=key, device=device, device_name="a device", num_tensors=num_tensors, num_lars_tensors=3,
        num_params=1_000,
        copy_gbs=100.0, floor_ms=0.28e-3, warmup=3, iters=2, date="today", machine="a machine", rows=rows,
    )


def _compared(fused: float, flat: float, sgd: float) -> list[BenchRow]:
    """The three compared peers, each with its value as compile seconds, median ms and kernel count."""
    return [
        BenchRow(key, key, median_ms=value, compile_s=value, kernels=int(value))
        for key, value in (("lars_fused", fused), ("lars_flat_fused", flat), ("sgd_compiled", sgd))
    ]


def test_figure_rows_are_ratios_to_compiled_sgd_and_judge_the_flat_fused_step() -> None:
    resnet = _report([*_compared(30.0, 4.0, 20.0), BenchRow("lars_foreach", "f", median_ms=9.0),
                      BenchRow("lars_flat", "l", median_ms=3.0)])
    small = _report(_compared(50.0, 6.0, 40.0), key="small_1000")
    rows = figure_rows([(FIGURE_SETS["resnet50"], resnet), (FIGURE_SETS["small_1000"], small)])
    by_label = {row.label: row for row in rows}
    assert [row.label.split(",")[0] for row in rows] == [
        "first compile", "first compile", "steady step", "eager LARS(flat=True) vs eager foreach LARS",
        "kernels Inductor generates per step", "kernels Inductor generates per step",
    ]
    compile_resnet = by_label["first compile, ResNet-50 shapes"]
    assert compile_resnet.cells == ["1.50× (30.0 s)", "0.20× (4.0 s)", "20.0 s"]
    assert compile_resnet.met is True  # 0.2 against <= 0.2
    assert by_label["first compile, 1,000 small tensors (64 elements)"].met is False  # 0.15 against <= 0.1
    step = by_label["steady step, ResNet-50 shapes"]
    assert step.cells == ["1.50× (30.000 ms)", "0.20× (4.000 ms)", "20.000 ms"] and step.met is True
    eager = by_label["eager LARS(flat=True) vs eager foreach LARS, ResNet-50 shapes"]
    assert eager.cells[1] == "3.00× faster (3.000 vs 9.000 ms)" and eager.met is True
    kernels = by_label["kernels Inductor generates per step, ResNet-50 shapes"]
    assert kernels.cells == ["30", "4", "20"] and kernels.met is True
    assert by_label["kernels Inductor generates per step, 1,000 small tensors (64 elements)"].met is False


def test_a_failed_peer_is_a_cell_of_the_figure_table_and_judged_unknown() -> None:
    rows = [
        BenchRow("lars_fused", "fused", median_ms=2.0, compile_s=3.0),
        BenchRow("lars_flat_fused", "flat fused", note="RuntimeError: fused step fell back"),
        BenchRow("sgd_compiled", "sgd", median_ms=1.0, compile_s=2.0),
    ]
    (compile_row,) = figure_rows([(FIGURE_SETS["small_1000"], _report(rows, key="small_1000"))])[:1]
    assert compile_row.cells == ["1.50× (3.0 s)", "failed (see its table)", "2.0 s"]
    assert compile_row.met is None
    no_sgd = figure_rows([(FIGURE_SETS["host"], _report(rows[:2], key="host"))])
    assert no_sgd[0].cells == ["2.000 ms, SGD's missing", "failed (see its table)", "not run"]
    table = format_figures([(FIGURE_SETS["small_1000"], _report(rows, key="small_1000"))])
    expected = (
        "| first compile, 1,000 small tensors (64 elements) | 1.50× (3.0 s) | failed (see its table) | 2.0 s "
        "| ≤ 0.1×, flat in the tensor count | – |"
    )
    assert expected in table
    assert "RuntimeError: fused step fell back" in table  # the run's own table, below


def test_device_figures_add_the_memory_floor_and_compile_seconds() -> None:
    report = _report(_compared(0.5, 0.02, 0.01), device="cuda:0")
    rows = figure_rows([(FIGURE_SETS["resnet50"], report)])
    floor = next(row for row in rows if "memory floor" in row.label)
    # 24 B/param * 1,000 params at 100 GB/s: 0.24 µs
    assert "0.000 ms" in floor.label and floor.target == "≤ 2× the floor"
    assert floor.cells[1] == f"{0.02 / 0.24e-3:.2f}× the floor" and floor.met is False
    gpu_compile = next(row for row in rows if row.label.startswith("first compile on the GPU"))
    assert gpu_compile.cells[1] == "0.0 s" and gpu_compile.met is True  # 0.02 s <= 5 s


def test_reduced_figure_set_compiles_cold_and_counts_kernels() -> None:
    """The pipeline end to end on small shapes: eager and flat LARS, the fused forms and compiled SGD."""
    cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    figure_set = FigureSet("host", "resnet50_tiny", "tiny", ("lars_foreach", "lars_flat", "lars_fused",
                                                            "lars_flat_fused", "sgd_compiled"), ("host",))
    report = run_figure_set(figure_set, "cpu", warmup=3, iters=2, reduced=True)
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == cache_dir  # the per-peer cache folders are gone again
    assert report.num_tensors == 8 and report.cold_compile and report.prime_s is not None
    rows = {row.peer: row for row in report.rows}
    for key in ("lars_fused", "sgd_compiled"):
        assert rows[key].note == "" and rows[key].compile_s > 0 and rows[key].kernels > 0
    for key in ("lars_foreach", "lars_flat"):
        assert rows[key].note == "" and rows[key].compile_s is None and rows[key].kernels is None
    flat_fused = rows["lars_flat_fused"]  # a failure here must be a row note, not an exception
    assert flat_fused.note or (flat_fused.compile_s > 0 and flat_fused.kernels > 0)
    (host,) = figure_rows([(figure_set, report)])
    assert host.label.endswith("tiny, reduced to 8 tensors")
    fused_ms, sgd_ms = rows["lars_fused"].median_ms, rows["sgd_compiled"].median_ms
    assert host.cells[0] == f"{fused_ms / sgd_ms:.2f}× ({fused_ms:.3f} ms)"


def test_bench_flat_writes_the_table_after_each_set(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("bench_flat", ROOT / "benchmarks" / "bench_flat.py")
    assert spec is not None and spec.loader is not None
    bench_flat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_flat)
    out = tmp_path / "figures.md"
    seen: list[str] = []

    def fake_run(figure_set, device, **options):
        assert options["reduced"] and device == "cpu"
        if seen:  # the first set's table is on disk before the second runs
            assert "first compile, 1,000 small tensors" in out.read_text()
        seen.append(figure_set.key)
        return _report(_compared(3.0, 1.0, 2.0), key=figure_set.key)

    monkeypatch.setattr(bench_flat, "run_figure_set", fake_run)
    args = ["--figures", "small_1000,host", "--reduced", "--device", "cpu", "--out", str(out)]
    assert bench_flat.main(args) == 0
    assert seen == ["small_1000", "host"]
    text = out.read_text()
    assert "host time per step, ResNet-50's 161 tensors shrunk to 4 elements | 1.50×" in text
    assert "--reduced" in text
    with pytest.raises(SystemExit, match="unknown sets"):
        bench_flat.main(["--figures", "resnet18"])
