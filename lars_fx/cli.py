"""The ``lars-fx`` command: inspect the compiled LARS step, export ONNX Runtime training artifacts or an
ExecuTorch training program, benchmark.

``inspect`` and ``export`` take ``MODULE:FACTORY``: a function that takes no arguments and returns
``(model, optimizer)`` or ``(model, optimizer, example_inputs)``, where ``optimizer`` is a ``lars_fx.LARS``
(or, for ``inspect``, a ``lars_fx.LAMB``) over the model's parameters and ``example_inputs`` is a tensor or a
tuple of tensors the model is called with. ``MODULE`` is a dotted module name (found from the current folder
too) or a path to a ``.py`` file.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import logging
import os
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import __version__
from .lamb import LAMB
from .optimizer import LARS

__all__ = ["main", "Built", "load_factory", "build"]

PROG = "lars-fx"

FACTORY_HELP = """\
MODULE:FACTORY names a function taking no arguments that returns
  (model, optimizer)  or  (model, optimizer, example_inputs)
with optimizer a lars_fx.LARS (inspect: or a lars_fx.LAMB) over the model's parameters and
example_inputs a tensor or a tuple of
tensors for model(*example_inputs). MODULE is a dotted module name (the current folder is searched
too) or a path to a .py file.

  # my_factories.py
  import torch, lars_fx
  def tiny():
      model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
      sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
      return model, lars_fx.LARS(sgd), torch.randn(8, 16)
"""


class UsageError(Exception):
    """A mistake in how the command was called: reported as one line, exit code 2."""


class MissingFeature(Exception):
    """A part of lars-fx this command needs is not in this install: one line, exit code 1."""


class Built(NamedTuple):
    model: nn.Module
    optimizer: LARS | LAMB
    example_inputs: tuple[Tensor, ...] | None


# -- MODULE:FACTORY ----------------------------------------------------------------------------


def _import(module_ref: str) -> ModuleType:
    if module_ref.endswith(".py") or "/" in module_ref:
        path = Path(module_ref)
        if not path.is_file():
            raise UsageError(f"{module_ref}: no such file")
        # A name of its own, so a file called e.g. json.py does not replace the real module.
        spec = importlib.util.spec_from_file_location(f"lars_fx_factory_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise UsageError(f"{module_ref}: cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look modules up here
        sys.path.insert(0, str(path.resolve().parent))  # as `python file.py` would: its neighbours import
        loader = spec.loader
        _run_user_code(f"importing {module_ref}", lambda: loader.exec_module(module))
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return _run_user_code(f"importing {module_ref}", lambda: importlib.import_module(module_ref))
    except UsageError as error:
        if (
            isinstance(error.__cause__, ModuleNotFoundError)
            and error.__cause__.name == module_ref.split(".")[0]
        ):
            raise UsageError(
                f"no module named {module_ref!r} (run from the folder that holds it, or give a path to a .py "
                "file)"
            ) from None
        raise


def _run_user_code(what: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as error:  # the user's code failed: say where, in one line
        raise UsageError(f"{what} failed: {type(error).__name__}: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def load_factory(ref: str) -> Callable[[], Any]:
    """Resolve ``MODULE:FACTORY`` to the function."""
    module_ref, sep, name = ref.rpartition(":")
    if not sep or not module_ref or not name:
        raise UsageError(
            f"expected MODULE:FACTORY (e.g. my_models:tiny or path/to/file.py:tiny), got {ref!r}"
        )
    module = _import(module_ref)
    factory = getattr(module, name, None)
    if factory is None:
        raise UsageError(f"module {module_ref!r} has no attribute {name!r}")
    if not callable(factory):
        raise UsageError(f"{ref} is a {type(factory).__name__}, not a function")
    return factory


def build(ref: str) -> Built:
    """Call the factory and check what it returned."""
    result = _run_user_code(f"calling {ref}", load_factory(ref))
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise UsageError(
            f"{ref} must return (model, optimizer) or (model, optimizer, example_inputs), got "
            f"{_describe(result)}"
        )
    model, optimizer, *rest = result
    if not isinstance(model, nn.Module):
        raise UsageError(f"{ref} returned {_describe(model)} as the model; expected a torch.nn.Module")
    if not isinstance(optimizer, (LARS, LAMB)):
        raise UsageError(
            f"{ref} returned {_describe(optimizer)} as the optimizer; expected a lars_fx.LARS (or a "
            "lars_fx.LAMB), e.g. "
            "lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9))"
        )
    inputs = None
    if rest:
        inputs = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
        if not inputs or not all(isinstance(t, Tensor) for t in inputs):
            raise UsageError(
                f"{ref} returned {_describe(rest[0])} as example_inputs; expected a tensor or a tuple of "
                "tensors"
            )
    return Built(model, optimizer, inputs)


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


# -- progress ----------------------------------------------------------------------------------


@contextmanager
def status(message: str) -> Iterator[None]:
    """A live "message... 3.2s" line on a terminal's stderr; plain start/done lines otherwise."""
    start = time.perf_counter()
    live = sys.stderr.isatty()
    done = threading.Event()

    def tick() -> None:
        frames = "|/-\\"
        i = 0
        while not done.wait(0.1):
            sys.stderr.write(f"\r{frames[i % 4]} {message}... {time.perf_counter() - start:.1f}s")
            sys.stderr.flush()
            i += 1

    ticker = threading.Thread(target=tick, daemon=True) if live else None
    if ticker:
        ticker.start()
    else:
        print(f"{PROG}: {message}...", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        done.set()
        if ticker:
            ticker.join()
            sys.stderr.write("\r\033[K")
    print(f"{PROG}: {message}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


@contextmanager
def native_stderr_hidden(captured: list[str] | None = None) -> Iterator[None]:
    """Discard what native code (ONNX Runtime's C++ logger) writes to file descriptor 2 meanwhile; with
    ``captured``, append that text to it on the way out.

    Python's ``sys.stderr``, when it writes to descriptor 2, is pointed at a copy of it, so the
    progress line and Python's warnings still show.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    try:
        python_on_fd2 = python_stderr.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):  # e.g. a test's capture buffer
        python_on_fd2 = False
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        if python_on_fd2:
            sys.stderr = os.fdopen(
                os.dup(saved), "w", buffering=1, encoding=python_stderr.encoding, errors="replace"
            )
        try:
            yield
        finally:
            if python_on_fd2:
                sys.stderr.close()
                sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            if captured is not None:
                sink.seek(0)
                captured.append(sink.read().decode("utf-8", errors="replace"))


class _ThreadStderr(io.TextIOBase):
    """``sys.stderr`` that keeps what one thread writes and passes the other threads' writes on."""

    def __init__(self, passthrough: Any, captured: list[str]) -> None:
        self.passthrough = passthrough
        self.captured = captured
        self.thread = threading.get_ident()

    def write(self, text: str) -> int:
        if threading.get_ident() == self.thread:
            self.captured.append(text)
            return len(text)
        return self.passthrough.write(text)

    def flush(self) -> None:
        self.passthrough.flush()


@contextmanager
def library_noise_hidden(captured: list[str]) -> Iterator[None]:
    """Hide what ExecuTorch and the libraries it imports report while this thread exports a program,
    keeping the text in ``captured``: its runtime's log (which its Python bindings write to
    ``sys.stderr``), native output on descriptor 2, Python warnings and log records (e.g. its emitter's
    warning that a mutated buffer starts uninitialized, which ``export_program`` initializes). The progress
    line, written by another thread, still shows."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), native_stderr_hidden(captured):
            warnings.simplefilter("ignore")
            python_stderr = sys.stderr
            sys.stderr = _ThreadStderr(python_stderr, captured)
            try:
                yield
            finally:
                sys.stderr = python_stderr
    finally:
        logging.disable(previous)


def _out_dir(path: Path) -> Path:
    """--out: created if missing, but its parent must exist (a typo should not build a tree)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: exists and is not a folder")
    if not path.exists():
        if not path.parent.is_dir():
            raise UsageError(f"--out {path}: parent folder {path.parent} does not exist")
        path.mkdir()
    return path


def _make_gradients(built: Built) -> None:
    """One forward/backward on the example inputs; without inputs, random gradients (the graph
    of a step depends on the shapes and dtypes only)."""
    if (inputs := built.example_inputs) is not None:
        output = _run_user_code("the forward pass on example_inputs", lambda: built.model(*inputs))
        if not isinstance(output, Tensor):
            raise UsageError(f"the model returned {_describe(output)}; inspect needs a tensor output")
        built.optimizer.zero_grad()
        _run_user_code("the backward pass", lambda: output.float().square().mean().backward())
    else:
        for group in built.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    p.grad = torch.randn_like(p)


# -- the commands --------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    out = _out_dir(args.out) if args.out else None
    from .fused import inspect_step
    from .fused_lamb import inspect_lamb_step

    with status(f"building {args.factory}"):
        built = build(args.factory)
        optimizer = built.optimizer
        if isinstance(optimizer, LARS) and type(optimizer.optimizer) is not torch.optim.SGD:
            raise UsageError(
                "inspect shows the fused step, which is LARS over torch.optim.SGD; "
                f"{args.factory}'s LARS wraps {type(optimizer.optimizer).__name__}"
            )
        _make_gradients(built)
    algorithm = "LAMB" if isinstance(optimizer, LAMB) else "LARS"
    with status(f"capturing one {algorithm} step, running the passes, compiling with Inductor"):
        report = inspect_lamb_step(optimizer) if isinstance(optimizer, LAMB) else inspect_step(optimizer)
    if report.fallback is not None:
        print(
            f"{PROG} inspect: the passes do not match this step, so {algorithm}(fused=True) runs it eagerly: "
            f"{report.fallback}",
            file=sys.stderr,
        )
        return 1
    summary = summarize_inspection(report)
    if out is None:
        print(summary)
        for index, (name, text) in enumerate(report.stages):
            print(f"\n==== {index:02d} {name} ({dict(report.node_counts)[name]} nodes) ====\n{text.rstrip()}")
        return 0
    (out / "summary.txt").write_text(summary + "\n")
    for index, (name, text) in enumerate(report.stages):
        (out / f"{index:02d}.{name}.txt").write_text(text)
    print(summary)
    print(f"\nwrote {out}/summary.txt and one NN.<stage>.txt per stage")
    return 0


def summarize_inspection(report: Any) -> str:
    """The pass pipeline, each stage's node count and its change, and Inductor's kernel count."""
    names = [name for name, _ in report.stages]
    lines = ["pass pipeline: " + " -> ".join(names), "", f"{'stage':<24}{'nodes':>7}{'change':>8}"]
    previous = None
    for name, count in report.node_counts:
        change = "" if previous is None else f"{count - previous:+d}"
        lines.append(f"{name:<24}{count:>7}{change:>8}".rstrip())
        previous = count
    lines += ["", "nodes: call_function nodes of the FX graph (ATen ops)"]
    if report.kernel_count is not None:
        lines.append(f"Inductor kernels generated for the final graph: {report.kernel_count}")
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "executorch":
        return _export_executorch(args)
    if args.name is not None or args.partitioner is not None or args.max_batch is not None:
        raise UsageError("--name, --partitioner and --max-batch apply to --format executorch only")
    out = _out_dir(args.out)
    try:
        from .onnx import generate_artifacts
    except ImportError as error:
        raise MissingFeature(f"export needs the onnx extra: pip install 'lars-fx[onnx]' ({error})") from None
    built = _build_for_export(
        args.factory, "ONNX Runtime's training runtime runs only its own AdamW and SGD optimizer nodes"
    )
    ort_log = nullcontext() if args.verbose else native_stderr_hidden()
    with status(f"exporting ONNX training artifacts to {out}"), ort_log:
        try:
            generate_artifacts(built.model, built.example_inputs, optimizer=built.optimizer, loss=args.loss,
                               artifact_directory=out)
        except (ValueError, TypeError) as error:  # the exporter's refusals name the option to change
            raise UsageError(f"cannot export {args.factory}: {_first_line(error)}") from error
    for path in sorted(out.iterdir()):
        print(f"{path}  ({path.stat().st_size:,} bytes)")
    return 0


class ForExport(NamedTuple):
    """What export needs of a factory's ``Built``: a LARS and example inputs."""

    model: nn.Module
    optimizer: LARS
    example_inputs: tuple[Tensor, ...]


def _build_for_export(factory: str, why_not_lamb: str) -> ForExport:
    with status(f"building {factory}"):
        built = build(factory)
    if built.example_inputs is None:
        raise UsageError(f"{factory} must return (model, optimizer, example_inputs) for export")
    if isinstance(built.optimizer, LAMB):
        raise UsageError(
            f"{factory} returned a lars_fx.LAMB; export writes LARS training artifacts only ({why_not_lamb})"
        )
    return ForExport(built.model, built.optimizer, built.example_inputs)


def _export_executorch(args: argparse.Namespace) -> int:
    name = args.name or "model.pte"
    if Path(name).name != name or name in (".", ".."):
        raise UsageError(f"--name {name!r}: a file name, without folders (the folder is --out)")
    out = _out_dir(args.out)
    native_log: list[str] = []
    quiet = nullcontext() if args.verbose else library_noise_hidden(native_log)
    try:
        with quiet:
            from .executorch import export_program
    except ImportError as error:
        raise MissingFeature(
            f"export --format executorch needs the executorch extra: pip install 'lars-fx[executorch]' "
            f"({_first_line(error)})"
        ) from None
    built = _build_for_export(args.factory, "the ExecuTorch program's step is LARS over torch.optim.SGD")
    target = _example_target(built, args.loss)
    path = out / name
    native_log.clear()  # only the export's own lines can name a missing kernel
    quiet = nullcontext() if args.verbose else library_noise_hidden(native_log)
    try:
        with status(f"exporting an ExecuTorch training program to {path}"), quiet:
            program = export_program(built.model, built.example_inputs, target, optimizer=built.optimizer,
                                     loss=args.loss, path=path, partitioner=args.partitioner,
                                     max_batch=args.max_batch)
    except (ValueError, TypeError) as error:  # the exporter's refusals name the option to change
        missing = _missing_kernels("".join(native_log))
        detail = f" (missing: {', '.join(missing)})" if missing else ""
        raise UsageError(f"cannot export {args.factory}: {_first_line(error)}{detail}") from error
    print(f"{program.path}  ({program.path.stat().st_size:,} bytes)")
    return 0


def _example_target(built: ForExport, loss: str) -> Tensor:
    """A target shaped as the loss takes it: the output's shape for mse, one class per row for
    cross_entropy (the values do not matter to the export)."""
    inputs = built.example_inputs
    with torch.no_grad():
        output = _run_user_code("the forward pass on example_inputs", lambda: built.model(*inputs))
    if not isinstance(output, Tensor):
        raise UsageError(f"the model returned {_describe(output)}; export needs a tensor output")
    if loss == "cross_entropy":
        if output.dim() == 0:
            raise UsageError("--loss cross_entropy needs an output with a batch dimension; the model's is "
                             "0-d")
        return torch.zeros(output.shape[0], dtype=torch.long)
    return torch.zeros_like(output)


def _missing_kernels(log: str) -> list[str]:
    """The operators ExecuTorch's runtime logged as missing (``Missing operator: [23] aten::...``)."""
    marker = "Missing operator:"
    names = [line.split(marker, 1)[1].split()[-1] for line in log.splitlines() if marker in line]
    return list(dict.fromkeys(names))


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import available_peers, format_markdown, run_benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
    if args.peers:
        usable = available_peers(resolved)
        unknown = [p for p in args.peers if p not in usable]
        if unknown:
            raise UsageError(
                f"--peers: {', '.join(unknown)} not available on {resolved.type}; choose from "
                f"{', '.join(usable)}"
            )
    if args.out is not None and not args.out.parent.is_dir():
        raise UsageError(f"--out {args.out}: folder {args.out.parent} does not exist")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"{PROG} bench [{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    report = run_benchmark(
        args.model, device, peers=args.peers, warmup=args.warmup, iters=args.iters, progress=progress
    )
    table = format_markdown(report)
    if args.out is not None:
        args.out.write_text(table)
        progress(f"wrote {args.out}")
    print(table, end="")
    return 0


# -- the parser ----------------------------------------------------------------------------------


def _para(text: str) -> str:
    return textwrap.fill(text, width=100)


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid integer value"
    return parse


def make_parser() -> argparse.ArgumentParser:
    from .bench import PEERS

    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_para(
            "LARS (layer-wise adaptive rate scaling) as PyTorch graph passes: look inside the "
            "compiled optimizer step, export it for ONNX Runtime training, and time it."
        ),
        epilog="examples:\n"
        "  lars-fx inspect my_factories:tiny              # the pass pipeline, graphs and kernel counts\n"
        "  lars-fx inspect my_factories:tiny --out ir/    # the same, one file per stage\n"
        "  lars-fx export path/to/models.py:tiny --out artifacts/\n"
        "  lars-fx bench --model vitl --device cuda\n\n"
        "Run 'lars-fx COMMAND --help' for a command's options.",
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {__version__} (torch {torch.__version__})"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="capture one LARS (or LAMB) step, show the graph before and after each pass",
        description=_para(
            "Build the model and optimizer FACTORY returns (a lars_fx.LARS over SGD, or a lars_fx.LAMB), "
            "capture one optimizer step as an FX graph, run lars-fx's passes and Inductor over it, and print "
            "the pass pipeline, the graph "
            "before and after each pass, and the node and kernel counts."
        )
        + "\n\n"
        + FACTORY_HELP,
        epilog="example:\n  lars-fx inspect my_factories:tiny --out ir/",
    )
    inspect.add_argument(
        "factory", metavar="MODULE:FACTORY", help="function returning (model, optimizer[, example_inputs])"
    )
    inspect.add_argument(
        "--out", type=Path, metavar="DIR", help="write each stage's graph to DIR instead of printing it"
    )
    inspect.set_defaults(run=cmd_inspect)

    export = commands.add_parser(
        "export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write ONNX Runtime training artifacts or an ExecuTorch training program (LARS)",
        description=_para(
            "Build the model, optimizer and example inputs FACTORY returns and write, with --format "
            "onnx (the default), ONNX Runtime training artifacts (training, eval and optimizer models, "
            "checkpoint) with lars_fx.onnx; with --format executorch, one ExecuTorch program (.pte) whose "
            "train_step, predict, get_state and set_state methods share the trained state, with "
            "lars_fx.executorch."
        )
        + "\n\n"
        + FACTORY_HELP,
        epilog="examples:\n  lars-fx export my_factories:tiny --out artifacts/\n"
        "  lars-fx export my_factories:tiny --format executorch --loss cross_entropy --out program/\n"
        "  lars-fx export my_factories:tiny --format executorch --partitioner xnnpack --name tiny.pte "
        "--out program/",
    )
    export.add_argument(
        "factory", metavar="MODULE:FACTORY", help="function returning (model, optimizer, example_inputs)"
    )
    export.add_argument(
        "--out", type=Path, metavar="DIR", required=True, help="folder for the artifacts or program (created)"
    )
    export.add_argument(
        "--format",
        choices=("onnx", "executorch"),
        default="onnx",
        help="onnx: ONNX Runtime training artifacts; executorch: an ExecuTorch .pte (default: onnx)",
    )
    export.add_argument(
        "--loss",
        choices=("mse", "cross_entropy"),
        default="mse",
        help="the loss the training model ends in (default: mse)",
    )
    export.add_argument(
        "--name", metavar="FILE", help="executorch: the program's file name in DIR (default: model.pte)"
    )
    export.add_argument(
        "--partitioner",
        choices=("xnnpack",),
        help="executorch: delegate what XNNPACK runs to it (default: ExecuTorch's portable kernels only)",
    )
    export.add_argument(
        "--max-batch",
        type=_at_least(2),
        metavar="N",
        help="executorch: the batch (dimension 0 of the inputs and target) may be 1..N at each call "
        "(default: the example inputs' shapes only)",
    )
    export.add_argument(
        "--verbose",
        action="store_true",
        help="also show ONNX Runtime's (or ExecuTorch's) own log lines and warnings (hidden by default)",
    )
    export.set_defaults(run=cmd_export)

    bench = commands.add_parser(
        "bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="time one LARS step against its peers (timm, compiled SGD, ...)",
        description=_para(
            "Time one optimizer step of LARS and its peers on the parameter shapes of a real "
            "model (random weights; no model is built) and print a markdown table: median step time, "
            "compile time, ratios to compiled SGD and to fused LARS, achieved bandwidth."
        ),
        epilog="examples:\n  lars-fx bench                          # resnet50 shapes, CUDA if present\n"
        "  lars-fx bench --model vitl --device cuda --out bench.md\n"
        "  lars-fx bench --peers lars_foreach sgd_foreach --iters 5",
    )
    bench.add_argument("--model", choices=("resnet50", "vitl"), default="resnet50",
                       help="whose parameter shapes (default: resnet50)")
    bench.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    bench.add_argument(
        "--peers",
        nargs="+",
        metavar="PEER",
        help=f"only these peers (default: all that run on the device); peers: {', '.join(PEERS)}",
    )
    bench.add_argument("--warmup", type=_at_least(0), default=3,
                       help="untimed steps first; compiles happen here (default: 3)")
    bench.add_argument(
        "--iters", type=_at_least(1), default=20, help="timed steps; the median is reported (default: 20)"
    )
    bench.add_argument(
        "--threads",
        type=_at_least(1),
        help="torch CPU threads (default: torch's); on a CPU shared with other jobs, 1 gives steadier eager "
        "times",
    )
    bench.add_argument("--out", type=Path, metavar="FILE", help="also write the table to FILE")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lars-fx`` command; returns the exit code (2 for usage mistakes)."""
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, argparse's usage errors (exit 2)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.run(args)
    except UsageError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except MissingFeature as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
