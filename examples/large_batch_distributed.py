"""LARS at large batch under data parallelism: large_batch_digits.py's training on several CPU processes.

    torchrun --standalone --nproc_per_node=2 examples/large_batch_distributed.py        # FSDP2, 30 steps
    torchrun --standalone --nproc_per_node=2 examples/large_batch_distributed.py --wrap ddp
    torchrun --standalone --nproc_per_node=2 examples/large_batch_distributed.py --wrap ddp,fsdp2 --steps 3
    python examples/large_batch_distributed.py                                           # one process

The model, data, learning-rate rule and LARS settings are those of examples/large_batch_digits.py: an MLP
(64-128-128-10) on scikit-learn's digits, every step one batch of the whole training split (1,437 images),
lr = base lr x B/32 with a linear warm-up over the first sixth of the steps, and LARS with clip (eta 0.02,
base lr 0.05), the setting that keeps training where SGD-momentum diverges. Each rank takes every
world-size-th image of the batch; DistributedDataParallel (``--wrap ddp``) or FSDP2's ``fully_shard``
(``--wrap fsdp2``, every Linear sharded across the ranks) averages the gradients, and ``lars_fx.LARS`` steps
the parameters: the replicated ones under DDP, the DTensor shards under FSDP2, whose per-layer norms it
reduces across the ranks. The loss of each rank's images is summed and divided by the global batch size
times the world size, so the averaged gradient is the full batch's: every wrap follows the one-process run
(``python examples/large_batch_distributed.py``) step for step, to rounding (``--dtype float64`` shows it).

Rank 0 prints the loss of each step and the final test accuracy. gloo on loopback, one thread per rank.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from large_batch_digits import BASE_BATCH, METHODS, MOMENTUM, WEIGHT_DECAY, Data, load_data, make_model
from lars_fx import LARS

LARS_CLIP = next(m for m in METHODS if m.lars and m.use_clip)  # "LARS + clip (eta=0.02), base lr 0.05"
WRAPS = ("ddp", "fsdp2")
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wrap", default="fsdp2",
                        help="ddp, fsdp2, or both as ddp,fsdp2 (one after the other, in one launch)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument(
        "--batch-size", type=int, default=0, help="global batch (default 0: the whole training split)"
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--fused", action="store_true", help="LARS(fused=True): the step compiled by Inductor"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.wrap = args.wrap.split(",")
    if any(wrap not in WRAPS for wrap in args.wrap):
        parser.error(f"--wrap takes {', '.join(WRAPS)} or both, comma-separated; got {','.join(args.wrap)}")
    if args.steps < 1 or args.batch_size < 0:
        parser.error("need --steps >= 1 and --batch-size >= 0")
    return args


def wrap_model(model: nn.Module, wrap: str | None) -> nn.Module:
    """``model`` for data parallelism: DDP, or FSDP2 with every Linear its own shard unit; as is in one
    process."""
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        return fully_shard(model)
    return model


def batches(num_examples: int, batch_size: int, seed: int):
    """Index tensors of the global batches, epoch after epoch (the same on every rank)."""
    order = torch.Generator().manual_seed(seed)
    while True:
        permutation = torch.randperm(num_examples, generator=order) if batch_size < num_examples else None
        for start in range(0, num_examples, batch_size):
            yield torch.arange(start, min(start + batch_size, num_examples)) if permutation is None else (
                permutation[start : start + batch_size]
            )


def global_sum(value: Tensor) -> Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def train(data: Data, wrap: str | None, args: argparse.Namespace, log) -> float:
    """Train one model; log each step's loss (over the whole global batch); return the test accuracy."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in the one-process run
    model = wrap_model(make_model().to(dtype), wrap)
    n = len(data.x_train)
    batch_size = args.batch_size or n
    peak_lr = LARS_CLIP.base_lr * batch_size / BASE_BATCH
    warmup_steps = max(1, args.steps // 6)
    sgd = torch.optim.SGD(model.named_parameters(), lr=peak_lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    optimizer = LARS(sgd, coefficient=LARS_CLIP.coefficient, use_clip=LARS_CLIP.use_clip, fused=args.fused)
    x_train, x_test = data.x_train.to(dtype), data.x_test.to(dtype)
    for step, batch in enumerate(itertools.islice(batches(n, batch_size, args.seed), args.steps)):
        lr = peak_lr * min(1.0, (step + 1) / warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = batch[rank::world]
        # The gradient of the global batch's mean loss, once DDP / FSDP2 average the ranks' gradients.
        loss_sum = nn.functional.cross_entropy(model(x_train[mine]), data.y_train[mine], reduction="sum")
        optimizer.zero_grad()
        (loss_sum * (world / len(batch))).backward()
        optimizer.step()
        log(f"step {step + 1:3d}  lr {lr:.4f}  loss {global_sum(loss_sum.detach()).item() / len(batch):.12g}")
    with torch.no_grad():  # every rank runs the forward: FSDP2 gathers the shards for it
        return (model(x_test).argmax(1) == data.y_test).to(torch.float64).mean().item()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # a tiny model, and the ranks share the machine's cores
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # by torchrun
    if launched:
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    log = (lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None)
    try:
        data = load_data()
        batch_size = args.batch_size or len(data.x_train)
        for wrap in args.wrap if launched else [None]:
            where = f"{wrap.upper()} on {world} ranks (gloo)" if wrap else "one process"
            log(
                f"== {where}: digits, MLP 64-128-128-10, global batch {batch_size}, {LARS_CLIP.label} "
                f"(lr x{batch_size / BASE_BATCH:.3g}), {args.steps} steps, {args.dtype}"
                + (", fused" if args.fused else "")
            )
            started = time.perf_counter()
            accuracy = train(data, wrap, args, log)
            seconds = time.perf_counter() - started
            log(f"{wrap or 'single'}: final test accuracy {100 * accuracy:.2f}% ({seconds:.1f} s)")
    finally:
        if launched:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
