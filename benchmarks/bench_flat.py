"""Issue 11's figures: LARS fused, flat fused and eager against torch.compile(SGD.step); write a table.

    python benchmarks/bench_flat.py --figures all --device cpu --threads 2
    python benchmarks/bench_flat.py --figures resnet50,host --device cuda
    python benchmarks/bench_flat.py --figures host --reduced      # the pipeline in seconds, small shapes

Figure sets (one benchmark run each, in this order for ``all``): resnet50 (first compile, steady step, eager
flat vs foreach, kernels per step), host (host time per step on ResNet-50's tensors at 4 elements),
small_1000, vitl, small_10000 (first compile, kernels; vitl also the steady step). The markdown (the issue's
table, then each run's full table) goes to ``--out``, by default
``benchmarks/results/flat_figures_<device>[_reduced].md``, rewritten after each set, so that a run cut short
keeps the sets it finished; progress goes to stderr. Needs lars-fx installed (``pip install -e . --no-deps``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lars_fx.bench import FIGURE_SETS, format_figures, run_figure_set

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--figures", default="all", help=f"'all' or comma-separated figure sets: {', '.join(FIGURE_SETS)}"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--iters", type=int, default=20, help="timed steps per peer (median reported)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per peer, compiles included (>= 3 for the fused)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--reduced", action="store_true", help="each set's first tensors only, small: a check of the pipeline"
    )
    parser.add_argument(
        "--warm-compile",
        action="store_true",
        help="keep Inductor's caches (compile times shrink, kernels are not counted)",
    )
    parser.add_argument("--note", action="append", default=[], help="a line added to the header (repeatable)")
    parser.add_argument(
        "--out", type=Path, help="markdown file (default: benchmarks/results/flat_figures_<device>.md)"
    )
    return parser.parse_args(argv)


def selected_sets(figures: str) -> list[str]:
    if figures == "all":
        return list(FIGURE_SETS)
    keys = [key.strip() for key in figures.split(",") if key.strip()]
    unknown = [key for key in keys if key not in FIGURE_SETS]
    if unknown or not keys:
        raise SystemExit(f"--figures: unknown sets {unknown}; choose 'all' or from {', '.join(FIGURE_SETS)}")
    return keys


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keys = selected_sets(args.figures)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or RESULTS / f"flat_figures_{args.device}{'_reduced' if args.reduced else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = [*args.note, *(["--reduced: each set's first tensors only, small (a check, not a figure)"]
                           if args.reduced else [])]
    results = []
    for key in keys:
        print(f"== {key}", file=sys.stderr, flush=True)
        report = run_figure_set(
            FIGURE_SETS[key],
            args.device,
            warmup=args.warmup,
            iters=args.iters,
            reduced=args.reduced,
            cold_compile=not args.warm_compile,
            progress=lambda message: print(f"  {message}", file=sys.stderr, flush=True),
        )
        results.append((FIGURE_SETS[key], report))
        out.write_text(format_figures(results, notes))
        print(f"{key} done: written to {out}", file=sys.stderr, flush=True)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
