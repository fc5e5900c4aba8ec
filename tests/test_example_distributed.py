"""examples/large_batch_distributed.py in a reduced form (12 steps, float64): under torchrun on 2 ranks, DDP
and FSDP2 in one launch follow the one-process full-batch run step for step, and the loss falls."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

from dist_harness import run_bounded

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EXAMPLE = EXAMPLES / "large_batch_distributed.py"
REDUCED = ["--steps", "12", "--dtype", "float64"]
# torchrun's agent and two ranks start in ~10 s on an idle 2-core machine; training takes seconds
BOUND_S = 240
STEP = re.compile(r"^step +(\d+) +lr [\d.]+ +loss ([\d.e+-]+)$")
ACCURACY = re.compile(r"^(\w+): final test accuracy ([\d.]+)%")


def parse_runs(output: str) -> dict[str, tuple[list[float], float]]:
    """Each run's losses, step by step, and its final accuracy (%), by the name it prints (ddp, fsdp2,
    single)."""
    runs: dict[str, tuple[list[float], float]] = {}
    losses: list[float] = []
    for line in output.splitlines():
        if step := STEP.match(line):
            assert int(step.group(1)) == len(losses) + 1, line
            losses.append(float(step.group(2)))
        elif accuracy := ACCURACY.match(line):
            runs[accuracy.group(1)] = (losses, float(accuracy.group(2)))
            losses = []
    return runs


def one_process_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[list[float], float]:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the example imports large_batch_digits from its folder
    import importlib.util

    spec = importlib.util.spec_from_file_location("large_batch_distributed", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:
        assert example.main(REDUCED) == 0
    finally:
        torch.set_num_threads(threads)  # the example pins one thread for itself
    return parse_runs(capsys.readouterr().out)["single"]


def test_ddp_and_fsdp2_follow_the_one_process_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reference_losses, reference_accuracy = one_process_run(monkeypatch, capsys)
    assert len(reference_losses) == 12
    assert reference_losses[-1] < reference_losses[0] / 5  # LARS trains at the whole-set batch and a 45x lr
    assert reference_accuracy > 85.0

    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
        "--wrap", "ddp,fsdp2", *REDUCED,
    ]
    result = run_bounded(command, BOUND_S, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    runs = parse_runs(result.stdout)
    assert set(runs) == {"ddp", "fsdp2"}, result.stdout
    for wrap, (losses, accuracy) in runs.items():
        # float64: the ranks' partial sums differ from the one-process sums only in rounding
        assert losses == pytest.approx(reference_losses, rel=1e-9, abs=0), wrap
        assert accuracy == reference_accuracy, wrap
    assert "== FSDP2 on 2 ranks (gloo)" in result.stdout and "== DDP on 2 ranks (gloo)" in result.stdout
