"""Time one optimizer step of LARS and its peers on a real model's parameter shapes; write a table.

    python benchmarks/bench_step.py --model resnet50 --device cpu --iters 15 --threads 1
    python benchmarks/bench_step.py --model vitl --device cuda --iters 100
    python benchmarks/bench_step.py --model resnet50 --reduced        # the machinery in seconds, no figure

Needs lars-fx installed (``pip install -e . --no-deps`` from the repository root). The markdown
(date, machine, copy bandwidth, one row per peer) goes to ``--out``, by default
``benchmarks/results/step_<model>_<device>.md``, and to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lars_fx.bench import MODELS, PEERS, format_markdown, reduced, run_benchmark

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--iters", type=int, default=20, help="timed steps per peer (median reported)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per peer, compiles included (>= 2)"
    )
    parser.add_argument(
        "--peers", help=f"comma-separated subset of: {', '.join(PEERS)} (default: all that run on the device)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's); on a CPU shared with other jobs, 1 avoids OpenMP "
        "threads waiting on descheduled peers, which inflates eager times many-fold",
    )
    parser.add_argument(
        "--warm-compile", action="store_true", help="keep Inductor's caches (compile times shrink)"
    )
    parser.add_argument(
        "--reduced", action="store_true", help="the first 8 tensors at 64 elements: a check, not a figure"
    )
    parser.add_argument("--note", action="append", default=[], help="a line added to the header (repeatable)")
    parser.add_argument(
        "--out", type=Path, help="markdown file (default: benchmarks/results/step_<model>_<device>.md)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_benchmark(
        args.model,
        args.device,
        peers=args.peers.split(",") if args.peers else None,
        warmup=args.warmup,
        iters=args.iters,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
        cold_compile=not args.warm_compile,
        shapes=reduced(MODELS[args.model]()) if args.reduced else None,
    )
    notes = [*args.note, *(["--reduced: the model's first 8 tensors at 64 elements"] if args.reduced else [])]
    table = format_markdown(report, notes)
    suffix = "_reduced" if args.reduced else ""
    out = args.out or RESULTS / f"step_{args.model}_{args.device}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
