"""Export a small CNN with LARS as one ExecuTorch program, then train it without lars_fx.

The host half (PyTorch + lars_fx) writes the program (``digits.pte``: ``train_step``, ``predict``,
``get_state``, ``set_state``), the data and a few facts the device needs; the device half runs in a separate
process whose code uses only ExecuTorch's runtime, torch (for tensors) and numpy, as an app on a device would
(ExecuTorch's C++ runtime, which its Android and iOS bindings wrap, takes the same ``.pte``). It trains with a
polynomial lr schedule passed to ``train_step`` as a tensor each step, prints the loss falling and the test
accuracy from ``predict``, checkpoints the state (weights and momentum buffers) with ``get_state`` after every
epoch, and halfway restarts from the ``.pte`` and the checkpoint with ``set_state``.

    python examples/executorch_device_training.py [--epochs 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("train_step", "predict", "get_state", "set_state")


def device_train(directory: Path, epochs: int) -> None:
    """The device: ExecuTorch's runtime, torch tensors and numpy only."""
    import numpy as np
    import torch
    from executorch.runtime import Runtime

    assert "lars_fx" not in sys.modules
    facts = json.loads((directory / "program.json").read_text())
    data = np.load(directory / "digits.npz")
    x_train, y_train = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    x_test, y_test = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])
    batch_size, lr0 = facts["batch_size"], facts["lr"]  # any batch from 1 to the exported max_batch
    steps_per_epoch = -(-len(x_train) // batch_size)  # the last, smaller batch trains too
    total_steps = epochs * steps_per_epoch
    checkpoint = directory / "checkpoint.npz"
    resume_after = epochs // 2  # the epoch after which the app "restarts"

    def load() -> dict:
        program = Runtime.get().load_program(directory / "digits.pte")
        return {name: program.load_method(name) for name in METHODS}

    def predict(methods: dict) -> torch.Tensor:
        batches = torch.split(x_test, batch_size)
        return torch.cat([methods["predict"].execute([batch])[0] for batch in batches])

    methods, step = load(), 0
    history: dict = {"train_loss": [], "test_accuracy": [], "lr": []}
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        losses = []
        for batch in torch.split(torch.randperm(len(x_train), generator=generator), batch_size):
            lr = lr0 * (1 - step / total_steps) ** 2  # the LARS paper's schedule: a new lr, the same program
            (loss,) = methods["train_step"].execute([x_train[batch], y_train[batch], torch.tensor(lr)])
            losses.append(float(loss))
            step += 1
        predictions = predict(methods)
        test_accuracy = float((predictions.argmax(1) == y_test).float().mean())
        history["train_loss"].append(float(np.mean(losses)))
        history["test_accuracy"].append(test_accuracy)
        history["lr"].append(lr)
        print(f"epoch {epoch + 1}: train loss {np.mean(losses):.4f}, test accuracy {test_accuracy:.3f}, "
              f"lr {lr:.4f}", flush=True)

        state = methods["get_state"].execute([])  # weights, then momentum buffers: facts["state"] names them
        arrays = {name: tensor.numpy() for name, tensor in zip(facts["state"], state, strict=True)}
        np.savez(checkpoint, step=step, **arrays)
        if epoch + 1 == resume_after:
            del methods  # the app stops; a new one starts from the .pte and the checkpoint
            saved = np.load(checkpoint)
            methods = load()
            step = int(saved["step"])
            methods["set_state"].execute([torch.from_numpy(saved[name]) for name in facts["state"]])
            resumed = methods["get_state"].execute([])
            identical = all(torch.equal(a, b) for a, b in zip(state, resumed, strict=True))
            identical = identical and torch.equal(predict(methods), predictions)
            history["resumed_after_epoch"], history["resumed_identical"] = epoch + 1, identical
            print(f"restarted from digits.pte and checkpoint.npz at step {step}: state and predictions "
                  f"{'identical' if identical else 'DIFFERENT'}", flush=True)
    history["lars_fx_modules"] = sorted(name for name in sys.modules if name.split(".")[0] == "lars_fx")
    (directory / "history.json").write_text(json.dumps(history, indent=1))


def host_export(directory: Path, batch_size: int) -> None:
    """The host: build the CNN and its LARS optimizer, export the program, the data and the facts."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    import lars_fx
    from lars_fx.executorch import export_program

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)  # 8x8 -> 4x4
            self.norm = nn.LayerNorm(32 * 4 * 4)
            self.head = nn.Linear(32 * 4 * 4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.head(self.norm(x.flatten(1)))

    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1500], order[1500:]
    np.savez(directory / "digits.npz", x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])

    model = DigitsCNN()
    base = torch.optim.SGD(model.named_parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    optimizer = lars_fx.LARS(base, coefficient=0.02,
                             lars_filter=lambda p: "bias" not in p.name and not p.name.startswith("norm."))
    program = export_program(model, (torch.from_numpy(x[train[:batch_size]]),),
                             torch.from_numpy(y[train[:batch_size]]), optimizer=optimizer,
                             loss="cross_entropy", path=directory / "digits.pte", max_batch=batch_size)
    facts = {"lr": base.param_groups[0]["lr"], "batch_size": batch_size,
             "state": [*program.parameter_names, *(f"momentum of {n}" for n in program.momentum_names)]}
    (directory / "program.json").write_text(json.dumps(facts, indent=1))
    print(f"exported {program.path.name} ({program.path.stat().st_size:,} bytes) to {directory}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="program directory (default: a temporary one)")
    parser.add_argument("--device", type=Path, help=argparse.SUPPRESS)  # the device process
    args = parser.parse_args(argv)
    if args.device:
        device_train(args.device, args.epochs)
        return
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.out or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        host_export(directory, args.batch_size)
        command = [sys.executable, __file__, "--device", str(directory), "--epochs", str(args.epochs)]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
