"""Issue 11's figures (its "Measured" table), read from runs of the step benchmark.

Each figure is a ratio to the same figure of ``torch.compile(SGD.step)`` (torch's SGD, foreach, compiled)
in the same run: first compile, host time per step (ResNet-50's tensors shrunk to 4 elements), steady step;
besides, eager ``LARS(flat=True)`` against eager foreach LARS, and the kernels Inductor generates per step. A
figure set is one ``run_benchmark`` on one shape list with the peers its figures need; ``format_figures``
puts the issue's table (one column per LARS form, the target, whether ``LARS(flat=True, fused=True)`` meets
it) above each run's full table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .peers import PEERS, available_peers
from .run import BenchReport, BenchRow, format_markdown, run_benchmark
from .shapes import MODELS, ParamShape
from .shapes import reduced as reduced_shapes

SGD = "sgd_compiled"
FUSED = "lars_fused"
FLAT_FUSED = "lars_flat_fused"
FOREACH = "lars_foreach"
FLAT = "lars_flat"
COMPARED = (FUSED, FLAT_FUSED, SGD)  # the issue table's columns

# The bytes per parameter of a LARS step that carries its weight norms: the floor of the GPU targets.
FLOOR_BYTES_PER_PARAM = 24


@dataclass(frozen=True)
class FigureSet:
    """One benchmark run: ``model`` (a key of ``MODELS``), the peers it times (those that do not run on the
    device are left out), and the figures read from it (``compile``, ``step``, ``host``, ``eager``,
    ``kernels``)."""

    key: str
    model: str
    title: str
    peers: tuple[str, ...]
    figures: tuple[str, ...]


FIGURE_SETS: dict[str, FigureSet] = {
    figure_set.key: figure_set
    for figure_set in (
        FigureSet(
            "resnet50",
            "resnet50",
            "ResNet-50 shapes",
            (FOREACH, "lars_foreach_cudagraph", FLAT, "lars_flat_cudagraph", FUSED, FLAT_FUSED,
             "lars_backend", SGD, "sgd_foreach_cudagraph"),
            ("compile", "step", "eager", "kernels"),
        ),
        FigureSet("host", "resnet50_tiny", "ResNet-50's 161 tensors shrunk to 4 elements",
                  (FOREACH, FLAT, *COMPARED), ("host",)),
        FigureSet("small_1000", "small_1000", "1,000 small tensors (64 elements)", COMPARED,
                  ("compile", "kernels")),
        FigureSet("vitl", "vitl", "ViT-L shapes", COMPARED, ("compile", "step", "kernels")),
        FigureSet("small_10000", "small_10000", "10,000 small tensors (64 elements)", COMPARED,
                  ("compile", "kernels")),
    )
}


@dataclass(frozen=True)
class Target:
    """The issue's target for the flat fused step: at most ``bound`` (at least, for a speed-up)."""

    bound: float
    text: str
    at_least: bool = False

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.bound if self.at_least else value <= self.bound


COMPILE_TARGETS = {"resnet50": Target(0.2, "≤ 0.2×"), "vitl": Target(0.15, "≤ 0.15×")}
SMALL_COMPILE_TARGET = Target(0.1, "≤ 0.1×, flat in the tensor count")
STEP_TARGETS = {"resnet50": Target(1.05, "≤ 1.05×"), "vitl": Target(1.15, "≤ 1.15×")}
HOST_TARGET = Target(0.2, "≤ 0.2×")
EAGER_TARGET = Target(2.0, "≥ 2× faster", at_least=True)
KERNELS_PER_DEVICE_DTYPE = 4
# On CUDA (the GPU targets): the step against its memory floor, and the first compile in seconds.
GPU_FLOOR_TARGETS = {"resnet50": Target(2.0, "≤ 2× the floor"), "vitl": Target(1.15, "≤ 1.15× the floor")}
GPU_COMPILE_TARGET = Target(5.0, "≤ 5 s")


def figure_shapes(figure_set: FigureSet, reduced: bool = False) -> list[ParamShape]:
    shapes = MODELS[figure_set.model]()
    return reduced_shapes(shapes) if reduced else shapes


def run_figure_set(
    figure_set: FigureSet,
    device: str,
    *,
    warmup: int = 3,
    iters: int = 20,
    reduced: bool = False,
    cold_compile: bool = True,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """``run_benchmark`` on the set's shapes (``reduced``: its first few tensors, small) with its peers."""
    peers = [key for key in figure_set.peers if key in available_peers(device)]
    return run_benchmark(
        figure_set.key,
        device,
        peers=peers,
        warmup=warmup,
        iters=iters,
        progress=progress,
        shapes=figure_shapes(figure_set, reduced),
        cold_compile=cold_compile,
    )


# -- the table ---------------------------------------------------------------------------


@dataclass
class FigureRow:
    """One line of the issue's table: a cell per ``COMPARED`` peer, the target, and whether the flat fused
    step meets it (None: it has no value)."""

    label: str
    cells: list[str]
    target: str
    met: bool | None


def _title(figure_set: FigureSet, report: BenchReport) -> str:
    """The set's title, saying so when the run had fewer tensors than the set (``reduced``)."""
    if report.num_tensors == len(MODELS[figure_set.model]()):
        return figure_set.title
    return f"{figure_set.title}, reduced to {report.num_tensors} tensors"


def _rows_by_peer(report: BenchReport) -> dict[str, BenchRow]:
    return {row.peer: row for row in report.rows}


def _failed(row: BenchRow | None) -> str:
    if row is None:
        return "not run"
    return "failed (see its table)" if row.note else "n/a"


def _ratio_row(
    label: str, report: BenchReport, value: Callable[[BenchRow], float | None], unit: str, target: Target
) -> FigureRow:
    """``value`` of each compared peer as a ratio to compiled SGD's, with the value itself."""
    rows = _rows_by_peer(report)
    sgd = rows.get(SGD)
    reference = value(sgd) if sgd is not None else None
    cells, ratios = [], {}
    for key in COMPARED:
        row = rows.get(key)
        own = value(row) if row is not None else None
        if own is None:
            cells.append(_failed(row))
            continue
        absolute = f"{own:.3f} {unit}" if unit == "ms" else f"{own:.1f} {unit}"
        if key == SGD:
            cells.append(absolute)
        elif reference:
            ratios[key] = own / reference
            cells.append(f"{ratios[key]:.2f}× ({absolute})")
        else:
            cells.append(f"{absolute}, SGD's missing")
    return FigureRow(label, cells, target.text, target.met(ratios.get(FLAT_FUSED)))


def _compile_rows(figure_set: FigureSet, report: BenchReport) -> list[FigureRow]:
    title = _title(figure_set, report)
    target = COMPILE_TARGETS.get(figure_set.key, SMALL_COMPILE_TARGET)
    rows = [_ratio_row(f"first compile, {title}", report, lambda r: r.compile_s, "s", target)]
    if report.device.startswith("cuda"):
        flat = _rows_by_peer(report).get(FLAT_FUSED)
        seconds = flat.compile_s if flat is not None else None
        cells = ["", "n/a" if seconds is None else f"{seconds:.1f} s", ""]
        rows.append(FigureRow(f"first compile on the GPU, {title}", cells, GPU_COMPILE_TARGET.text,
                              GPU_COMPILE_TARGET.met(seconds)))
    return rows


def _step_rows(figure_set: FigureSet, report: BenchReport) -> list[FigureRow]:
    title = _title(figure_set, report)
    target = STEP_TARGETS.get(figure_set.key, STEP_TARGETS["resnet50"])
    rows = [_ratio_row(f"steady step, {title}", report, lambda r: r.median_ms, "ms", target)]
    if report.device.startswith("cuda") and figure_set.key in GPU_FLOOR_TARGETS:
        rows.append(_floor_row(figure_set, report, GPU_FLOOR_TARGETS[figure_set.key]))
    return rows


def _floor_row(figure_set: FigureSet, report: BenchReport, target: Target) -> FigureRow:
    """Each step's time over the memory floor: 24 B/param at the copy bandwidth measured in the run."""
    floor_ms = FLOOR_BYTES_PER_PARAM * report.num_params / (report.copy_gbs * 1e9) * 1e3
    rows = _rows_by_peer(report)
    multiples = {
        key: rows[key].median_ms / floor_ms  # type: ignore[operator]
        for key in COMPARED
        if key in rows and rows[key].median_ms is not None
    }
    cells = [
        f"{multiples[key]:.2f}× the floor" if key in multiples else _failed(rows.get(key)) for key in COMPARED
    ]
    label = (f"steady step over its memory floor ({FLOOR_BYTES_PER_PARAM} B/param at "
             f"{report.copy_gbs:.0f} GB/s: {floor_ms:.3f} ms), {_title(figure_set, report)}")
    return FigureRow(label, cells, target.text, target.met(multiples.get(FLAT_FUSED)))


def _host_rows(figure_set: FigureSet, report: BenchReport) -> list[FigureRow]:
    label = f"host time per step, {_title(figure_set, report)}"
    return [_ratio_row(label, report, lambda r: r.median_ms, "ms", HOST_TARGET)]


def _eager_rows(figure_set: FigureSet, report: BenchReport) -> list[FigureRow]:
    """Eager flat LARS's speed-up over eager foreach LARS (foreach's time over flat's)."""
    rows = _rows_by_peer(report)
    foreach, flat = rows.get(FOREACH), rows.get(FLAT)
    speedup = None
    if foreach is not None and flat is not None and foreach.median_ms and flat.median_ms:
        speedup = foreach.median_ms / flat.median_ms
        cell = f"{speedup:.2f}× faster ({flat.median_ms:.3f} vs {foreach.median_ms:.3f} ms)"
    elif flat is None or flat.median_ms is None:
        cell = f"flat: {_failed(flat)}"
    else:
        cell = f"foreach: {_failed(foreach)}"
    label = f"eager LARS(flat=True) vs eager foreach LARS, {_title(figure_set, report)}"
    return [FigureRow(label, ["", cell, ""], EAGER_TARGET.text, EAGER_TARGET.met(speedup))]


def _kernel_rows(figure_set: FigureSet, report: BenchReport) -> list[FigureRow]:
    """Kernels per step; every set is one device and one dtype (fp32), so the bound is the per-pair one."""
    rows = _rows_by_peer(report)
    cells = []
    for key in COMPARED:
        row = rows.get(key)
        cells.append(str(row.kernels) if row is not None and row.kernels is not None else _failed(row))
    flat = rows.get(FLAT_FUSED)
    kernels = flat.kernels if flat is not None else None
    met = None if kernels is None else kernels <= KERNELS_PER_DEVICE_DTYPE
    return [FigureRow(f"kernels Inductor generates per step, {_title(figure_set, report)}", cells,
                      f"≤ {KERNELS_PER_DEVICE_DTYPE} per (device, dtype)", met)]


FIGURE_ROWS: dict[str, Callable[[FigureSet, BenchReport], list[FigureRow]]] = {
    "compile": _compile_rows,
    "host": _host_rows,
    "step": _step_rows,
    "eager": _eager_rows,
    "kernels": _kernel_rows,
}


def figure_rows(results: Sequence[tuple[FigureSet, BenchReport]]) -> list[FigureRow]:
    """The issue's table in its order (figure by figure, set by set)."""
    return [
        row
        for figure in FIGURE_ROWS
        for figure_set, report in results
        if figure in figure_set.figures
        for row in FIGURE_ROWS[figure](figure_set, report)
    ]


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "–"}[met]


def format_figures(results: Sequence[tuple[FigureSet, BenchReport]], notes: Sequence[str] = ()) -> str:
    """The issue's table for the runs in ``results``, then each run's full table."""
    if not results:
        raise ValueError("format_figures needs at least one run")
    first = results[0][1]
    labels = [PEERS[key].label for key in COMPARED]
    lines = [
        f"# Issue 11's figures on {first.device}",
        "",
        f"- date: {first.date}",
        f"- machine: {first.machine}; device: {first.device_name}",
        ("- every figure is a ratio to the same figure of torch.compile(SGD.step) (torch.optim.SGD, foreach) "
         "in the same run (absolute values in parentheses); `met` judges LARS(flat=True, fused=True), or "
         "eager LARS(flat=True) for the eager row"),
        ("- first compile = what the warmup steps took above the median step, with cold caches "
         "(see each run's header); kernels = those generated for the steady step's graphs"),
        *(f"- {note}" for note in notes),
        "",
        f"| figure | {' | '.join(labels)} | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in figure_rows(results):
        lines.append(f"| {row.label} | {' | '.join(row.cells)} | {row.target} | {_met(row.met)} |")
    for figure_set, report in results:
        _, *table = format_markdown(report).rstrip().splitlines()  # its title gives way to the set's
        lines += ["", f"## {_title(figure_set, report)} (`{figure_set.key}`)", *table]
    return "\n".join(lines) + "\n"
