"""One full ONNX Runtime training step (forward, backward, optimizer) with LARS artifacts vs ORT's AdamW.

Model: 784-1024-1024-10 MLP, batch 64, MSE loss, CPU. Both artifact sets come from the same ONNX export;
the AdamW set is ORT's own ``generate_artifacts(optimizer=OptimType.AdamW)``, the LARS set
``lars_fx.onnx.generate_artifacts``. Each step is ``module(x, t); optimizer.step();
module.lazy_reset_grad()``. Prints and writes a markdown table (median and best of ``--repeats`` timed blocks)
to benchmarks/results/ort_step.md.

    python benchmarks/bench_ort_step.py [--steps 30] [--repeats 10]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.training import artifacts as ort_artifacts
from onnxruntime.training.api import CheckpointState, Module, Optimizer

import lars_fx
from lars_fx.onnx import generate_artifacts

RESULTS = Path(__file__).parent / "results" / "ort_step.md"


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


def adamw_artifacts(model: torch.nn.Module, x: torch.Tensor, directory: Path) -> None:
    buffer = io.BytesIO()
    torch.onnx.export(
        model, (x,), buffer, dynamo=False, opset_version=14, training=torch.onnx.TrainingMode.TRAINING,
        do_constant_folding=False, input_names=["input"], output_names=["output"],
    )
    exported = onnx.load_from_string(buffer.getvalue())
    ort_artifacts.generate_artifacts(
        exported, requires_grad=[n for n, _ in model.named_parameters()], loss=ort_artifacts.LossType.MSELoss,
        optimizer=ort_artifacts.OptimType.AdamW, artifact_directory=directory,
    )
    optimizer_model = onnx.load(directory / "optimizer_model.onnx")
    # onnx 1.23 stamps IR 14; ORT 1.19 loads <= 10
    optimizer_model.ir_version = min(optimizer_model.ir_version, 10)
    onnx.save(optimizer_model, directory / "optimizer_model.onnx")


def open_step(directory: Path, x: np.ndarray, t: np.ndarray, threads: int) -> Callable[[], None]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ORT's default (one per core)
    state = CheckpointState.load_checkpoint(directory / "checkpoint")
    module = Module(str(directory / "training_model.onnx"), state, session_options=options)
    optimizer = Optimizer(str(directory / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(0.01)

    def step() -> None:
        module(x, t)
        optimizer.step()
        module.lazy_reset_grad()

    return step


def time_block(step: Callable[[], None], steps: int) -> tuple[float, float]:
    """Wall-clock and process CPU milliseconds per step over ``steps`` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return (time.perf_counter() - wall) / steps * 1e3, (time.process_time() - cpu) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[0, 1], help="intra-op threads (0: ORT's default)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    onnxruntime.set_default_logger_severity(3)

    model = build_model()
    x = torch.randn(64, 784)
    t = torch.randn(64, 10)
    lars = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4))
    with tempfile.TemporaryDirectory() as scratch:
        lars_dir, adamw_dir = Path(scratch, "lars"), Path(scratch, "adamw")
        adamw_dir.mkdir()
        generate_artifacts(model, (x,), optimizer=lars, loss="mse", artifact_directory=lars_dir)
        adamw_artifacts(model, x, adamw_dir)
        xs, ts = x.numpy(), t.numpy()
        rows, records = [], {}
        for threads in args.threads:
            results = measure({"ORT AdamW": adamw_dir, "lars_fx LARS": lars_dir}, xs, ts, threads, args)
            median = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
            best = {k: min(w for w, _ in v) for k, v in results.items()}
            cpu = {k: statistics.median(c for _, c in v) for k, v in results.items()}
            ratio = {
                stat: values["lars_fx LARS"] / values["ORT AdamW"]
                for stat, values in (("median", median), ("best", best), ("cpu", cpu))
            }
            label = threads or "default"
            rows += [f"| {label} | {k} | {median[k]:.2f} | {best[k]:.2f} | {cpu[k]:.2f} |" for k in results]
            rows.append(
                f"| {label} | **LARS / AdamW** | **{ratio['median']:.2f}x** | **{ratio['best']:.2f}x** "
                f"| **{ratio['cpu']:.2f}x** |"
            )
            records[str(label)] = {"median_ms": median, "best_ms": best, "cpu_ms": cpu, "ratio": ratio}

    lines = [
        "# One ONNX Runtime training step: LARS artifacts vs ORT's AdamW",
        "",
        (f"784-1024-1024-10 MLP, batch 64, MSE, forward + backward + optimizer; onnxruntime-training "
        f"{onnxruntime.__version__}, {os.cpu_count()} CPU cores ({platform.machine()}); {args.steps} steps "
        f"per block, {args.repeats} blocks each, the two alternating. The machine is shared with other jobs: "
        "the best block and, with one thread, the process CPU time are the less disturbed figures (with the "
        "default threads, CPU time counts ORT's spinning workers)."),
        "",
        "| intra-op threads | artifacts | median ms/step | best ms/step | median CPU ms/step |",
        "| --- | --- | ---: | ---: | ---: |",
        *rows,
        "",
        "```json",
        json.dumps(records),
        "```",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)


def measure(
    directories: dict[str, Path], x: np.ndarray, t: np.ndarray, threads: int, args: argparse.Namespace
) -> dict[str, list[tuple[float, float]]]:
    runs = {name: open_step(directory, x, t, threads) for name, directory in directories.items()}
    for step in runs.values():
        time_block(step, 5)  # warm-up
    # Alternate blocks so that drifts in machine load hit both alike.
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, step in runs.items():
            results[name].append(time_block(step, args.steps))
    return results


if __name__ == "__main__":
    main()
