"""examples/large_batch_digits.py in its reduced (--quick) form: it runs, and its claim holds."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

from lars_fx.telemetry import read_records

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "large_batch_digits.py"


def _load_example(monkeypatch):
    spec = importlib.util.spec_from_file_location("large_batch_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_large_batch_digits(tmp_path, capsys, monkeypatch):
    example = _load_example(monkeypatch)
    threads = torch.get_num_threads()
    try:
        assert example.main(["--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the example pins one thread for itself

    results = json.loads((tmp_path / "results.json").read_text())
    sgd, lars = (results["accuracy"][m.label] for m in example.QUICK_METHODS)
    small, full = (str(b) for b in results["batch_sizes"])
    assert full == "1437"  # the whole training split
    assert sgd[small][0] > 0.9 and lars[small][0] > 0.9  # both train at batch 32
    # At the whole-set batch with a 45x lr, SGD-momentum diverges to chance while LARS keeps training.
    assert sgd[full][0] < 0.3 and lars[full][0] > 0.8

    table = (tmp_path / "results.md").read_text()
    assert "| optimizer | B=32 (lr x1) | B=1437 (lr x44.9) |" in table
    assert all(m.label in table for m in example.QUICK_METHODS)
    assert table in capsys.readouterr().out + "\n"

    records = read_records(tmp_path / "telemetry.csv")
    assert {r["param"] for r in records} == {"0.weight", "2.weight", "4.weight"}
    assert (tmp_path / "trust_ratio.png").read_bytes()[:4] == b"\x89PNG"
