"""What the distributed tests run on every rank (through ``dist_harness.run_on_ranks``), and the
single-process full-batch float64 runs they are compared with.

One job per layout (DDP, FSDP2, tensor parallel, 2-D meshes, FSDP1) runs many checks in one spawn and
returns a dict ``{check name: result}``; a check that raises returns ``{"error": traceback}`` instead, so
one failing check does not hide the others. Trajectories are lists (one entry per step) of
``{parameter name: full tensor after the step}``.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import lars_fx
from dist_harness import count_collectives, mesh

STEPS = 6
GLOBAL_BATCH = 8
IN_FEATURES = 5
COEFFICIENT = 0.02  # larger than the default so that a wrong trust ratio moves the weights visibly
MODES = ("foreach", "for_loop", "fused", "compiled")
DEEP_LAYERS = 30
DEEP_STEPS = 3  # enough for a trajectory and a profiled step; its compiles are the costly part

# Two param groups with their own lr and weight decay; the group of a parameter is decided by its name.
GROUP_SETTINGS = ({"lr": 0.1, "weight_decay": 1e-3}, {"lr": 0.05, "weight_decay": 5e-4})
Writes = dict[int, str]
"""Weight writes between optimizer steps: {after step k: how} (see ``write_weights``)."""
WRITES: Writes = {1: "foreach_mul", 3: "to_local_mul"}
VARIANTS: dict[str, dict[str, Any]] = {
    # The nesterov runs also write every weight after steps 1 and 3 (the reference too): the carried weight
    # norms of fused=True must see both writes.
    "nesterov": {"momentum": 0.9, "nesterov": True, "scheduler": False, "writes": WRITES},
    "scheduled": {"momentum": 0.8, "dampening": 0.1, "nesterov": False, "scheduler": True, "writes": {}},
}


# -- models and data ---------------------------------------------------------------------------


class Net(nn.Module):
    """fc1 (7 output rows: uneven shards on 2 and 4 ranks) -> tanh -> fc2 -> LayerNorm -> tanh -> fc3.

    Three LARS weights; biases and the LayerNorm are not LARS by the default filter. fc1 -> fc2 is the
    column-wise -> row-wise pair of tensor parallelism; LayerNorm and fc3 stay plain tensors there.
    """

    out_features = 3

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, 7)
        self.fc2 = nn.Linear(7, 6)
        self.LayerNorm = nn.LayerNorm(6)
        self.fc3 = nn.Linear(6, self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.tanh(self.LayerNorm(self.fc2(torch.tanh(self.fc1(x))))))


class DeepNet(nn.Module):
    """DEEP_LAYERS LARS weights (widths alternate 7 and 5: uneven shards), plus one bias."""

    out_features = 5

    def __init__(self) -> None:
        super().__init__()
        widths = [IN_FEATURES] + [7 if i % 2 == 0 else 5 for i in range(DEEP_LAYERS)]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(widths))
        self.bias = nn.Parameter(torch.zeros(widths[-1]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x + self.bias


MODELS = {"net": Net, "deep": DeepNet}


def build_model(kind: str = "net", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[kind]().to(torch.float64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias" in name:
                param.uniform_(-0.5, 0.5)  # LayerNorm's and the deep net's biases start at 0: make them count
    return model


def global_batch(step: int, out_features: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN_FEATURES, dtype=torch.float64, generator=generator)
    y = torch.randn(GLOBAL_BATCH, out_features, dtype=torch.float64, generator=generator)
    return x, y


Batches = Callable[[int], tuple[Tensor, Tensor]]
"""step -> (inputs, targets) of the rows a rank trains on."""


def batch_slice(step: int, *, out_features: int, part: int, parts: int) -> tuple[Tensor, Tensor]:
    """The ``part``-th of ``parts`` equal slices of the global batch (data-parallel ranks see one each)."""
    x, y = global_batch(step, out_features)
    rows = GLOBAL_BATCH // parts
    return x[part * rows : (part + 1) * rows], y[part * rows : (part + 1) * rows]


def batches(kind: str = "net", part: int = 0, parts: int = 1) -> Batches:
    """The ``part``-th of ``parts`` slices of every step's batch (by default the whole batch)."""
    return functools.partial(batch_slice, out_features=MODELS[kind].out_features, part=part, parts=parts)


def data_parallel_batches(kind: str = "net") -> Batches:
    """Each rank's slice of the batch, when every rank is a data-parallel rank (DDP, FSDP2, HSDP)."""
    return batches(kind, dist.get_rank(), dist.get_world_size())


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    # The mean over the local rows: data parallelism averages gradients over ranks, giving the full batch's.
    return torch.nn.functional.mse_loss(model(x), y)


# -- optimizer ------------------------------------------------------------------------------


def group_index(name: str) -> int:
    if name.startswith("layers."):
        return 0 if int(name.split(".")[1]) < DEEP_LAYERS // 2 else 1
    return 0 if name.startswith(("fc1.", "LayerNorm.")) else 1


def strip_wrappers(name: str) -> str:
    for prefix in ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def sgd_for(model: nn.Module, variant: str) -> torch.optim.SGD:
    settings = VARIANTS[variant]
    groups: list[dict[str, Any]] = [{"params": [], **g} for g in GROUP_SETTINGS]
    for name, param in model.named_parameters():
        groups[group_index(strip_wrappers(name))]["params"].append((strip_wrappers(name), param))
    return torch.optim.SGD(
        [group for group in groups if group["params"]],  # FSDP1's flat parameters all fall in one group
        lr=0.1,
        momentum=settings["momentum"],
        dampening=settings.get("dampening", 0.0),
        nesterov=settings["nesterov"],
    )


class Stepper:
    """An optimizer in one mode: ``step()`` runs one optimizer step; ``scheduler_step()`` after it."""

    def __init__(self, model: nn.Module, variant: str, mode: str, *, writes: bool = True) -> None:
        self.mode = mode
        self.writes: Writes = VARIANTS[variant]["writes"] if writes else {}
        if mode == "backend":
            self.optimizer: torch.optim.Optimizer = sgd_for(model, variant)
            torch._dynamo.reset()
            self.step = torch.compile(
                self.optimizer.step, backend="lars_fx", options={"coefficient": COEFFICIENT}
            )
        else:
            self.optimizer = lars_fx.LARS(
                sgd_for(model, variant),
                coefficient=COEFFICIENT,
                foreach=mode != "for_loop",
                fused=mode == "fused",
                # the fused step's carried ||w||^2, which the weight writes must not stale
                carry_weight_norms=True,
            )
            if mode == "compiled":
                # a fresh cache: earlier optimizers' entries would count to the recompile limit
                torch._dynamo.reset()
                self.step = torch.compile(self.optimizer.step)
            else:
                self.step = self.optimizer.step
        self.scheduler = (
            torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)
            if VARIANTS[variant]["scheduler"]
            else None
        )
        self.graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def scheduler_step(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def why_not_compiled(self) -> str | None:
        """Why this mode did not run compiled code (None if it did, or is an eager mode)."""
        if self.mode in ("compiled", "backend"):
            if torch._dynamo.utils.counters["stats"]["unique_graphs"] == self.graphs_before:
                return "Dynamo compiled no graph"  # e.g. it ran the step eagerly past its recompile limit
        if self.mode == "fused":
            fused = self.optimizer.fused_step
            if fused is None or fused.compile_count == 0:
                return "the fused step compiled no graph"
            if fused.fallback is not None:
                return f"the fused step fell back to eager: {fused.fallback}"
        return None


# -- trajectories ---------------------------------------------------------------------------


def full_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter as a whole plain tensor (a collective for DTensors: call on every rank)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in model.named_parameters():
        value = param.full_tensor() if isinstance(param, DTensor) else param
        out[strip_wrappers(name)] = value.detach().clone()
    return out


def write_weights(model: nn.Module, how: str) -> None:
    """Scale every parameter in place, through torch._foreach_mul_ or through each DTensor's local piece."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    with torch.no_grad():
        if how == "foreach_mul":
            for same_kind in (
                [p for p in params if isinstance(p, DTensor)],
                [p for p in params if not isinstance(p, DTensor)],
            ):
                if same_kind:  # torch's foreach ops refuse lists mixing DTensors and plain tensors
                    torch._foreach_mul_(same_kind, 0.9)
        elif how == "to_local_mul":
            for p in params:
                (p.to_local() if isinstance(p, DTensor) else p).mul_(1.1)
        else:
            raise ValueError(how)


def train(
    model: nn.Module,
    stepper: Stepper,
    local_batch: Batches,
    steps: range,
    *,
    profile_step: int | None = None,
) -> dict[str, Any]:
    """Steps ``steps`` of training (with the variant's weight writes); the trajectory, and the collectives of
    ``profile_step``'s optimizer step."""
    trajectory, collectives = [], None
    for step in steps:
        x, y = local_batch(step)
        loss_of(model, x, y).backward()
        if step == profile_step:
            _, counts = count_collectives(stepper.step)
            collectives = dict(counts)
        else:
            stepper.step()
        stepper.optimizer.zero_grad(set_to_none=True)
        stepper.scheduler_step()
        if step in stepper.writes:
            write_weights(model, stepper.writes[step])
        trajectory.append(full_parameters(model))
    return {"trajectory": trajectory, "collectives": collectives, "not_compiled": stepper.why_not_compiled()}


def reference_trajectory(
    kind: str = "net", variant: str = "nesterov", steps: range = range(STEPS), writes: bool = True
) -> list[dict[str, Tensor]]:
    """The single-process full-batch float64 run with the per-tensor reference (``foreach=False``)."""
    model = build_model(kind)
    stepper = Stepper(model, variant, "for_loop", writes=writes)
    return train(model, stepper, batches(kind), steps)["trajectory"]


# -- running many checks in one job ---------------------------------------------------------------


class Checks:
    """Runs named checks on every rank; a check that raises records its traceback and the job goes on."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    def run(self, name: str, check: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            result = check()
        except Exception:
            result = {"error": f"rank {dist.get_rank()}:\n{traceback.format_exc()}"}
        if isinstance(result, dict):
            result.setdefault("seconds", time.perf_counter() - started)
        self.results[name] = result


# -- DDP -------------------------------------------------------------------------------------


def ddp_job() -> dict[str, Any]:
    """Every mode (and backend="lars_fx") under DDP, default and with gradient_as_bucket_view +
    static_graph."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    checks = Checks()
    configs = {"ddp": {}, "ddp_bucket_view_static": {"gradient_as_bucket_view": True, "static_graph": True}}
    for config, ddp_options in configs.items():
        for mode in (*MODES, "backend"):

            def check(mode: str = mode, ddp_options: dict = ddp_options) -> dict[str, Any]:
                model = DDP(build_model(), **ddp_options)
                stepper = Stepper(model.module, "scheduled", mode)
                return train(model, stepper, data_parallel_batches(), range(STEPS), profile_step=STEPS - 1)

            checks.run(f"{config}/{mode}", check)
    return checks.results


# -- FSDP2 -----------------------------------------------------------------------------------


def fsdp2_model(kind: str = "net", seed: int = 0, device_mesh: Any = None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = build_model(kind, seed)
    if kind == "net":
        fully_shard(model.fc1, mesh=device_mesh)
        fully_shard(model.fc2, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    return model


RESUME_AT = 3
CHECKPOINTED_MODES = ("foreach", "fused")


def fsdp2_run(kind: str, variant: str, mode: str, steps: range = range(STEPS)) -> dict[str, Any]:
    model = fsdp2_model(kind)
    stepper = Stepper(model, variant, mode)
    return train(model, stepper, data_parallel_batches(kind), steps, profile_step=steps[-1])


def fsdp2_nesterov_run(mode: str, checkpoint_dir: str) -> dict[str, Any]:
    """The nesterov run with WRITES; in CHECKPOINTED_MODES also a DCP round trip at RESUME_AT (a fresh model
    with other initial weights and a fresh optimizer load the checkpoint and train the same steps), and in
    eager foreach the full state dicts at RESUME_AT for a single-device run to load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model = fsdp2_model()
    stepper = Stepper(model, "nesterov", mode)
    batch = data_parallel_batches()
    first = train(model, stepper, batch, range(RESUME_AT))
    checkpoint_id = os.path.join(checkpoint_dir, mode)
    if mode in CHECKPOINTED_MODES:
        save_checkpoint(model, stepper.optimizer, checkpoint_id)
    full_state = None
    if mode == "foreach":
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(model, stepper.optimizer, options=options)
        full_state = {"model": model_state, "optim": optim_state}
    rest = train(model, stepper, batch, range(RESUME_AT, STEPS), profile_step=STEPS - 1)
    result = {**rest, "trajectory": first["trajectory"] + rest["trajectory"], "full_state": full_state}
    if mode in CHECKPOINTED_MODES:
        model = fsdp2_model(seed=1)
        stepper = Stepper(model, "nesterov", mode)
        load_checkpoint(model, stepper.optimizer, checkpoint_id)
        resumed = train(model, stepper, batch, range(RESUME_AT, STEPS))
        result["resumed"] = resumed["trajectory"]
        result["resumed_not_compiled"] = resumed["not_compiled"]
    return result


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_id: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint_id)


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_id: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def fsdp2_job(checkpoint_dir: str, single_device_state: dict[str, Any]) -> dict[str, Any]:
    checks = Checks()
    for mode in MODES:
        checks.run(f"net/nesterov/{mode}", lambda mode=mode: fsdp2_nesterov_run(mode, checkpoint_dir))
        checks.run(f"net/scheduled/{mode}", lambda mode=mode: fsdp2_run("net", "scheduled", mode))
    for mode in MODES:
        checks.run(
            f"deep/{mode}", lambda mode=mode: fsdp2_run("deep", "nesterov", mode, steps=range(DEEP_STEPS))
        )
    for mode in CHECKPOINTED_MODES:
        checks.run(f"full_state_in/{mode}", lambda mode=mode: full_state_in(mode, single_device_state))
    return checks.results


def load_full_state(model: nn.Module, optimizer: Any, full_state: dict[str, Any]) -> None:
    """``set_state_dict`` of full (unsharded) state dicts, into a sharded run or a single-device one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=full_state["model"],
        optim_state_dict=full_state["optim"],
        options=StateDictOptions(full_state_dict=True),
    )


def full_state_in(mode: str, full_state: dict[str, Any]) -> dict[str, Any]:
    """A single-device run's full state dicts loaded into a fresh FSDP2 model and optimizer, then trained
    on."""
    model = fsdp2_model(seed=1)
    stepper = Stepper(model, "nesterov", mode)
    load_full_state(model, stepper.optimizer, full_state)
    return train(model, stepper, data_parallel_batches(), range(RESUME_AT, STEPS))


def single_device_full_state(steps: int = RESUME_AT) -> dict[str, Any]:
    """In the test process: the reference run's full state dicts after ``steps`` steps."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model = build_model()
    stepper = Stepper(model, "nesterov", "for_loop")
    train(model, stepper, batches(), range(steps))
    model_state, optim_state = get_state_dict(
        model, stepper.optimizer, options=StateDictOptions(full_state_dict=True)
    )
    return {"model": model_state, "optim": optim_state}


def single_device_resume(full_state: dict[str, Any]) -> list[dict[str, Tensor]]:
    """In the test process: a single-device run (the reference mode) resumed from full state dicts."""
    model = build_model(seed=1)
    stepper = Stepper(model, "nesterov", "for_loop")
    load_full_state(model, stepper.optimizer, full_state)
    return train(model, stepper, batches(), range(RESUME_AT, STEPS))["trajectory"]


# -- tensor parallelism ------------------------------------------------------------------------


def tensor_parallel(model: Net, tp_mesh: Any) -> Net:
    """fc1 column-wise, fc2 row-wise; LayerNorm and fc3 stay plain tensors."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    # fc1's output stays a DTensor: its 7 columns shard unevenly, which a local tensor would not say.
    plan = {"fc1": ColwiseParallel(use_local_output=False), "fc2": RowwiseParallel()}
    return parallelize_module(model, tp_mesh, plan)


def tp_job() -> dict[str, Any]:
    checks = Checks()
    tp_mesh = mesh((dist.get_world_size(),), ("tp",))
    for mode in MODES:

        def check(mode: str = mode) -> dict[str, Any]:
            model = tensor_parallel(build_model(), tp_mesh)
            stepper = Stepper(model, "nesterov", mode)
            return train(model, stepper, batches(), range(STEPS), profile_step=STEPS - 1)  # the whole batch

        checks.run(f"tp/{mode}", check)
    return checks.results


# -- 2-D meshes (4 ranks) --------------------------------------------------------------------------


def mesh2d_job() -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    checks = Checks()
    fsdp_tp_mesh = mesh((2, 2), ("dp", "tp"))
    dp_rank = fsdp_tp_mesh["dp"].get_local_rank()
    for mode in MODES:

        def fsdp_tp(mode: str = mode) -> dict[str, Any]:
            model = tensor_parallel(build_model(), fsdp_tp_mesh["tp"])
            fully_shard(model.fc1, mesh=fsdp_tp_mesh["dp"])
            fully_shard(model.fc2, mesh=fsdp_tp_mesh["dp"])
            fully_shard(model, mesh=fsdp_tp_mesh["dp"])
            stepper = Stepper(model, "nesterov", mode)
            return train(model, stepper, batches("net", dp_rank, 2), range(STEPS), profile_step=STEPS - 1)

        checks.run(f"fsdp_tp/{mode}", fsdp_tp)

    hsdp_mesh = mesh((2, 2), ("replicate", "shard"))
    for mode in MODES:

        def hsdp(mode: str = mode) -> dict[str, Any]:
            model = fsdp2_model(device_mesh=hsdp_mesh)
            stepper = Stepper(model, "nesterov", mode)
            return train(model, stepper, data_parallel_batches(), range(STEPS), profile_step=STEPS - 1)

        checks.run(f"hsdp/{mode}", hsdp)

    checks.run("two_meshes", lambda: two_meshes(fsdp_tp_mesh["tp"]))
    return checks.results


def two_meshes(other_mesh: Any) -> dict[str, Any]:
    """fc1 sharded over all 4 ranks, fc2 over a 2-rank mesh of another 2-D mesh: one optimizer over both."""
    from torch.distributed.tensor import Shard, distribute_tensor

    model = build_model()
    world_mesh = mesh((dist.get_world_size(),), ("world",))
    with torch.no_grad():
        model.fc1.weight = nn.Parameter(distribute_tensor(model.fc1.weight.detach(), world_mesh, [Shard(0)]))
        model.fc2.weight = nn.Parameter(distribute_tensor(model.fc2.weight.detach(), other_mesh, [Shard(0)]))
    return refusal(
        lambda: lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1), coefficient=COEFFICIENT),
        model,
        loss_of_local_pieces,
    )


def loss_of_local_pieces(model: nn.Module) -> Tensor:
    """A loss that needs no forward across the two meshes: every parameter's local piece, squared."""
    return sum(local_view(p).square().sum() for p in model.parameters())


def refusal(
    make_optimizer: Callable[[], torch.optim.Optimizer], model: nn.Module, loss: Callable[[nn.Module], Tensor]
) -> dict[str, Any]:
    """Build the optimizer and step it once; what was raised (if anything), and whether a parameter moved."""
    before = [local_view(p).detach().clone() for p in model.parameters()]
    error = None
    try:
        optimizer = make_optimizer()
        loss(model).backward()
        optimizer.step()
    except Exception as raised:  # the check asserts on its type and message
        error = {"type": type(raised).__name__, "message": str(raised), "traceback": traceback.format_exc()}
    moved = [name for (name, p), old in zip(model.named_parameters(), before, strict=True)
             if not torch.equal(local_view(p), old)]
    return {"raised": error, "moved": moved}


def local_view(param: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


# -- FSDP1 -----------------------------------------------------------------------------------------


def fsdp1_job() -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    checks = Checks()
    first_batch = data_parallel_batches()(0)
    for use_orig_params in (True, False):

        def check(use_orig_params: bool = use_orig_params) -> dict[str, Any]:
            model = FSDP(build_model(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
            result = refusal(
                lambda: lars_fx.LARS(sgd_for(model, "nesterov"), coefficient=COEFFICIENT),
                model,
                lambda m: loss_of(m, *first_batch),
            )
            with FSDP.summon_full_params(model):
                result["parameters_after"] = {
                    strip_wrappers(n): p.detach().clone() for n, p in model.named_parameters()
                }
            return result

        checks.run(f"fsdp1/use_orig_params={use_orig_params}", check)
    return checks.results


# -- the harness's own checks --------------------------------------------------------------------


def rank_one_raises() -> int:
    if dist.get_rank() == 1:
        raise KeyError("rank one fails on purpose")
    dist.barrier()
    return 0


def rank_one_exits_early() -> int:
    if dist.get_rank() == 1:
        os._exit(0)
    dist.barrier()
    return 0


def rank_one_hangs() -> int:
    if dist.get_rank() == 1:
        time.sleep(3600)
    dist.barrier()  # rank 0 waits here for a collective that never comes
    return 0


def harness_self_check(value: float) -> dict[str, Any]:
    """What ``count_collectives`` counts for one collective issued each way, and a value from every rank."""
    import torch.distributed._functional_collectives as functional
    from torch.distributed.tensor import Shard, distribute_tensor

    group = dist.group.WORLD
    x = torch.arange(4, dtype=torch.float64)
    total = torch.tensor([value * (dist.get_rank() + 1)], dtype=torch.float64)
    compiled = torch.compile(lambda t: functional.all_reduce(t * 2, "sum", group) + 1)
    compiled(x)  # compiled outside the count
    world = mesh((dist.get_world_size(),), ("world",))
    sharded = distribute_tensor(torch.arange(6, dtype=torch.float64), world, [Shard(0)])

    def reduce_scatter_and_all_gather() -> None:
        half = torch.empty(2, dtype=torch.float64)
        dist.reduce_scatter_tensor(half, x)
        dist.all_gather_into_tensor(torch.empty(8, dtype=torch.float64), x)

    counted = {
        "eager all_reduce": lambda: dist.all_reduce(total),
        "functional all_reduce": lambda: functional.all_reduce(x, "sum", group).wait(),
        "compiled functional all_reduce": lambda: compiled(x),
        "reduce_scatter and all_gather": reduce_scatter_and_all_gather,
        "DTensor norm": lambda: torch.linalg.vector_norm(sharded).full_tensor(),
    }
    result: dict[str, Any] = {what: dict(count_collectives(fn)[1]) for what, fn in counted.items()}
    result["rank_and_sum"] = (dist.get_rank(), total.item())
    return result
