r"""Time one LARS step on FSDP2-sharded parameters against the same math with no collective; write a table.

    python benchmarks/bench_distributed.py                                  # ResNet-50 shapes, 2 ranks, gloo
    python benchmarks/bench_distributed.py --model vitl --tensors 52        # a slice of ViT-L/16 (4 blocks)
    python benchmarks/bench_distributed.py --model vitl                     # all of ViT-L: ~8 GiB per rank
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_distributed.py \
        --rows lars_eager,local_no_collective

Without torchrun the script spawns ``--nproc`` ranks itself (gloo on 127.0.0.1). The parameters are
``fully_shard``-ed (FSDP2) on a 1-D mesh of every rank: DTensors with ``Shard(0)``, uneven where the first
dimension does not divide. Every row steps its own copy of the same random weights with the same gradients:

- ``lars_eager`` / ``lars_fused``: ``lars_fx.LARS(SGD(...))`` on the DTensor parameters, eager foreach and
  ``fused=True``: the sharded LARS step, whose target is 1.3x the local step with no collective.
- ``local_no_collective``: ``lars_fx.functional.lars_sgd_foreach`` on each rank's local shards, local
  gradients and local momentum buffers: per-shard trust ratios, wrong numbers on purpose, the floor of the
  sharded step.
- ``dtensor_functional``: ``lars_sgd_foreach`` called on the DTensors themselves (DTensor dispatch reduces the
  norms): the eager sharded step as it was before lars-fx reduced the norms itself.
- ``sgd_dtensor`` / ``sgd_local``: ``torch.optim.SGD(foreach=True)``, no LARS, on the DTensors and on the
  shards.

Per row: the median and IQR of the slowest rank's step time, the ratio to ``local_no_collective`` in the same
run, the collectives of one untimed step counted with ``torch.profiler`` (one backend event per collective:
``gloo:all_reduce``), and, for the LARS rows, how far their weights end from ``dtensor_functional``'s after
the same steps. The markdown goes to ``--out`` (default
``benchmarks/results/distributed_<model>_<N>xgloo.md``) and stdout; progress to stderr. Needs lars-fx
installed (``pip install -e . --no-deps``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lars_fx import LARS
from lars_fx import functional as F
from lars_fx.bench import MODELS, ParamShape
from lars_fx.bench.peers import LR, MOMENTUM, WEIGHT_DECAY, _fused_lars, _sgd, lars_mask
from lars_fx.bench.run import _device_name, _error_note, _iqr, _machine, _spread_warnings

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

RESULTS = Path(__file__).resolve().parent / "results"
FLOOR = "local_no_collective"
# right numbers by DTensor's own dispatch: the LARS rows' weights are compared to it
REFERENCE = "dtensor_functional"
TARGET_RATIO = 1.3
# Each collective runs once in its backend, which records one event named "<backend>:<collective>".
BACKEND_EVENT_PREFIXES = ("gloo:", "nccl:", "mpi:", "ucc:", "xccl:")

Step = Callable[[], object]


# -- the sharded parameters and the rows ----------------------------------------------------------


@dataclass
class Sharded:
    """One row's own FSDP2 parameters (DTensors), with the names LARS's filter reads; their ``.grad`` are the
    gradients every row shares."""

    names: list[str]
    params: list[nn.Parameter]
    holder: nn.Module  # the fully_shard-ed module that owns ``params``

    def named(self) -> list[tuple[str, nn.Parameter]]:
        return list(zip(self.names, self.params, strict=True))

    @torch.no_grad()
    def local_params(self) -> list[Tensor]:
        return [p.to_local() for p in self.params]

    def local_grads(self) -> list[Tensor]:
        return [p.grad.to_local() for p in self.params]


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    build: Callable[[Sharded], Step]
    compiled: bool = False
    lars_math: bool = False  # computes LARS: its final weights are compared with the reference row's


def _lars_sgd_foreach_step(params: list[Tensor], grads: list[Tensor], mask: list[bool]) -> Step:
    buffers: list[Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step() -> None:
        F.lars_sgd_foreach(
            params, grads, buffers, mask, lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM,
            coefficient=0.001, epsilon=1e-5,
        )

    return step


def _local_no_collective(sharded: Sharded) -> Step:
    return _lars_sgd_foreach_step(sharded.local_params(), sharded.local_grads(), lars_mask(sharded.named()))


def _dtensor_functional(sharded: Sharded) -> Step:
    return _lars_sgd_foreach_step(
        list(sharded.params), [p.grad for p in sharded.params], lars_mask(sharded.named())
    )


def _sgd_local(sharded: Sharded) -> Step:
    # Detached views of the shards: leaf tensors that torch.optim accepts, writing through to the DTensors.
    shards = [piece.detach() for piece in sharded.local_params()]
    for shard, grad in zip(shards, sharded.local_grads(), strict=True):
        shard.grad = grad
    return _sgd(list(zip(sharded.names, shards, strict=True)), foreach=True).step


ROWS: dict[str, Row] = {
    row.key: row
    for row in (
        Row("lars_eager", "LARS (foreach), eager, on FSDP2 DTensors", lambda s: LARS(_sgd(s.named())).step,
            lars_math=True),
        Row("lars_fused", "LARS(fused=True) on FSDP2 DTensors", lambda s: _fused_lars(s.named()),
            compiled=True, lars_math=True),
        Row(FLOOR, "lars_sgd_foreach on local shards, no collective (wrong numbers: the floor)",
            _local_no_collective, lars_math=True),
        Row(REFERENCE, "lars_sgd_foreach on DTensors (DTensor dispatch reduces the norms)",
            _dtensor_functional, lars_math=True),
        Row("sgd_dtensor", "torch SGD(foreach=True) on FSDP2 DTensors, no LARS",
            lambda s: _sgd(s.named(), foreach=True).step),
        Row("sgd_local", "torch SGD(foreach=True) on local shards, no LARS", _sgd_local),
    )
}


def sharded_params(shapes: Sequence[ParamShape], mesh: DeviceMesh) -> Sharded:
    """``shapes`` as parameters of one module, ``fully_shard``-ed on ``mesh`` (built on meta: no full
    copy)."""
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        holder = nn.Module()
        for index, (_, shape) in enumerate(shapes):
            holder.register_parameter(f"p{index}", nn.Parameter(torch.empty(shape)))
    fully_shard(holder, mesh=mesh)
    holder.to_empty(device="cpu")
    params = [holder.get_parameter(f"p{index}") for index in range(len(shapes))]
    return Sharded([name for name, _ in shapes], params, holder)


def _gradients_like(params: Sequence[nn.Parameter]) -> list[Tensor]:
    from torch.distributed.tensor import DTensor

    return [
        DTensor.from_local(
            torch.empty_like(p.to_local()), p.device_mesh, p.placements, run_check=False, shape=p.shape,
            stride=p.stride(),
        )
        for p in params
    ]


@torch.no_grad()
def _fill_random(pieces: Sequence[Tensor], seed: int, std: float) -> None:
    """Each rank's pieces from its own seed: every row starts from the same values (never zeros, which can
    time faster)."""
    generator = torch.Generator().manual_seed(seed)
    for piece in pieces:
        piece.normal_(0.0, std, generator=generator)


# -- agreeing across ranks, timing, counting collectives -------------------------------------------


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any; also lines the ranks up for the next step."""
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _run_agreed(step: Step) -> tuple[float, str | None]:
    """One step on every rank; its wall seconds here and, if it failed on some rank, a note (same on all)."""
    note = None
    start = time.perf_counter()
    try:
        step()
    except Exception as error:  # one row's failure is a note in the table, never the end of the run
        note = _error_note(error)
    seconds = time.perf_counter() - start
    if _any_rank(note is not None):
        return seconds, note or "failed on another rank"
    return seconds, None


def collectives_by_kind(names: Sequence[str]) -> tuple[Counter, str]:
    """Collectives among profiler event ``names``, by kind (``all_reduce``, ...), each counted once; and a
    note when the profiler's two records of them disagree.

    A collective is one ``c10d::`` dispatcher op on the calling thread (inside the frontend's
    ``_c10d_functional::all_reduce`` when there is one) and one backend event (``gloo:all_reduce``, on gloo's
    own thread): the backend events are counted, and the c10d ops checked to be as many.
    """
    backend = Counter(name.split(":", 1)[1] for name in names if name.startswith(BACKEND_EVENT_PREFIXES))
    c10d_ops = sum(name.startswith("c10d::") for name in names)
    if c10d_ops != sum(backend.values()):
        return backend, f"profiler: {sum(backend.values())} backend collective events but {c10d_ops} c10d ops"
    return backend, ""


def count_collectives(step: Step) -> tuple[Counter, str]:
    """Run ``step`` once under ``torch.profiler``; its collectives by kind (see ``collectives_by_kind``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return collectives_by_kind([event.name for event in prof.events()])


def _is_all_reduce(kind: str) -> bool:
    return kind.replace("allreduce", "all_reduce").startswith("all_reduce")  # all_reduce_coalesced too


# -- one rank's run --------------------------------------------------------------------------------


@dataclass
class DistRow:
    """One row of the table; times in ms (each step's slowest rank), compile time in s."""

    key: str
    label: str
    median_ms: float | None = None
    iqr_ms: float | None = None
    compile_s: float | None = None
    vs_floor: float | None = None
    all_reduces: int | None = None
    other_collectives: dict[str, int] = field(default_factory=dict)
    max_weight_diff: float | None = None
    note: str = ""


@dataclass
class DistReport:
    model: str
    shapes_note: str
    world_size: int
    backend: str
    num_tensors: int
    num_lars_tensors: int
    num_params: int
    warmup: int
    iters: int
    date: str
    machine: str
    device_name: str
    rows: list[DistRow]


def _slowest_rank(values: list[float]) -> list[float]:
    """Element-wise maximum over the ranks of equally long lists (every rank ran the same steps)."""
    gathered: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return [max(column) for column in zip(*gathered, strict=True)]


def _max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


@torch.no_grad()
def _max_abs_diff(ours: Sharded, reference: Sharded) -> float:
    pairs = zip(ours.local_params(), reference.local_params(), strict=True)
    diffs = [(a - b).abs().max().item() for a, b in pairs if a.numel()]
    return _max_over_ranks(max(diffs, default=0.0))


def run_rows(
    shapes: Sequence[ParamShape],
    rows: Sequence[Row],
    warmup: int,
    iters: int,
    progress: Callable[[str], None],
    *,
    seed: int = 0,
    cold_compile: bool = True,
) -> list[DistRow]:
    """Build and warm up every row on this rank's mesh, then time them interleaved; collective: every rank
    calls it."""
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    grads: list[Tensor] | None = None
    steps: dict[str, Step] = {}
    params: dict[str, Sharded] = {}
    warmup_s: dict[str, list[float]] = {}
    failures: dict[str, str] = {}
    with torch._dynamo.config.patch(cache_size_limit=64), torch._inductor.config.patch(
        force_disable_caches=cold_compile
    ):
        for row in rows:
            progress(f"{row.key}: build and warm up")
            sharded = sharded_params(shapes, mesh)
            if grads is None:
                grads = _gradients_like(sharded.params)
                _fill_random([g.to_local() for g in grads], seed=1_000 + rank, std=1e-3)
            for param, grad in zip(sharded.params, grads, strict=True):
                param.grad = grad
            _fill_random(sharded.local_params(), seed=rank, std=0.05)
            note = None
            try:
                step = row.build(sharded)
            except Exception as error:
                note, step = _error_note(error), None
            if _any_rank(note is not None):
                failures[row.key] = note or "failed on another rank"
                progress(f"{row.key}: {failures[row.key]}")
                continue
            seconds = []
            for _ in range(warmup):
                elapsed, note = _run_agreed(step)
                if note:
                    failures[row.key] = note
                    break
                seconds.append(elapsed)
            else:
                steps[row.key], params[row.key], warmup_s[row.key] = step, sharded, seconds
            if row.key in failures:
                progress(f"{row.key}: {failures[row.key]}")

        progress(f"timing {len(steps)} rows, {iters} rounds")
        times: dict[str, list[float]] = {key: [] for key in steps}
        for _ in range(iters):
            for key in list(steps):
                elapsed, note = _run_agreed(steps[key])
                if note:
                    failures[key] = note
                    progress(f"{key}: {note}")
                    del steps[key]
                else:
                    times[key].append(elapsed * 1e3)

        counts: dict[str, tuple[Counter, str]] = {}
        for key in list(steps):
            # one more step for every row: the weights stay comparable
            counts[key] = count_collectives(steps[key])
    counts_over_ranks: list[dict[str, tuple[Counter, str]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(counts_over_ranks, counts)
    if any(row.compiled for row in rows):
        torch._dynamo.reset()

    results = []
    for row in rows:
        result = DistRow(row.key, row.label, note=failures.get(row.key, ""))
        if row.key in steps:
            step_ms = _slowest_rank(times[row.key])
            result.median_ms, result.iqr_ms = statistics.median(step_ms), _iqr(step_ms)
            if row.compiled:
                slowest_warmup = _slowest_rank(warmup_s[row.key])
                result.compile_s = sum(max(0.0, s - result.median_ms * 1e-3) for s in slowest_warmup)
            per_rank = [c[row.key][0] for c in counts_over_ranks]
            notes = [result.note, *sorted({c[row.key][1] for c in counts_over_ranks})]
            if any(c != per_rank[0] for c in per_rank):
                notes.append(f"collectives differ between ranks: {[dict(c) for c in per_rank]}")
            result.note = "; ".join(filter(None, notes))
            kinds = per_rank[0]
            result.all_reduces = sum(n for kind, n in kinds.items() if _is_all_reduce(kind))
            result.other_collectives = {
                kind: n for kind, n in sorted(kinds.items()) if not _is_all_reduce(kind)
            }
            if row.lars_math and REFERENCE in steps and row.key != REFERENCE:
                result.max_weight_diff = _max_abs_diff(params[row.key], params[REFERENCE])
        results.append(result)
    floor = next((r.median_ms for r in results if r.key == FLOOR), None)
    for result in results:
        if result.median_ms is not None and floor:
            result.vs_floor = result.median_ms / floor
    return results


# -- the table -------------------------------------------------------------------------------------


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _target_lines(report: DistReport) -> list[str]:
    by_key = {row.key: row for row in report.rows}
    lines = []
    for key in ("lars_eager", "lars_fused"):
        row = by_key.get(key)
        if row is None or row.vs_floor is None:
            continue
        ratio_met = "met" if row.vs_floor <= TARGET_RATIO else "not met"
        count_met = "met" if row.all_reduces == 1 else "not met"
        lines.append(
            f"- target, {row.label}: ≤ {TARGET_RATIO}× the local no-collective step: {row.vs_floor:.2f}× "
            f"({ratio_met}); one all-reduce per step: {row.all_reduces} ({count_met})"
        )
    return lines


def format_markdown(report: DistReport, notes: Sequence[str] = ()) -> str:
    lines = [
        (f"# Optimizer step under FSDP2: {report.model} shapes on {report.world_size} ranks "
         f"({report.backend})"),
        "",
        f"- date: {report.date}",
        f"- machine: {report.machine} per rank; device: {report.device_name}",
        (f"- shapes: {report.num_tensors} fp32 tensors ({report.num_lars_tensors} under LARS's default "
         f"filter), {report.num_params:,} parameters{report.shapes_note}; fully_shard on a 1-D mesh of "
         f"{report.world_size} ranks (Shard(0), uneven where the first dimension does not divide)"),
        (f"- step: lr={LR}, momentum={MOMENTUM}, weight_decay={WEIGHT_DECAY}; LARS coefficient 0.001, "
         "epsilon 1e-5"),
        (f"- timing: each step's time on its slowest rank, median of {report.iters} steps after "
         f"{report.warmup} warmup steps, the rows interleaved (one step each per round, the ranks lined up "
         "by an all-reduce between steps, outside the timed step); compile s = what the warmup steps took "
         "above the median; × local = this row's time over the local no-collective step's"),
        ("- collectives per step: one untimed step under torch.profiler, one backend event per collective "
         "(gloo:all_reduce, ...); the same on every rank unless the note says otherwise"),
        ("- max |Δw|: the largest difference of a row's weights from the DTensor-dispatched "
         "lars_sgd_foreach's after the same steps (the local no-collective step differs on purpose: "
         "per-shard trust ratios)"),
        *_target_lines(report),
        *(f"- {note}" for note in notes),
        *_spread_warnings(report.rows),
        "",
        ("| row | median ms | IQR ms | compile s | × local no-collective | all-reduces / step | other "
         "collectives / step | max abs Δw vs DTensor step | note |"),
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for row in report.rows:
        others = ", ".join(f"{n} {kind}" for kind, n in row.other_collectives.items()) or "0"
        compile_s = "" if row.compile_s is None else f"{row.compile_s:.1f}"
        lines.append(
            f"| {row.label} | {_cell(row.median_ms, '.3f')} | {_cell(row.iqr_ms, '.3f')} | {compile_s} "
            f"| {_cell(row.vs_floor, '.2f', '×')} | {_cell(row.all_reduces, 'd')} "
            f"| {others if row.all_reduces is not None else 'n/a'} | {_cell(row.max_weight_diff, '.2e')} "
            f"| {row.note} |"
        )
    return "\n".join(lines) + "\n"


# -- launching -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument("--tensors", type=int, default=0,
                        help="step only the model's first N tensors (default 0: all of them)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks to spawn (ignored under torchrun)")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per row (median reported)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per row, compiles included (>= 2)"
    )
    parser.add_argument("--rows", help=f"comma-separated subset of: {', '.join(ROWS)} (default: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per rank (default 1: the ranks share the cores)")
    parser.add_argument("--pg-timeout", type=float, default=60.0, help="process-group timeout in seconds")
    parser.add_argument(
        "--warm-compile", action="store_true", help="keep Inductor's caches (compile times shrink)"
    )
    parser.add_argument("--note", action="append", default=[], help="a line added to the header (repeatable)")
    parser.add_argument(
        "--out", type=Path, help="markdown file (default: benchmarks/results/distributed_<...>.md)"
    )
    args = parser.parse_args(argv)
    wanted = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [key for key in wanted if key not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    args.rows = [key for key in ROWS if key in wanted]
    if args.tensors < 0 or args.iters < 1 or args.warmup < 0 or args.nproc < 1:
        parser.error("need --tensors >= 0, --iters >= 1, --warmup >= 0 and --nproc >= 1")
    return args


def _shapes(args: argparse.Namespace) -> tuple[list[ParamShape], str]:
    shapes = MODELS[args.model]()
    if args.tensors and args.tensors < len(shapes):
        return shapes[: args.tensors], f" (the first {args.tensors} of the model's {len(shapes)} tensors)"
    return shapes, ""


def default_out(args: argparse.Namespace, world_size: int) -> Path:
    sliced = f"_first{args.tensors}" if args.tensors else ""
    return RESULTS / f"distributed_{args.model}{sliced}_{world_size}xgloo.md"


def worker(rank: int, world_size: int, init_method: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=args.pg_timeout),
    )
    try:
        progress = (
            (lambda message: print(message, file=sys.stderr, flush=True)) if rank == 0 else (lambda m: None)
        )
        shapes, shapes_note = _shapes(args)
        rows = run_rows(
            shapes, [ROWS[key] for key in args.rows], args.warmup, args.iters, progress,
            cold_compile=not args.warm_compile,
        )
        if rank == 0:
            named = [(name, torch.empty(0)) for name, _ in shapes]
            report = DistReport(
                model=args.model,
                shapes_note=shapes_note,
                world_size=world_size,
                backend="gloo",
                num_tensors=len(shapes),
                num_lars_tensors=sum(lars_mask(named)),
                num_params=sum(torch.Size(shape).numel() for _, shape in shapes),
                warmup=args.warmup,
                iters=args.iters,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=_machine(),
                device_name=_device_name(torch.device("cpu")),
                rows=rows,
            )
            table = format_markdown(report, args.note)
            out = args.out or default_out(args, world_size)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table)
            print(table, flush=True)
            print(f"written to {out}", file=sys.stderr, flush=True)
    finally:
        dist.destroy_process_group()
    _exit_without_finalization()


def _exit_without_finalization() -> None:
    """End a rank without the interpreter's finalization: C++ threads of gloo and of the profiler that
    outlive ``destroy_process_group`` can abort the process there ("terminate called without an active
    exception", seen once in CI after the table was written; pytorch#179291 describes the same race)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args)
        return 0
    import torch.multiprocessing as mp

    init_method = f"tcp://127.0.0.1:{_free_loopback_port()}"
    mp.start_processes(worker, args=(args.nproc, init_method, args), nprocs=args.nproc, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
