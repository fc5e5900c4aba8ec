"""Run a function on N ranks of a gloo process group on 127.0.0.1, with a wall-clock bound.

``run_on_ranks(fn, world_size, *args)`` starts one Python process per rank, runs ``fn(*args)`` in each
after ``init_process_group("gloo", timeout <= 60 s)`` and returns the ranks' return values, rank by rank.
A rank that raises, exits without a result, or a run that outlives ``bound_s`` makes it raise
``DistributedRunError`` quickly (not after the process group's timeout) with every rank's traceback:
the failing rank's exception, and where the other ranks were stuck (their Python stacks, dumped by
``faulthandler`` on SIGUSR1 before they are killed). ``run_bounded`` runs a launcher command under the same
kind of bound.

Why subprocesses started here rather than ``torch.multiprocessing.spawn`` or ``torchrun --standalone``:
each rank leads its own process session, so a kill also reaches what the rank started (Inductor's compile
workers) and nothing outlives the test; each rank's stdout/stderr goes to its own file that a failure
quotes; and the test process itself enforces the wall-clock bound, dumping the stacks of stuck ranks
before killing them (``spawn``'s ``join(timeout)`` only stops waiting, and torchrun has no bound for a rank
that hangs outside a collective). The rendezvous store is a ``TCPStore`` held by the test process on a port
the OS picks, so there is no free-port race with other runs on the machine.

``fn`` must be a module-level function of a module the ranks can import (``tests/`` is on the ranks'
``sys.path``, as it is on pytest's): tests keep theirs in ``dist_workers.py``. Arguments and return
values travel through ``torch.save``/``torch.load``: return plain tensors, not DTensors.

Helpers for the ranks: ``mesh`` (a 1-D or 2-D ``DeviceMesh`` on CPU) and ``count_collectives`` (the
collectives a callable issues, counted with ``torch.profiler``).
"""

from __future__ import annotations

import collections
import faulthandler
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch

PROCESS_GROUP_TIMEOUT = timedelta(seconds=60)
DEFAULT_BOUND_S = 300.0
# After one rank fails, the others get this long to finish or fail on their own before they are killed
# (a rank waiting in a collective on the failed one would otherwise wait for the process group's timeout).
GRACE_AFTER_FAILURE_S = 3.0
_STACK_DUMP_WAIT_S = 1.0
_TAIL_CHARS = 4000


class DistributedRunError(AssertionError):
    """A distributed run failed: a rank raised or died, or the run outlived its bound."""


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    bound_s: float = DEFAULT_BOUND_S,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """``[fn(*args, **kwargs) on rank r for r in range(world_size)]``, run in ``world_size`` processes.

    Raises ``DistributedRunError`` with every rank's traceback and output when a rank raises or exits
    without a result, or when the run takes longer than ``bound_s`` seconds; all ranks are killed first.
    ``env`` adds environment variables for the ranks.
    """
    if "<locals>" in fn.__qualname__ or fn.__module__ == "__main__":
        raise ValueError(f"{fn.__qualname__} must be a module-level function of an importable module")
    import torch.distributed as dist

    with TemporaryDirectory(prefix="dist_harness_") as directory:
        run_dir = Path(directory)
        (run_dir / "sys_path.json").write_text(json.dumps(sys.path))
        payload = {"fn": fn, "args": args, "kwargs": kwargs}
        try:
            torch.save(payload, run_dir / "payload.pt")
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            raise ValueError(f"the function and arguments for the ranks must pickle: {error}") from error
        store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False,
                              timeout=PROCESS_GROUP_TIMEOUT)
        ranks: list[_Rank] = []
        try:
            for rank in range(world_size):
                ranks.append(_start_rank(run_dir, rank, world_size, store.port, env or {}))
            _wait(ranks, bound_s)
        finally:
            for rank in ranks:
                rank.kill()
            del store
        return [rank.result() for rank in ranks]


@dataclass
class _Rank:
    rank: int
    process: subprocess.Popen
    run_dir: Path
    output: Any = field(repr=False)
    killed: bool = False

    @property
    def result_path(self) -> Path:
        return self.run_dir / f"result_{self.rank}.pt"

    @property
    def error_path(self) -> Path:
        return self.run_dir / f"error_{self.rank}.txt"

    @property
    def stacks_path(self) -> Path:
        return self.run_dir / f"stacks_{self.rank}.txt"

    @property
    def output_path(self) -> Path:
        return self.run_dir / f"output_{self.rank}.txt"

    def exit_code(self) -> int | None:
        """None while running. Looks without reaping the process: until ``kill`` reaps it, its pid (and the
        id of its process group) cannot be reused, so ``kill`` never signals a stranger."""
        if self.process.returncode is not None:
            return self.process.returncode
        try:
            info = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere already
            return self.process.wait()
        if info is None or info.si_pid == 0:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def running(self) -> bool:
        return self.exit_code() is None

    def failed(self) -> bool:
        """Exited, but not with a result (it raised, or exited early)."""
        code = self.exit_code()
        return code is not None and (code != 0 or not self.result_path.exists())

    def dump_stacks(self) -> None:
        if self.running():
            os.kill(self.process.pid, signal.SIGUSR1)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.killed = self.killed or self.running()
            try:
                # the rank leads its own session: its children too
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        self.output.close()

    def result(self) -> Any:
        return torch.load(self.result_path, weights_only=False)

    def report(self) -> str:
        code = self.exit_code()
        status = "still running: killed by the harness" if self.killed else f"exit code {code}"
        if code == 0 and not self.result_path.exists():
            status += " without a result (exited early)"
        parts = [f"--- rank {self.rank}: {status}"]
        for title, path in (("exception", self.error_path), ("Python stacks when killed", self.stacks_path)):
            text = _read(path)
            if text.strip():
                parts.append(f"[{title}]\n{text.rstrip()}")
        output = _read(self.output_path)
        if output.strip():
            parts.append(f"[output, last {_TAIL_CHARS} characters]\n{output[-_TAIL_CHARS:].rstrip()}")
        return "\n".join(parts)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _start_rank(run_dir: Path, rank: int, world_size: int, port: int, extra_env: dict[str, str]) -> _Rank:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    # The ranks share the machine's cores: one thread each, and no pool of Inductor compile workers per rank.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    env.update(extra_env)
    output = open(run_dir / f"output_{rank}.txt", "wb")
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(run_dir), str(rank)],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return _Rank(rank, process, run_dir, output)


def _wait(ranks: list[_Rank], bound_s: float) -> None:
    started = time.monotonic()
    deadline = started + bound_s
    failed_at = None
    while True:
        if not any(rank.running() for rank in ranks):
            if not any(rank.failed() for rank in ranks):
                return
            _fail(ranks, "a rank failed")
        now = time.monotonic()
        if failed_at is None and any(rank.failed() for rank in ranks):
            failed_at = now
        if failed_at is not None and now - failed_at > GRACE_AFTER_FAILURE_S:
            _fail(ranks, f"a rank failed; the others were still running {GRACE_AFTER_FAILURE_S:.0f} s later")
        if now > deadline:
            _fail(ranks, f"the run took longer than its bound of {bound_s:.0f} s")
        time.sleep(0.05)


def _fail(ranks: list[_Rank], why: str) -> None:
    running = [rank for rank in ranks if rank.running()]
    for rank in running:
        rank.dump_stacks()
    if running:
        time.sleep(_STACK_DUMP_WAIT_S)
    for rank in ranks:
        rank.kill()
    raise DistributedRunError(
        f"distributed run of {len(ranks)} ranks failed: {why}\n" + "\n".join(r.report() for r in ranks)
    )


# -- in the rank ------------------------------------------------------------------------------


def _rank_main(run_dir: Path, rank: int) -> None:
    stacks = open(run_dir / f"stacks_{rank}.txt", "w")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        sys.path[:] = json.loads((run_dir / "sys_path.json").read_text())  # before the payload names modules
        payload = torch.load(run_dir / "payload.pt", weights_only=False)
        import torch.distributed as dist

        world_size = int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                              timeout=PROCESS_GROUP_TIMEOUT)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT
        )
        result = payload["fn"](*payload["args"], **payload["kwargs"])
        partial = run_dir / f"result_{rank}.pt.partial"
        torch.save(result, partial)
        dist.destroy_process_group()
    except BaseException:
        (run_dir / f"error_{rank}.txt").write_text(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    partial.rename(run_dir / f"result_{rank}.pt")  # whole, or not there
    # Skip the interpreter's finalization: C++ threads of gloo and of the profiler that outlive
    # destroy_process_group can abort the process there (pytorch#179291 describes the teardown race).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- helpers for the ranks --------------------------------------------------------------------


def mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Any:
    """A CPU ``DeviceMesh`` of ``shape`` (1-D or 2-D) over the ranks of the default process group."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


# The dispatcher ops of c10d, one per collective whatever issues it: eager torch.distributed calls
# (``c10d::allreduce_``), functional collectives (``_c10d_functional::all_reduce`` calls
# ``c10d::allreduce_``), and the functional collectives Inductor compiles in
# (``_c10d_functional::all_reduce_`` too). The backend records the same collective once more
# (``gloo:all_reduce``); counting both would count it twice, and gloo implements a reduce-scatter as
# ``gloo:all_reduce``, so only the c10d ops are counted, named by kind.
C10D_KINDS = {
    "c10d::allreduce_": "all_reduce",
    "c10d::allreduce_coalesced_": "all_reduce",
    "c10d::_allgather_base_": "all_gather",
    "c10d::allgather_": "all_gather",
    "c10d::allgather_coalesced_": "all_gather",
    "c10d::allgather_into_tensor_coalesced_": "all_gather",
    "c10d::_reduce_scatter_base_": "reduce_scatter",
    "c10d::reduce_scatter_": "reduce_scatter",
    "c10d::reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "c10d::broadcast_": "broadcast",
    "c10d::reduce_": "reduce",
    "c10d::gather_": "gather",
    "c10d::scatter_": "scatter",
    "c10d::alltoall_": "all_to_all",
    "c10d::alltoall_base_": "all_to_all",
    "c10d::barrier": "barrier",
    "c10d::send": "send",
    "c10d::recv_": "recv",
    "c10d::recv_any_source_": "recv",
}


def count_collectives(fn: Callable[[], Any]) -> tuple[Any, collections.Counter]:
    """``fn()`` under ``torch.profiler``: its result and how many collectives of each kind it issued
    (``{"all_reduce": 1}``). Each collective is counted once, by its c10d dispatcher op; with gloo, the
    backend's own events are checked to be as many, so a collective recorded twice or missed fails loudly."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    names = [event.name for event in prof.events()]
    unknown = sorted({n for n in names if n.startswith("c10d::") and n not in C10D_KINDS})
    if unknown:
        raise AssertionError(
            f"count_collectives does not know the c10d ops {unknown}: add them to C10D_KINDS"
        )
    counts = collections.Counter(C10D_KINDS[n] for n in names if n in C10D_KINDS)
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        gloo_events = sum(n.startswith("gloo:") for n in names)
        if gloo_events != sum(counts.values()):
            raise AssertionError(
                f"the profiler recorded {sum(counts.values())} c10d collectives {dict(counts)} but "
                f"{gloo_events} gloo events: {[n for n in names if n.startswith(('c10d::', 'gloo:'))]}"
            )
    return result, counts


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), int(sys.argv[2]))


def run_bounded(
    command: list[str], bound_s: float, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``command`` (a launcher such as torchrun, or a script that spawns its ranks) in a process session of
    its own, so that past ``bound_s`` seconds it is killed with everything it started; raises with its output
    then."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"{command} outlived {bound_s} s\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
