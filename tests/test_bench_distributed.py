"""benchmarks/bench_distributed.py in a reduced form: 2 spawned ranks, a few ResNet-50 tensors, no compile.

It runs, writes its table (to the file and to stdout), counts collectives (none where there is nothing to
reduce, some where LARS norms are sharded) and the sharded LARS step ends on the DTensor step's weights.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from dist_harness import run_bounded

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_distributed.py"
BOUND_S = 240  # two ranks' start-up, a few steps per row; killed with everything it started past this
ROWS = ["lars_eager", "local_no_collective", "dtensor_functional", "sgd_dtensor", "sgd_local"]


def table_rows(markdown: str) -> list[list[str]]:
    lines = markdown.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    body = [line for line in lines[header + 2 :] if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in body]


def test_reduced_benchmark_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "distributed.md"
    command = [
        sys.executable, str(BENCH), "--model", "resnet50", "--tensors", "6", "--iters", "2", "--warmup", "1",
        "--rows", ",".join(ROWS), "--out", str(out),
    ]
    result = run_bounded(command, BOUND_S, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]

    table = out.read_text()
    assert table in result.stdout
    assert table.startswith("# Optimizer step under FSDP2: resnet50 shapes on 2 ranks (gloo)")
    # conv1, bn1 (2), layer1.0.conv1, layer1.0.bn1 (2): the biases are not under LARS's default filter
    assert "- shapes: 6 fp32 tensors (4 under LARS's default filter)" in table
    rows = {cells[0]: cells for cells in table_rows(table)}
    assert len(rows) == len(ROWS)
    by_key = dict(zip(ROWS, rows.values(), strict=True))
    for key, row in by_key.items():
        _, median, iqr, compile_s, vs_floor, _, others, _, note = row
        assert note == "", (key, note)
        assert float(median) > 0 and float(iqr) >= 0 and compile_s == "" and vs_floor.endswith("×"), key
        assert others == "0", key  # FSDP2 steps issue no all-gather or reduce-scatter
    assert by_key["local_no_collective"][4] == "1.00×"

    def all_reduces(key: str) -> int:
        return int(by_key[key][5])

    # Nothing to reduce on local shards or in SGD; the LARS norms of sharded tensors need at least one
    # all-reduce.
    assert all_reduces("local_no_collective") == all_reduces("sgd_local") == all_reduces("sgd_dtensor") == 0
    assert all_reduces("lars_eager") >= 1 and all_reduces("dtensor_functional") >= 1

    # The sharded LARS step has the DTensor step's numbers; per-shard trust ratios do not.
    assert float(by_key["lars_eager"][7]) < 1e-7
    assert float(by_key["local_no_collective"][7]) > 1e-6
    assert by_key["dtensor_functional"][7] == by_key["sgd_dtensor"][7] == "n/a"
    assert "target, LARS (foreach), eager, on FSDP2 DTensors: ≤ 1.3× the local no-collective step" in table


def test_unknown_row_is_refused(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_distributed", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    # in table order
    assert bench.parse_args(["--rows", "sgd_local,lars_eager"]).rows == ["lars_eager", "sgd_local"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "lars_eager,nope"])
    assert "unknown rows ['nope']" in capsys.readouterr().err
