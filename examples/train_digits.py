"""Train a small MLP on scikit-learn's digits with LARS over momentum SGD, printing the loss.

    python examples/train_digits.py            # the defaults below
    python examples/train_digits.py --fused    # the compiled (FX passes + Inductor) step
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import lars_fx


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--coefficient", type=float, default=0.02, help="LARS trust coefficient (eta)")
    parser.add_argument("--fused", action="store_true", help="compile the step with lars-fx's FX passes")
    args = parser.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x))
    train, test = order[:1500], order[1500:]

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    base = torch.optim.SGD(model.named_parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    optimizer = lars_fx.LARS(base, coefficient=args.coefficient, fused=args.fused)
    steps_per_epoch = -(-len(train) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(
        optimizer, total_iters=args.epochs * steps_per_epoch, power=2
    )

    for epoch in range(args.epochs):
        total = 0.0
        for batch in train[torch.randperm(len(train))].split(args.batch_size):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        if epoch % 5 == 0 or epoch == args.epochs - 1:
            with torch.no_grad():
                accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
            print(f"epoch {epoch:3d}  train loss {total / len(train):.4f}  test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
