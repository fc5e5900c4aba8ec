"""examples/executorch_device_training.py, shortened to two epochs: the device process, which never imports
lars_fx, trains the exported program, and resumes it exactly from a get_state checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "executorch_device_training.py"


def test_device_process_trains_and_resumes_without_lars_fx(tmp_path):
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=150,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "digits.pte").stat().st_size > 0
    history = json.loads((tmp_path / "history.json").read_text())

    assert history["lars_fx_modules"] == []  # the device ran the program with ExecuTorch's runtime alone
    losses, accuracies = history["train_loss"], history["test_accuracy"]
    assert len(losses) == 2
    assert losses[1] < 0.5 * losses[0], losses
    assert accuracies[-1] > 0.8, accuracies  # chance is 0.1
    assert history["lr"][1] < history["lr"][0]  # the schedule reached the program
    # Restarted after epoch 1 from the .pte and the checkpoint: the same state, the same predictions.
    assert history["resumed_after_epoch"] == 1 and history["resumed_identical"] is True
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1", "epoch 2"]
    assert any(line.startswith("restarted from digits.pte") and "identical" in line for line in lines)
