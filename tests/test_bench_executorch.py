"""benchmarks/bench_executorch_step.py: the reduced run writes its table with every peer, and its checks (the
peers' losses and weight updates agree, a program that kills its runtime costs a row) can fail."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dist_harness import run_bounded

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_executorch_step.py"
BOUND_S = 180  # ~45 s on 2 busy cores: two ExecuTorch exports (XNNPACK's ~15 s), ORT's, a probe process


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_executorch_step", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str) -> list[list[str]]:
    lines = markdown.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| model | peer |"))
    body = [line for line in lines[header + 2 :] if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in body]


def test_quick_run_writes_every_peer(tmp_path: Path) -> None:
    bench = load_bench()
    out = tmp_path / "executorch_step.md"
    command = [sys.executable, str(BENCH), "--quick", "--threads", "1", "--out", str(out)]
    result = run_bounded(command, BOUND_S, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    table = out.read_text()
    assert table in result.stdout
    assert "- command: `python benchmarks/bench_executorch_step.py --quick --threads 1 --out" in table
    assert "torch 2." in table and "executorch 1." in table and "onnxruntime-training 1." in table

    rows = table_rows(table)
    assert [(row[0], row[1]) for row in rows] == [("mlp_16_32_4", peer) for peer in bench.PEERS]
    for _, peer, median, best, ratio, size, export, loss, update, note in rows:
        assert note == "", (peer, note)
        assert median.endswith(("µs", "ms")) and best.endswith(("µs", "ms")) and ratio.endswith("x"), peer
        assert float(loss) <= bench.LOSS_RTOL and float(update) <= bench.UPDATE_RTOL, peer
        if peer == bench.REFERENCE:
            assert (ratio, size, export) == ("1.00x", "—", "—")
        else:
            assert size.endswith("KiB") and export.endswith(" s"), peer

    record = json.loads(table.split("```json\n")[1].split("\n```")[0])
    assert record["settings"]["iters"] == 10 and record["settings"]["threads"] == 1
    for row in record["rows"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert 0 < row["best_s"] <= row["median_s"] < 1, row
        if row["peer"] != bench.REFERENCE:
            assert row["size_bytes"] > 1000 and row["export_s"] > 0, row


def fake_peer(bench: ModuleType, name: str, losses: list[float]) -> object:
    values = iter(losses)
    return bench.Peer(name, step=lambda: next(values))


def test_check_losses_refuses_peers_that_step_differently() -> None:
    bench = load_bench()
    eager = [2.0, 1.9, 1.8]
    same = [2.0, 1.9 * (1 + 1e-5), 1.8]
    bench.check_losses([fake_peer(bench, bench.REFERENCE, eager), fake_peer(bench, "ort_lars", same)])

    off = [2.0, 1.9, 1.8 * (1 + 1e-3)]  # e.g. a missed weight decay term shows from the second step on
    with pytest.raises(AssertionError, match=r"ort_lars's loss at step 2 .* do not compute the same step"):
        bench.check_losses([fake_peer(bench, bench.REFERENCE, eager), fake_peer(bench, "ort_lars", off)])

    failed = bench.Peer("executorch_xnnpack", error="train_step.execute killed the process (SIGSEGV)")
    bench.check_losses([fake_peer(bench, bench.REFERENCE, eager), failed])  # a failed peer is not stepped
    assert failed.losses == []


def test_update_error_is_relative_to_eager_update() -> None:
    bench = load_bench()
    initial = {"w": torch.zeros(4), "b": torch.ones(2)}
    eager_weights = {"w": torch.full((4,), 0.5), "b": torch.full((2,), 2.0)}
    peer_weights = {"w": torch.full((4,), 0.5), "b": torch.full((2,), 2.02)}  # b moved 1.02 instead of 1
    eager = bench.Peer(bench.REFERENCE, weights=lambda: eager_weights)
    peer = bench.Peer("ort_lars", weights=lambda: peer_weights)
    assert bench.update_error(peer, eager, initial) == pytest.approx(0.02)
    assert bench.update_error(eager, eager, initial) == 0.0


def test_probe_reports_each_program_that_fails_to_run(tmp_path: Path) -> None:
    bench = load_bench()
    programs = [tmp_path / "first.pte", tmp_path / "second.pte"]
    for path in programs:
        path.write_bytes(b"not a program")
    args_file = tmp_path / "args.pt"
    torch.save({str(path): [torch.zeros(1)] for path in programs}, args_file)
    failures = bench.probe(programs, args_file)
    # the first failure ends a probe process: the second program is probed by the next one
    assert list(failures) == programs
    assert all(why.startswith("train_step.execute failed (exit status") for why in failures.values())


def test_probe_resumes_after_a_program_that_kills_its_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load_bench()
    child = tmp_path / "child.py"  # stands in for the benchmark's probe process: the runtime is not needed
    child.write_text(
        "import os, signal, sys\n"
        "for path in sys.argv[3:]:\n"
        "    if path.endswith('crash.pte'):\n"
        "        os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    print('ok', path, flush=True)\n"
    )
    monkeypatch.setattr(bench, "__file__", str(child))
    programs = [tmp_path / name for name in ("a.pte", "b_crash.pte", "c.pte", "d_crash.pte", "e.pte")]
    failures = bench.probe(programs, tmp_path / "args.pt")
    assert failures == {
        programs[1]: "train_step.execute killed the process (SIGSEGV) in a probe process",
        programs[3]: "train_step.execute killed the process (SIGSEGV) in a probe process",
    }
