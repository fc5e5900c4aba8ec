"""Export a small CNN with LARS for ONNX Runtime's on-device training, then train it without PyTorch.

The host half (PyTorch + lars_fx) writes the four artifacts and the data; the device half runs in a
separate process whose code uses only numpy and onnxruntime-training's API, as an app on a device
would, and prints the loss falling. (ORT 1.19.2's Python package itself imports torch when
``onnxruntime.training`` loads; its C, C++, Java and Objective-C APIs take the same artifacts without it.)

    python examples/onnx_device_training.py [--epochs 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path


def device_train(directory: Path, epochs: int, batch_size: int) -> None:
    """The device: onnxruntime-training and numpy only."""
    import numpy as np
    from onnxruntime.training.api import CheckpointState, LinearLRScheduler, Module, Optimizer

    assert "lars_fx" not in sys.modules
    data = np.load(directory / "digits.npz")
    x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    state = CheckpointState.load_checkpoint(directory / "checkpoint")
    module = Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"))
    optimizer = Optimizer(str(directory / "optimizer_model.onnx"), module)
    lr = state.properties["lars_fx.learning_rate"]  # ORT starts every Optimizer at 0.001
    steps_per_epoch = len(x_train) // batch_size
    scheduler = LinearLRScheduler(optimizer, steps_per_epoch, epochs * steps_per_epoch, lr)

    rng = np.random.default_rng(0)
    for epoch in range(epochs):
        module.train()
        order = rng.permutation(len(x_train))
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            losses.append(float(module(x_train[batch], y_train[batch])))
            optimizer.step()
            module.lazy_reset_grad()
            scheduler.step()
        module.eval()
        test_loss = float(module(x_test, y_test))  # the eval model outputs the loss
        print(f"epoch {epoch + 1}: train loss {np.mean(losses):.4f}, held-out loss {test_loss:.4f}, "
              f"lr {optimizer.get_learning_rate():.4f}")
    CheckpointState.save_checkpoint(state, directory / "trained_checkpoint")


def host_export(directory: Path) -> None:
    """The host: build the CNN and its LARS optimizer, export the artifacts and the data."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    import lars_fx
    from lars_fx.onnx import generate_artifacts

    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1500], order[1500:]
    np.savez(directory / "digits.npz", x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])

    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )
    base = torch.optim.SGD(model.named_parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    optimizer = lars_fx.LARS(base, coefficient=0.02)
    generate_artifacts(model, (torch.from_numpy(x[:32]),), optimizer=optimizer, loss="cross_entropy",
                       artifact_directory=directory)
    print(f"exported {', '.join(sorted(p.name for p in directory.iterdir()))} to {directory}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="artifact directory (default: a temporary one)")
    parser.add_argument("--device", type=Path, help=argparse.SUPPRESS)  # the device process
    args = parser.parse_args()
    if args.device:
        device_train(args.device, args.epochs, args.batch_size)
        return
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.out or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        host_export(directory)
        command = [sys.executable, __file__, "--device", str(directory), "--epochs", str(args.epochs)]
        subprocess.run([*command, "--batch-size", str(args.batch_size)], check=True)


if __name__ == "__main__":
    main()
