"""One LARS training step (forward, backward, LARS momentum-SGD step) on four runtimes, side by side.

Peers, each training the same model from the same weights on the same batch, with lr 0.1:

* ``executorch_portable``: ``lars_fx.executorch.export_program(..., partitioner=None)``, then
  ``train_step.execute``;
* ``executorch_xnnpack``: the same with ``partitioner="xnnpack"``;
* ``eager_lars``: PyTorch eager with ``lars_fx.LARS`` (forward, loss, backward, ``step()``, ``zero_grad()``),
  the reference every ratio divides by;
* ``ort_lars``: ``lars_fx.onnx.generate_artifacts`` driven as ``benchmarks/bench_ort_step.py`` drives them
  (``Module(x, t)``, ``Optimizer.step()``, ``Module.lazy_reset_grad()``), but with ORT's idle threads not
  spinning (they took the cores the interleaved peers' threads were waiting for).

LARS over SGD (momentum 0.9, weight decay 1e-4), the filter skipping biases and norms, cross-entropy loss.
Before timing, every peer takes 3 steps and its losses must equal eager's to 1e-4 relative; after timing,
every peer has taken the same steps and its total weight update (final weights minus initial) must equal
eager's to ``UPDATE_RTOL``. A peer that fails to export, or whose ``train_step`` kills a probe process (run
first, so that a crashing runtime costs a row, not the run), is reported with the error instead of times.
Timing: ``--warmup`` untimed steps each, then ``--iters`` rounds of one step per peer (the order rotating),
each step timed by the host clock; the median and the best per peer (the machine may be shared: the best is
the least disturbed figure).

    python benchmarks/bench_executorch_step.py [--models mlp_16_32_4,cnn_8x8] [--iters 200] [--threads 2]
    python benchmarks/bench_executorch_step.py --quick --out /tmp/x.md     # the machinery in seconds
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

import lars_fx

if TYPE_CHECKING:
    from lars_fx.executorch import TrainingProgram

RESULTS = Path(__file__).resolve().parent / "results" / "executorch_step_cpu.md"
PEERS = ("executorch_portable", "executorch_xnnpack", "eager_lars", "ort_lars")
REFERENCE = "eager_lars"
LR = 0.1
AGREEMENT_STEPS = 3
LOSS_RTOL = 1e-4
# Loose on purpose: runtimes whose kernels round differently part after some steps, when a ReLU input near 0
# flips sign at a different step (measured, ORT vs eager on cnn_8x8: update diff 3e-7 at step 80, 4e-4 at
# step 85, then 1e-3 to 6e-3 up to step 1000, the losses equal to 1e-5). A peer whose timed steps stopped
# training, or stepped with another lr or without the trust ratio, is off by order 1.
UPDATE_RTOL = 2e-2
PROBE_BOUND_S = 120


# -- models ------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(widths[0], widths[1])
        self.fc2 = nn.Linear(widths[1], widths[2])

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SmallCNN(nn.Module):
    """8x8 single-channel images (sklearn's digits' size): conv, LayerNorm, ReLU, linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        # LayerNorm rather than GroupNorm: ORT's exporter path (opset 14) differentiates it
        self.norm = nn.LayerNorm([8, 8, 8])
        self.fc = nn.Linear(8 * 8 * 8, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int

    def batch(self) -> tuple[nn.Module, tuple[Tensor, ...], Tensor]:
        torch.manual_seed(0)
        model = self.build()
        x = torch.randn(self.input_shape)
        target = torch.randint(0, self.classes, (self.input_shape[0],))
        return model, (x,), target


CASES = {
    case.name: case
    for case in (
        Case("mlp_16_32_4", "MLP 16-32-4, batch 32", lambda: MLP((16, 32, 4)), (32, 16), 4),
        Case("mlp_784_256_10", "MLP 784-256-10, batch 64", lambda: MLP((784, 256, 10)), (64, 784), 10),
        Case("cnn_8x8", "CNN conv(1->8, 3x3)-LayerNorm-ReLU-linear(512->10) on 1x8x8, batch 64", SmallCNN,
             (64, 1, 8, 8), 10),
    )
}
QUICK_CASE = "mlp_16_32_4"


def make_lars(model: nn.Module) -> lars_fx.LARS:
    base = torch.optim.SGD(model.named_parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    return lars_fx.LARS(base, lars_filter=lambda p: "bias" not in p.name and "norm" not in p.name)


# -- peers -------------------------------------------------------------------------------------------


@dataclass
class Peer:
    """One runtime's training step. ``step()`` returns the runtime's own loss object, ``loss_of`` reads it;
    ``weights()`` the trained weights by parameter name."""

    name: str
    step: Callable[[], object] = lambda: None
    loss_of: Callable[[object], float] = float
    weights: Callable[[], dict[str, Tensor]] = dict
    export_s: float | None = None
    size_bytes: int | None = None
    error: str = ""
    losses: list[float] = field(default_factory=list)
    times_s: list[float] = field(default_factory=list)


def eager_peer(model: nn.Module, inputs: tuple[Tensor, ...], target: Tensor) -> Peer:
    model = copy.deepcopy(model)
    optimizer = make_lars(model)

    def step() -> Tensor:
        loss = nn.functional.cross_entropy(model(*inputs), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return Peer(
        REFERENCE, step, lambda loss: float(loss.detach()),  # type: ignore[attr-defined]
        lambda: {name: p.detach().clone() for name, p in model.named_parameters()},
    )


def export_executorch(
    name: str, model: nn.Module, inputs: tuple[Tensor, ...], target: Tensor, path: Path
) -> tuple[Peer, TrainingProgram | None]:
    """The program written at ``path``, and the ``TrainingProgram`` (None if the export failed)."""
    from lars_fx.executorch import export_program

    partitioner = "xnnpack" if name == "executorch_xnnpack" else None
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = export_program(model, inputs, target, optimizer=make_lars(model), loss="cross_entropy",
                                     path=path, partitioner=partitioner)
    except Exception as error:  # one peer's failure is its row's note, not the run's end
        return Peer(name, error=f"export failed: {type(error).__name__}: {error}"[:300]), None
    return Peer(name, export_s=time.perf_counter() - start, size_bytes=path.stat().st_size), program


def open_executorch(peer: Peer, program: TrainingProgram, inputs: tuple[Tensor, ...], target: Tensor) -> None:
    from executorch.runtime import Runtime

    loaded = Runtime.get().load_program(program.path)
    train = loaded.load_method("train_step")
    get_state = loaded.load_method("get_state")
    args = [*inputs, target, torch.tensor(LR, dtype=torch.float32)]
    names = program.parameter_names
    peer.step = lambda: train.execute(args)
    peer.loss_of = lambda outputs: float(outputs[0])  # type: ignore[index]
    # get_state: the weights in parameter_names order, then the momentum buffers
    peer.weights = lambda: {name: t.clone() for name, t in zip(names, get_state.execute([]), strict=False)}


def ort_peer(
    model: nn.Module, inputs: tuple[Tensor, ...], target: Tensor, directory: Path, threads: int
) -> Peer:
    """As ``benchmarks/bench_ort_step.py``'s ``open_step`` (which fixes lr 0.01 and returns no loss)."""
    import onnxruntime
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    from lars_fx.onnx import generate_artifacts

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            generate_artifacts(model, inputs, optimizer=make_lars(model), loss="cross_entropy",
                               artifact_directory=directory)
    except Exception as error:
        return Peer("ort_lars", error=f"export failed: {type(error).__name__}: {error}"[:300])
    export_s = time.perf_counter() - start
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # ORT's idle intra-op threads spin by default, and the other peers' threads then wait for a core: eager
    # LARS's median step went from ~1.5 ms to ~90 ms on cnn_8x8 with 2 threads on 2 cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    state = CheckpointState.load_checkpoint(directory / "checkpoint")
    module = Module(str(directory / "training_model.onnx"), state, session_options=options)
    optimizer = Optimizer(str(directory / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(LR)  # ORT starts every Optimizer at 0.001
    arrays = [t.numpy() for t in (*inputs, target)]
    names = [name for name, _ in model.named_parameters()]

    def step() -> object:
        loss = module(*arrays)
        optimizer.step()
        module.lazy_reset_grad()
        return loss

    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    return Peer("ort_lars", step, float,
                lambda: {name: torch.from_numpy(state.parameters[name].data.copy()) for name in names},
                export_s=export_s, size_bytes=size)


def probe(paths: list[Path], args_file: Path) -> dict[Path, str]:
    """Execute ``train_step`` once per program in child processes; the programs whose execution killed the
    child, with why (an XNNPACK-delegated conv segfaulted in ``train_step`` at commit 6024b134). A crash ends
    the child: the next one resumes after the crashed program."""
    crashed: dict[Path, str] = {}
    remaining = list(paths)
    while remaining:
        command = [sys.executable, __file__, "--probe", str(args_file), *map(str, remaining)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_BOUND_S)
            returncode, stdout = result.returncode, result.stdout
        except subprocess.TimeoutExpired as timeout:
            returncode, stdout = None, timeout.stdout or ""
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        done = {line.removeprefix("ok ") for line in stdout.splitlines() if line.startswith("ok ")}
        remaining = [p for p in remaining if str(p) not in done]
        if returncode == 0 or not remaining:
            break
        why = f"timed out after {PROBE_BOUND_S} s" if returncode is None else _exit_reason(returncode)
        crashed[remaining[0]] = f"train_step.execute {why} in a probe process"
        remaining = remaining[1:]
    return crashed


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        import signal

        return f"killed the process ({signal.Signals(-returncode).name})"
    return f"failed (exit status {returncode})"


def run_probe(args_file: str, paths: list[str]) -> None:
    from executorch.runtime import Runtime

    arguments = torch.load(args_file)
    for path in paths:
        Runtime.get().load_program(path).load_method("train_step").execute(arguments[path])
        print(f"ok {path}", flush=True)


# -- measuring ---------------------------------------------------------------------------------------


def check_losses(peers: list[Peer]) -> None:
    """Every working peer's first ``AGREEMENT_STEPS`` losses equal eager's to ``LOSS_RTOL``."""
    reference = next(p for p in peers if p.name == REFERENCE)
    for peer in peers:
        if peer.error:
            continue
        peer.losses = [peer.loss_of(peer.step()) for _ in range(AGREEMENT_STEPS)]
    for peer in peers:
        if peer.error:
            continue
        for index, (got, want) in enumerate(zip(peer.losses, reference.losses, strict=True)):
            if not math.isclose(got, want, rel_tol=LOSS_RTOL):
                raise AssertionError(
                    f"{peer.name}'s loss at step {index} is {got!r}, eager LARS's {want!r}: the peers do not "
                    f"compute the same step (losses {peer.losses} vs {reference.losses})"
                )


def time_peers(peers: list[Peer], warmup: int, iters: int) -> None:
    running = [p for p in peers if not p.error]
    for peer in running:
        for _ in range(warmup):
            peer.step()
    for round_index in range(iters):
        shift = round_index % len(running)
        for peer in running[shift:] + running[:shift]:  # no peer always runs right after the same one
            start = time.perf_counter()
            peer.step()
            peer.times_s.append(time.perf_counter() - start)


def update_error(peer: Peer, reference: Peer, initial: dict[str, Tensor]) -> float:
    """max over parameters of |Δw_peer − Δw_eager| / |Δw_eager|, Δw the change since the start."""
    got, want = peer.weights(), reference.weights()
    errors = []
    for name, start in initial.items():
        expected = want[name] - start
        errors.append(float((got[name] - start - expected).norm() / expected.norm().clamp_min(1e-30)))
    return max(errors)


@dataclass
class Row:
    model: str
    peer: str
    median_s: float | None = None
    best_s: float | None = None
    ratio: float | None = None  # of the medians
    size_bytes: int | None = None
    export_s: float | None = None
    loss_error: float | None = None
    update_error: float | None = None
    error: str = ""


def measure_case(case: Case, warmup: int, iters: int, threads: int, scratch: Path) -> list[Row]:
    model, inputs, target = case.batch()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    directory = scratch / case.name
    directory.mkdir()
    peers: dict[str, Peer] = {}
    programs: dict[str, TrainingProgram | None] = {}
    for name in ("executorch_portable", "executorch_xnnpack"):
        path = directory / f"{name}.pte"
        peers[name], programs[name] = export_executorch(name, model, inputs, target, path)
    peers[REFERENCE] = eager_peer(model, inputs, target)
    peers["ort_lars"] = ort_peer(model, inputs, target, directory / "ort", threads)
    for name, parameter in model.named_parameters():  # the exports must have left the model as it was
        assert torch.equal(parameter, initial[name]), f"exporting changed {name}"

    exported = {program.path: name for name, program in programs.items() if program is not None}
    args_file = directory / "probe_args.pt"
    lr = torch.tensor(LR, dtype=torch.float32)
    torch.save({str(path): [*inputs, target, lr] for path in exported}, args_file)
    for path, why in probe(list(exported), args_file).items():
        peers[exported[path]].error = why
    for name, program in programs.items():
        if program is not None and not peers[name].error:
            open_executorch(peers[name], program, inputs, target)

    ordered = [peers[name] for name in PEERS]
    check_losses(ordered)
    time_peers(ordered, warmup, iters)
    reference = peers[REFERENCE]
    reference_median = statistics.median(reference.times_s)
    rows = []
    for peer in ordered:
        if peer.error:
            rows.append(Row(case.name, peer.name, size_bytes=peer.size_bytes, export_s=peer.export_s,
                            error=peer.error))
            continue
        error = 0.0 if peer is reference else update_error(peer, reference, initial)
        if error > UPDATE_RTOL:
            raise AssertionError(
                f"{case.name}: {peer.name}'s weight update after {AGREEMENT_STEPS + warmup + iters} steps "
                f"differs from eager LARS's by {error:.2e} (relative), more than {UPDATE_RTOL}"
            )
        loss_error = max(abs(a - b) / abs(b) for a, b in zip(peer.losses, reference.losses, strict=True))
        median = statistics.median(peer.times_s)
        rows.append(Row(case.name, peer.name, median_s=median, best_s=min(peer.times_s),
                        ratio=median / reference_median, size_bytes=peer.size_bytes, export_s=peer.export_s,
                        loss_error=loss_error, update_error=error))
    return rows


# -- report ------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    import onnxruntime

    return {
        "cpu": platform_cpu(),
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "executorch": importlib.metadata.version("executorch"),
        "onnxruntime-training": onnxruntime.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def platform_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def size(size_bytes: int | None) -> str:
    return "—" if size_bytes is None else f"{size_bytes / 1024:.1f} KiB"


def format_markdown(rows: list[Row], info: dict[str, str], settings: dict[str, object], command: str) -> str:
    machine_line = (
        f"- machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, executorch "
        f"{info['executorch']}, onnxruntime-training {info['onnxruntime-training']}; {info['date']}"
    )
    timing = (
        f"- threads: {settings['threads']} (torch.set_num_threads, ORT intra-op threads without spinning, "
        f"ExecuTorch's threadpool); {settings['warmup']} warm-up steps per peer, then {settings['iters']} "
        "rounds of one step per peer (order rotating), host clock; median and best per peer, the ratio of "
        "the medians"
    )
    step = (
        f"- every step: forward, cross-entropy, backward, LARS over SGD (lr {LR}, momentum 0.9, weight "
        "decay 1e-4; biases and norms skip the trust ratio)"
    )
    checked = (
        f"- checked: the first {AGREEMENT_STEPS} losses equal eager LARS's (loss diff: the largest relative "
        f"difference, bound {LOSS_RTOL:g}), and after all steps so does the total weight update (update "
        f"diff: max over parameters of |Δw - Δw_eager| / |Δw_eager|, bound {UPDATE_RTOL:g})"
    )
    columns = ("model", "peer", "median step", "best step", "ratio to eager LARS", "size", "export",
               "loss diff", "update diff", "note")
    sizes = "- size: the .pte (for ORT, its four artifacts together); export: the export's wall time"
    lines = [
        "# One LARS training step: ExecuTorch (portable, XNNPACK), eager PyTorch, ONNX Runtime",
        "",
        machine_line,
        f"- command: `{command}`",
        timing,
        f"- load average (1 min) before / after: {settings['load_before']} / {settings['load_after']}",
        step,
        checked,
        sizes,
        "",
        "| " + " | ".join(columns) + " |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        ratio = "—" if row.ratio is None else f"{row.ratio:.2f}x"
        export = "—" if row.export_s is None else f"{row.export_s:.1f} s"
        loss = "—" if row.loss_error is None else f"{row.loss_error:.1e}"
        update = "—" if row.update_error is None else f"{row.update_error:.1e}"
        times = (duration(row.median_s), duration(row.best_s), ratio)
        cells = (row.model, row.peer, *times, size(row.size_bytes), export, loss, update, row.error)
        lines.append("| " + " | ".join(cells) + " |")
    models = {row.model for row in rows}
    lines += ["", *(f"- {name}: {CASES[name].description}" for name in CASES if name in models)]
    lines += ["", "```json", json.dumps({"machine": info, "settings": settings,
                                         "rows": [row.__dict__ for row in rows]}), "```"]
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(CASES)} (default: all)")
    parser.add_argument("--iters", type=int, help="timed rounds (default 200; 10 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps per peer (default 20; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="threads for every runtime (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"markdown file (default {RESULTS})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CASE} only, few steps (for tests)")
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)  # the probe process: args file, paths
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = QUICK_CASE if args.quick else ",".join(CASES)
    args.models = args.models.split(",")
    if unknown := [m for m in args.models if m not in CASES]:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(CASES)}")
    if args.iters is None:
        args.iters = 10 if args.quick else 200
    if args.warmup is None:
        args.warmup = 2 if args.quick else 20
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--iters and --threads must be >= 1, --warmup >= 0")
    return args


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.probe:
        run_probe(args.probe[0], args.probe[1:])
        return ""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    set_threads(args.threads)
    load_before = f"{os.getloadavg()[0]:.2f}"
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows += measure_case(CASES[name], args.warmup, args.iters, args.threads, Path(scratch))
    settings = {"threads": args.threads, "warmup": args.warmup, "iters": args.iters, "models": args.models,
                "load_before": load_before, "load_after": f"{os.getloadavg()[0]:.2f}"}
    command = shlex.join(["python", "benchmarks/bench_executorch_step.py", *(sys.argv[1:] if argv is None
                                                                              else argv)])
    text = format_markdown(rows, machine(), settings, command)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
