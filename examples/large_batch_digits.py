"""Why LARS exists: large batches with a linearly scaled learning rate, on scikit-learn's digits.

Goyal et al.'s recipe for large batches is to scale the learning rate with the batch size
(lr = base_lr * B / 32) after a warm-up. Past some batch size plain SGD-momentum diverges at the
scaled rate; LARS scales each layer's step by its trust ratio ||w|| / ||g|| and keeps training.
This script measures that on the 1,797 8x8 digit images that ship with scikit-learn (no download):
a small MLP, the same epochs for every batch size (so fewer steps at larger batches), several seeds,
and a table of final test accuracy (mean +- std over seeds) for each optimizer and batch size.

    python examples/large_batch_digits.py                 # full run, a minute or two on 2 CPU cores
    python examples/large_batch_digits.py --quick         # reduced form for CI (a few seconds)
    python examples/large_batch_digits.py --out results/  # where the table and plot go

Writes into --out: results.md (the table), results.json (every seed's accuracy),
telemetry.csv and trust_ratio.png (the per-layer trust ratios of one LARS run at the largest batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from lars_fx import LARS
from lars_fx.telemetry import Telemetry

BASE_BATCH = 32
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


@dataclass(frozen=True)
class Method:
    label: str
    base_lr: float  # the learning rate at BASE_BATCH; scaled linearly with the batch size
    lars: bool = False
    coefficient: float = 0.001
    use_clip: bool = False


# Base learning rates: at B=32 every one of these trains to ~97%, so the small batch cannot tell them
# apart; the table shows what each becomes when scaled up. SGD gets two, to show that a smaller rate
# also survives large batches (see docs/telemetry.md).
METHODS = (
    Method("SGD-momentum, base lr 0.05", 0.05),
    Method("SGD-momentum, base lr 0.02", 0.02),
    Method("LARS (MindSpore default, eta=0.001), base lr 0.3", 0.3, lars=True),
    Method("LARS (MindSpore default, eta=0.001), base lr 1.0", 1.0, lars=True),
    Method("LARS + clip (eta=0.02), base lr 0.05", 0.05, lars=True, coefficient=0.02, use_clip=True),
)
QUICK_METHODS = (METHODS[0], METHODS[2])


@dataclass(frozen=True)
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data() -> Data:
    """Digits, a fixed stratified 80/20 split, pixels standardized with the training statistics."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return Data(as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test))


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def train(
    method: Method, data: Data, batch_size: int, seed: int, epochs: int, warmup_epochs: int,
    telemetry: bool = False,
) -> tuple[float, Telemetry | None]:
    """Train one model; returns its test accuracy and, if asked, the LARS telemetry."""
    torch.manual_seed(seed)
    model = make_model()
    peak_lr = method.base_lr * batch_size / BASE_BATCH
    sgd = torch.optim.SGD(model.named_parameters(), lr=peak_lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    optimizer = (
        LARS(sgd, coefficient=method.coefficient, use_clip=method.use_clip, telemetry=telemetry)
        if method.lars
        else sgd
    )
    n = len(data.x_train)
    steps_per_epoch = -(-n // batch_size)
    warmup_steps = warmup_epochs * steps_per_epoch
    shuffle = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=shuffle)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = peak_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else peak_lr
            loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return accuracy, getattr(optimizer, "telemetry", None)


def format_table(results: dict[str, dict[int, list[float]]], batch_sizes: list[int]) -> str:
    header = "| optimizer | " + " | ".join(f"B={b} (lr x{b / BASE_BATCH:.3g})" for b in batch_sizes) + " |"
    lines = [header, "|" + "---|" * (len(batch_sizes) + 1)]
    for label, by_batch in results.items():
        cells = []
        for b in batch_sizes:
            accs = by_batch[b]
            spread = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{100 * statistics.fmean(accs):.1f} ± {100 * spread:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="SGD-momentum vs LARS at growing batch sizes with a linearly scaled lr, "
        "on sklearn's digits.",
        epilog="example: python examples/large_batch_digits.py --quick --out /tmp/digits",
    )
    parser.add_argument(
        "--quick", action="store_true", help="reduced form for CI: 2 optimizers, 2 batch sizes, 1 seed"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("large_batch_digits_out"), help="output folder (created)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 10; 1 with --quick)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs per run (default 30; 12 with --quick)"
    )
    parser.add_argument(
        "--batch-sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=None,
        help="comma-separated; 0 means the whole training set (default 32,128,512,0; 32,0 with --quick)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and leaves the other core free
    data = load_data()
    n = len(data.x_train)
    seeds = args.seeds or (1 if args.quick else 10)
    epochs = args.epochs or (12 if args.quick else 30)
    warmup_epochs = max(1, epochs // 6)
    batch_sizes = [b or n for b in (args.batch_sizes or ([32, 0] if args.quick else [32, 128, 512, 0]))]
    methods = QUICK_METHODS if args.quick else METHODS
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    results: dict[str, dict[int, list[float]]] = {}
    for method in methods:
        for b in batch_sizes:
            accs = [train(method, data, b, seed, epochs, warmup_epochs)[0] for seed in range(seeds)]
            results.setdefault(method.label, {})[b] = accs
            print(
                f"[{time.perf_counter() - started:5.1f}s] {method.label:<52} B={b:<5} "
                f"acc {100 * statistics.fmean(accs):.1f}%",
                file=sys.stderr,
                flush=True,
            )

    lars = next(m for m in methods if m.lars)
    largest = max(batch_sizes)
    _, telemetry = train(lars, data, largest, 0, epochs, warmup_epochs, telemetry=True)
    assert telemetry is not None
    telemetry.to_csv(args.out / "telemetry.csv")
    telemetry.plot(args.out / "trust_ratio.png", title=f"{lars.label}, B={largest}, seed 0")

    table = format_table(results, batch_sizes)
    setup = (
        f"digits: {n} train / {len(data.x_test)} test images; MLP 64-128-128-10; {epochs} epochs, "
        f"{warmup_epochs}-epoch linear warm-up, lr = base lr x B/{BASE_BATCH}, momentum {MOMENTUM}, "
        f"weight decay {WEIGHT_DECAY}; test accuracy % (mean ± std over {seeds} seed(s)); "
        f"torch {torch.__version__}, {time.perf_counter() - started:.0f} s"
    )
    (args.out / "results.md").write_text(f"{setup}\n\n{table}\n")
    (args.out / "results.json").write_text(
        json.dumps({"setup": setup, "batch_sizes": batch_sizes, "accuracy": results}, indent=1)
    )
    print(f"{setup}\n\n{table}\n\nwrote {args.out}/results.md, results.json, telemetry.csv, trust_ratio.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
