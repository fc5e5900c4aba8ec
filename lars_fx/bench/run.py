"""Timing the peers side by side, and the markdown table."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from torch import Tensor

from ..functional import LarsOptions
from .peers import LR, MOMENTUM, PEERS, WEIGHT_DECAY, NamedParams, Peer, Step, available_peers, lars_mask
from .shapes import MODELS, ParamShape

BYTES_PER_PARAM = 28

# -- results -------------------------------------------------------------------------------------


@dataclass
class BenchRow:
    """One peer's result. Times in ms, compile time in s; ratios are this row's time over the other's."""

    peer: str
    label: str
    median_ms: float | None = None
    iqr_ms: float | None = None
    compile_s: float | None = None
    vs_compiled_sgd: float | None = None
    vs_fused_lars: float | None = None
    bandwidth_gbs: float | None = None
    bandwidth_share: float | None = None
    note: str = ""


@dataclass
class BenchReport:
    """What ran where: the shapes, the machine, the copy bandwidth and its floor, and the rows."""

    model: str
    device: str
    device_name: str
    num_tensors: int
    num_lars_tensors: int
    num_params: int
    copy_gbs: float
    floor_ms: float
    warmup: int
    iters: int
    date: str
    machine: str
    rows: list[BenchRow]


# -- timing --------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(step: Step, device: torch.device, steps: int) -> list[float]:
    """Wall seconds of each warmup step, synced, so that compiles and graph captures show."""
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


class _StepTimes:
    """Times single steps: with CUDA events read once at the end (no sync between steps), or the host
    clock."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._ms: list[float] = []

    def time(self, step: Step) -> None:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            self._events.append((start, end))
        else:
            start_s = time.perf_counter()
            step()
            self._ms.append((time.perf_counter() - start_s) * 1e3)

    def milliseconds(self) -> list[float]:
        _sync(self.device)
        return self._ms + [start.elapsed_time(end) for start, end in self._events]


def _copy_step(device: torch.device) -> tuple[Step, int]:
    """A large device-local ``copy_`` (the bandwidth ceiling) and the bytes it reads plus writes."""
    src = torch.randn(2**28 if device.type == "cuda" else 2**25, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.nbytes


def _time_interleaved(
    steps: dict[str, Step], device: torch.device, iters: int, progress: Callable[[str], None]
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """One step of each entry per round, so that load from other processes hits every entry alike.

    Returns each surviving entry's step times (ms) and the error note of each entry that failed.
    """
    times = {key: _StepTimes(device) for key in steps}
    live, failures = dict(steps), {}
    for _ in range(iters):
        for key, step in list(live.items()):
            try:
                times[key].time(step)
            except Exception as error:  # one peer's failure is a row note, never the end of the table
                failures[key] = _error_note(error)
                progress(f"{key}: {failures[key]}")
                del live[key]
    return {key: times[key].milliseconds() for key in live}, failures


# -- the run -------------------------------------------------------------------------------------


def _make_params(
    shapes: Sequence[ParamShape], device: torch.device, grads: Sequence[Tensor] | None = None
) -> NamedParams:
    """Fresh parameters; their ``.grad`` are ``grads`` when given, fresh tensors otherwise."""
    named = []
    for index, (name, shape) in enumerate(shapes):
        param = torch.nn.Parameter(torch.empty(shape, device=device))
        param.grad = grads[index] if grads is not None else torch.empty_like(param)
        named.append((name, param))
    return named


@torch.no_grad()
def _fill_random(named: NamedParams, device: torch.device, seed: int) -> None:
    """The same random weights and gradients for every peer (never zeros: they can time faster)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for _, param in named:
        param.normal_(0.0, 0.05, generator=generator)
        assert param.grad is not None  # _make_params gives every parameter one
        param.grad.normal_(0.0, 1e-3, generator=generator)


def _error_note(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 160 else text[:157] + "..."


def _row(peer: Peer, step_ms: list[float] | None, warmup_s: list[float] | None, note: str) -> BenchRow:
    row = BenchRow(peer.key, peer.label, note=note)
    if step_ms:
        row.median_ms = statistics.median(step_ms)
        row.iqr_ms = _iqr(step_ms)
        if peer.compiled and warmup_s is not None:
            row.compile_s = sum(max(0.0, s - row.median_ms * 1e-3) for s in warmup_s)
    return row


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def _fill_ratios(rows: list[BenchRow], num_params: int, copy_gbs: float) -> None:
    medians = {row.peer: row.median_ms for row in rows}
    sgd_ms, fused_ms = medians.get("sgd_compiled"), medians.get("lars_fused")
    for row in rows:
        if row.median_ms is None:
            continue
        row.vs_compiled_sgd = row.median_ms / sgd_ms if sgd_ms else None
        row.vs_fused_lars = row.median_ms / fused_ms if fused_ms else None
        row.bandwidth_gbs = BYTES_PER_PARAM * num_params / (row.median_ms * 1e-3) / 1e9
        row.bandwidth_share = row.bandwidth_gbs / copy_gbs


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _machine() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{platform.system()} {platform.machine()}, {usable} usable CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    )


def run_benchmark(
    model: str = "resnet50",
    device: str | None = None,
    peers: Sequence[str] | None = None,
    warmup: int = 3,
    iters: int = 20,
    progress: Callable[[str], None] | None = None,
    *,
    shapes: Sequence[ParamShape] | None = None,
    cold_compile: bool = True,
    seed: int = 0,
) -> BenchReport:
    """Time one optimizer step of every peer on ``model``'s parameter shapes, side by side.

    Each peer is built and warmed up in turn (compiles happen here), starting from the same random
    weights and gradients; then the timed steps run in rounds of one step per peer. Each peer steps
    parameters of its own (as in training, nothing else writes them between its steps); the
    gradients are shared, except by peers that scale them in place. Ends with ``torch._dynamo.reset()`` when a
    compiled peer ran.

    Args:
        model: a key of ``MODELS`` ("resnet50", "vitl"); with ``shapes``, only the report's label.
        device: "cpu", "cuda", "cuda:1"...; None picks CUDA when available.
        peers: keys of ``PEERS`` in any order (the table keeps ``PEERS``'s order); None runs every
            peer that runs on ``device`` (``available_peers``).
        warmup: untimed steps per peer; compiled peers compile here, so keep it >= 2 (the first step
            creates the momentum buffers, the second recompiles for them).
        iters: timed steps per peer; the row's time is their median.
        progress: called with a short message as each peer is warmed up, fails, and when timing starts.
        shapes: a shape list of your own instead of ``MODELS[model]``.
        cold_compile: disable Inductor's caches so compile times are those of a first run.
        seed: seeds the random weights and gradients.
    """
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if shapes is None:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODELS)} or pass shapes=")
        shapes = MODELS[model]()
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    usable = available_peers(resolved)
    wanted = usable if peers is None else list(peers)
    unknown = [key for key in wanted if key not in usable]
    if unknown:
        raise ValueError(f"peers {unknown} do not run on {resolved.type}; choose from {usable}")
    selected = [PEERS[key] for key in usable if key in wanted]
    report_progress = progress or (lambda message: None)

    shared_grads = [torch.empty(shape, device=resolved) for _, shape in shapes]
    # names and sizes, for the report
    named = [(name, grad) for (name, _), grad in zip(shapes, shared_grads, strict=True)]
    num_params = sum(g.numel() for g in shared_grads)
    copy, copy_bytes = _copy_step(resolved)
    _warm_up(copy, resolved, 2)
    # The copy is timed in the same rounds as the peers, under the same load.
    steps: dict[str, Step] = {"copy": copy}
    warmup_s: dict[str, list[float]] = {}
    failures: dict[str, str] = {}
    # Several compiled optimizers share Optimizer.step's wrapper frame: room for all their graphs.
    with torch._dynamo.config.patch(cache_size_limit=64), torch._inductor.config.patch(
        force_disable_caches=cold_compile  # every compiled peer pays its full compile, as on a first run
    ):
        for peer in selected:
            report_progress(f"{peer.key}: build and warm up")
            own = _make_params(shapes, resolved, None if peer.writes_grads else shared_grads)
            _fill_random(own, resolved, seed)
            try:
                steps[peer.key] = peer.build(own)
                warmup_s[peer.key] = _warm_up(steps[peer.key], resolved, warmup)
            except Exception as error:  # one peer's failure is a row note, never the end of the table
                steps.pop(peer.key, None)
                failures[peer.key] = _error_note(error)
                report_progress(f"{peer.key}: {failures[peer.key]}")
        report_progress(f"timing {len(steps) - 1} peers and the copy, {iters} rounds")
        step_ms, timing_failures = _time_interleaved(steps, resolved, iters, report_progress)
    del steps
    if any(peer.compiled for peer in selected):
        torch._dynamo.reset()
    failures.update(timing_failures)
    copy_gbs = copy_bytes / (statistics.median(step_ms.pop("copy")) * 1e-3) / 1e9
    rows = [
        _row(peer, step_ms.get(peer.key), warmup_s.get(peer.key), failures.get(peer.key, ""))
        for peer in selected
    ]
    _fill_ratios(rows, num_params, copy_gbs)
    return BenchReport(
        model=model,
        device=str(resolved),
        device_name=_device_name(resolved),
        num_tensors=len(named),
        num_lars_tensors=sum(lars_mask(named)),
        num_params=num_params,
        copy_gbs=copy_gbs,
        floor_ms=BYTES_PER_PARAM * num_params / (copy_gbs * 1e9) * 1e3,
        warmup=warmup,
        iters=iters,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=_machine(),
        rows=rows,
    )


# -- the table -----------------------------------------------------------------------------------


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _spread_warnings(rows: Sequence[BenchRow]) -> list[str]:
    noisy = [row.label for row in rows if row.median_ms is not None and (row.iqr_ms or 0.0) > row.median_ms]
    if not noisy:
        return []
    return [
        (f"- **unreliable timings**: the spread (IQR) exceeds the median for {', '.join(noisy)}; the machine "
         "was probably busy: rerun on an idle machine, or with more --iters")
    ]


def format_markdown(report: BenchReport, notes: Sequence[str] = ()) -> str:
    """The report as markdown: a header of what ran where, then one table row per peer."""
    lines = [
        f"# Optimizer step: {report.model} shapes on {report.device}",
        "",
        f"- date: {report.date}",
        f"- machine: {report.machine}; device: {report.device_name}",
        (f"- shapes: {report.num_tensors} fp32 tensors ({report.num_lars_tensors} under LARS's default "
         f"filter), {report.num_params:,} parameters"),
        (f"- step: lr={LR}, momentum={MOMENTUM}, weight_decay={WEIGHT_DECAY}; LARS coefficient "
         f"{LarsOptions().coefficient}"),
        (f"- timing: median of {report.iters} steps after {report.warmup} warmup steps, the peers "
         "interleaved (one step each per round); "
         "compile s = what the warmup steps took above the median; × columns = this row's time over the "
         "reference's (> 1: slower)"),
        (f"- copy bandwidth: {report.copy_gbs:.1f} GB/s (a large copy_ timed in the same rounds, read + "
         f"write); floor at {BYTES_PER_PARAM} B/param: "
         f"{report.floor_ms:.3f} ms; GB/s = {BYTES_PER_PARAM} B/param over the row's time for every row "
         "(the bytes a LARS step moves without carried norms: the norms read w and g, the update reads w, g, "
         "v and writes w, v), although SGD moves 20 and LARS with carried weight norms 24"),
        *(f"- {note}" for note in notes),
        *_spread_warnings(report.rows),
        "",
        ("| peer | median ms | IQR ms | compile s | × compiled SGD | × fused LARS | GB/s | % of copy BW "
         "| note |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report.rows:
        share = None if row.bandwidth_share is None else 100 * row.bandwidth_share
        compile_s = "" if row.compile_s is None else f"{row.compile_s:.1f}"
        lines.append(
            f"| {row.label} | {_cell(row.median_ms, '.3f')} | {_cell(row.iqr_ms, '.3f')} | {compile_s} "
            f"| {_cell(row.vs_compiled_sgd, '.2f', '×')} | {_cell(row.vs_fused_lars, '.2f', '×')} "
            f"| {_cell(row.bandwidth_gbs, '.1f')} | {_cell(share, '.1f', '%')} | {row.note} |"
        )
    return "\n".join(lines) + "\n"
