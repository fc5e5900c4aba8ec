"""The optimizer-step benchmark: LARS and its peers on the parameter shapes of real models.

Every peer steps the same random fp32 parameters and gradients (one tensor per parameter of the
model, named as torch names them, so LARS's default filter applies), and all peers run in one
process so their ratios are comparable. Each peer is built and warmed up in turn; then the timed
steps interleave the peers, one step of each per round, so that load from other processes on a
shared machine hits them alike. Per peer: the median step time over ``iters`` steps; for compiled
peers, the compile time is what the ``warmup`` steps took above that median. Achieved bandwidth
counts 28 bytes per parameter (the norms read w and g; the update reads w, g, v and writes w, v)
and is reported as a share of the copy bandwidth measured in the same run (a large ``copy_``,
bytes read plus bytes written).

On CUDA each timed step is bracketed by events (no host sync inside the timed loop); on the CPU by
the host clock. ``run_benchmark`` never raises for one peer's failure: the row keeps the error as
its note.

``figures``: issue 11's figures (compile, host time, steady step, eager flat, kernels per step), each a ratio
to ``torch.compile(SGD.step)`` in the same run, from one run per shape list.
"""

from .figures import FIGURE_SETS, FigureRow, FigureSet, figure_rows, format_figures, run_figure_set
from .peers import PEERS, TimmLars, available_peers
from .run import BenchReport, BenchRow, format_markdown, run_benchmark
from .shapes import MODELS, ParamShape, reduced, resnet50_shapes, shrunk, small_shapes, vit_l16_shapes

__all__ = [
    "ParamShape",
    "MODELS",
    "resnet50_shapes",
    "vit_l16_shapes",
    "small_shapes",
    "shrunk",
    "reduced",
    "TimmLars",
    "PEERS",
    "BenchRow",
    "BenchReport",
    "available_peers",
    "run_benchmark",
    "format_markdown",
    "FigureSet",
    "FigureRow",
    "FIGURE_SETS",
    "run_figure_set",
    "figure_rows",
    "format_figures",
]
