"""Differential matrix: every mode x schedulers x float/tensor lr x LARS/SGD options x mid-run changes,
each step against the float64 reference (``lars_fx.functional.lars_sgd_reference``).

A *case* (``Case``) is one point of the matrix; ``run_case`` builds the mode, drives it for ``STEPS`` steps
with fresh seeded gradients over two param groups (a zero-norm parameter, a parameter without a gradient on
some steps, mixed dtypes where asked), replays the same steps on float64 copies with the lrs, momenta and
options the run actually had (read back from the param groups before each step) and compares parameters,
momentum buffers and telemetry after every step. ``invalid`` is the one place that says which combinations
do not exist.

The cases are covering arrays (all pairs of option values, see ``covering_array``):

    pytest tests/test_differential.py            # CI: every eager case, the busiest compiled ones
    pytest -m slow tests/test_differential.py    # the full sweep, every mode: 435 cases, 20-60 min on 2 cores
    pytest -m slow tests/test_differential.py -k fused   # one mode of it

Compiled modes take 10-30 s per compile on a CPU, hence the split.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest
import torch
from torch import Tensor

import lars_fx
from lars_fx import ParamInfo, default_lars_filter
from lars_fx import functional as F
from lars_modes import lars_step_in_mode

STEPS = 12
CHANGE_STEP = 3  # options change before this step
NONFINITE_STEP = 5  # with skip_nonfinite, this step gets an inf gradient and must be skipped
COMPILED_CI_CASES_PER_MODE = 4

EAGER_MODES = ("foreach", "per_tensor", "flat")
COMPILED_MODES = ("fused", "compiled_step", "backend", "flat_fused")
FLAT_MODES = ("flat", "flat_fused")
MODES = EAGER_MODES + COMPILED_MODES

SCHEDULES = (
    "constant", "manual", "step", "multistep", "linear_warmup", "cosine", "onecycle", "cyclic", "polynomial",
    "lambda", "plateau", "sequential",
)
LARS_ATTRIBUTE_CHANGES = (
    "coefficient", "use_clip", "epsilon", "unit_trust_on_zero_norm", "lr_inside_momentum", "lars_filter",
)
GROUP_CHANGES = ("weight_decay", "momentum", "dampening")
CHANGES = ("none", *LARS_ATTRIBUTE_CHANGES, *GROUP_CHANGES)

BASE_LRS = (0.3, 0.1)
WEIGHT_DECAYS = (1e-2, 1e-3)
COEFFICIENT = 0.05
EPSILON = 1e-5


# -- the case ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    mode: str = "foreach"
    schedule: str = "constant"
    tensor_lr: bool = False
    momentum: float = 0.9
    nesterov: bool = False
    dampening: float = 0.0
    maximize: bool = False
    use_clip: bool = False
    unit_trust_on_zero_norm: bool = False
    lr_inside_momentum: bool = False
    telemetry: bool = False
    skip_nonfinite: bool = False
    change: str = "none"
    mixed_dtypes: bool = False
    absent_grads: bool = True
    extra_rows: int = 0  # another model: every weight this many rows taller
    seed: int = 0

    @property
    def id(self) -> str:
        default = Case()
        parts = [self.mode, self.schedule, "tensor_lr" if self.tensor_lr else "float_lr"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("mode", "schedule", "tensor_lr", "seed") or value == getattr(default, f.name):
                continue
            parts.append(
                f"{f.name}={value}" if not isinstance(value, bool) else (f.name if value else f"no_{f.name}")
            )
        return "-".join(parts)


DIMENSIONS: dict[str, tuple] = {
    "mode": MODES,
    "schedule": SCHEDULES,
    "tensor_lr": (False, True),
    "momentum": (0.9, 0.0),
    "nesterov": (False, True),
    "dampening": (0.0, 0.3),
    "maximize": (False, True),
    "use_clip": (False, True),
    "unit_trust_on_zero_norm": (False, True),
    "lr_inside_momentum": (False, True),
    "telemetry": (False, True),
    "skip_nonfinite": (False, True),
    "change": CHANGES,
    "mixed_dtypes": (False, True),
    "absent_grads": (True, False),
}


def invalid(case: Case) -> str | None:
    """Why ``case`` does not exist (None when it does): the one place that encodes validity."""
    if case.nesterov and (case.momentum == 0 or case.dampening != 0):
        return "torch.optim.SGD: nesterov needs momentum > 0 and dampening 0"
    if case.nesterov and case.change == "dampening":
        return "torch.optim.SGD: nesterov needs dampening 0"
    if case.mode == "backend" and (case.telemetry or case.skip_nonfinite):
        return "backend='lars_fx' has no telemetry or skip_nonfinite option"
    if case.mode == "backend" and case.momentum == 0 and case.change == "momentum" and case.absent_grads:
        # Momentum switched on after the first compiled step, for a parameter whose gradient comes late:
        # Dynamo's guards miss the state SGD creates then, and the backend refuses with a clear error
        # (tests/test_backend.py: test_a_parameter_whose_first_gradient_comes_later) instead of restarting it.
        return (
            "backend='lars_fx' refuses momentum switched on mid-run with late gradients (torch's guard gap)"
        )
    return None


# -- covering arrays --------------------------------------------------------------------------


def covering_array(
    dimensions: dict[str, tuple],
    interactions: Iterable[tuple[str, ...]],
    is_valid: Callable[[dict[str, Any]], bool],
    seed: int = 0,
    candidates: int = 8,
) -> list[dict[str, Any]]:
    """A small set of valid assignments in which every value combination of every interaction (a tuple of
    dimension names) occurs at least once, where some valid assignment has it (greedy, AETG-style).

    Rows come out in decreasing order of what they newly cover, so a prefix is the best sample of its size.
    """
    rng = random.Random(seed)
    names = list(dimensions)
    interactions = [tuple(i) for i in interactions]
    touching = {name: [k for k, dims in enumerate(interactions) if name in dims] for name in names}

    def completions(partial: dict[str, Any]) -> Iterable[dict[str, Any]]:
        yield {**{n: values[0] for n, values in dimensions.items()}, **partial}
        for _ in range(256):
            yield {**{n: rng.choice(dimensions[n]) for n in names}, **partial}

    def valid_completion(partial: dict[str, Any]) -> dict[str, Any] | None:
        return next((row for row in completions(partial) if is_valid(row)), None)

    uncovered: set[tuple[int, tuple]] = set()
    for k, dims in enumerate(interactions):
        for values in itertools.product(*(dimensions[d] for d in dims)):
            if valid_completion(dict(zip(dims, values, strict=True))) is not None:
                uncovered.add((k, values))

    def newly_covered(row: dict[str, Any]) -> set[tuple[int, tuple]]:
        return {(k, tuple(row[d] for d in dims)) for k, dims in enumerate(interactions)} & uncovered

    def gain(row: dict[str, Any], name: str, value: Any) -> int:
        """How many uncovered combinations setting ``name`` to ``value`` completes in the partial ``row``."""
        count = 0
        for k in touching[name]:
            key = []
            for d in interactions[k]:
                if d == name:
                    key.append(value)
                elif d in row:
                    key.append(row[d])
                else:
                    break
            else:
                count += (k, tuple(key)) in uncovered
        return count

    rows = []
    while uncovered:
        target_k, target_values = rng.choice(sorted(uncovered, key=repr))
        target = dict(zip(interactions[target_k], target_values, strict=True))
        best, best_gain = None, set()
        for _ in range(candidates):
            row = dict(target)
            for name in rng.sample(names, len(names)):
                if name not in row:
                    options = rng.sample(dimensions[name], len(dimensions[name]))
                    row[name] = max(options, key=lambda v: gain(row, name, v))
            if not is_valid(row):
                continue
            covered = newly_covered(row)
            if len(covered) > len(best_gain):
                best, best_gain = row, covered
        if best is None:  # greedy filling kept hitting invalid rows: any valid completion of the target
            best = valid_completion(target)
            best_gain = newly_covered(best)
        rows.append(best)
        uncovered -= best_gain
    return rows


def _case_valid(row: dict[str, Any]) -> bool:
    return invalid(Case(**row)) is None


@cache
def eager_cases(mode: str) -> list[Case]:
    """All pairs of every other dimension's values, in one eager mode (cheap: every CI run)."""
    dims = {**DIMENSIONS, "mode": (mode,)}
    pairs = itertools.combinations([d for d in DIMENSIONS if d != "mode"], 2)
    rows = covering_array(dims, pairs, _case_valid, seed=11)
    return [Case(**row, seed=1000 + i) for i, row in enumerate(rows)]


@cache
def compiled_cases(mode: str) -> list[Case]:
    """All pairs of values in one compiled mode, (schedule, change) pairs aside; and the triples of the lr
    kind with clip, nesterov and momentum, the interactions the compiled paths have got wrong."""
    dims = {**DIMENSIONS, "mode": (mode,)}
    others = [d for d in DIMENSIONS if d != "mode"]
    pairs = [p for p in itertools.combinations(others, 2) if set(p) != {"schedule", "change"}]
    triples = [("tensor_lr", "use_clip", "schedule"), ("tensor_lr", "nesterov", "momentum")]
    rows = covering_array(dims, [*pairs, *triples], _case_valid, seed=23 + COMPILED_MODES.index(mode))
    return [Case(**row, seed=2000 + i) for i, row in enumerate(rows)]


def features(case: Case) -> int:
    """How many things a case does beyond the plainest run: a float lr, a schedule, momentum, every option."""
    plain = Case(mode=case.mode, tensor_lr=True, momentum=0.0, absent_grads=False, seed=case.seed)
    cycles_momentum = case.schedule in ("onecycle", "cyclic")
    return (
        sum(getattr(case, f.name) != getattr(plain, f.name) for f in dataclasses.fields(case))
        + cycles_momentum
    )


def ci_cases() -> list[Case]:
    """Every eager case; of each compiled mode's, the rows that do the most at once (a compile is 10-30 s)."""
    cases = [case for mode in EAGER_MODES for case in eager_cases(mode)]
    for mode in COMPILED_MODES:
        busiest = sorted(compiled_cases(mode), key=features, reverse=True)  # stable: ties keep covering order
        cases += busiest[:COMPILED_CI_CASES_PER_MODE]
    return cases


def sweep_cases() -> list[Case]:
    return [case for mode in EAGER_MODES for case in eager_cases(mode)] + [
        case for mode in COMPILED_MODES for case in compiled_cases(mode)
    ]


# -- the model ----------------------------------------------------------------------------------

# name -> (shape, its dtype with mixed_dtypes)
PARAMETERS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "fc1.weight": ((6, 5), torch.float32),
    "fc1.bias": ((6,), torch.bfloat16),
    "LayerNorm.weight": ((6,), torch.float32),
    "fc2.weight": ((3, 6), torch.float64),
    "zero.weight": ((4, 4), torch.float32),  # starts (and under MindSpore's rule stays) at norm 0
    "expert.weight": ((4, 3), torch.bfloat16),  # no gradient on steps where gradient_absent() says so
}
GROUPS = (("fc1.weight", "fc1.bias", "LayerNorm.weight"), ("fc2.weight", "zero.weight", "expert.weight"))


def other_lars_filter(info: ParamInfo) -> bool:
    """Flips three of the default filter's decisions (fc1.bias in; fc2.weight and zero.weight out)."""
    return info.name in ("fc1.weight", "fc1.bias", "expert.weight")


def gradient_absent(case: Case, name: str, step: int) -> bool:
    return case.absent_grads and name == "expert.weight" and step % 3 == 0


def make_parameters(case: Case) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(case.seed)
    params = {}
    for name, (shape, mixed_dtype) in PARAMETERS.items():
        shape = (shape[0] + case.extra_rows, *shape[1:])
        dtype = mixed_dtype if case.mixed_dtypes else torch.float32
        if name == "zero.weight":
            value = torch.zeros(shape)
        elif name == "LayerNorm.weight":
            value = torch.ones(shape)
        else:
            value = torch.randn(shape, generator=gen) * 0.5
        params[name] = torch.nn.Parameter(value.to(dtype))
    return params


def set_gradients(case: Case, params: dict[str, Tensor], step: int) -> None:
    """Fresh gradients; the flat modes get them as backward gives them, written into the existing ``.grad``
    (their flat buffer's views), and as new tensors after a step without (which the flat step copies in)."""
    gen = torch.Generator().manual_seed(case.seed * 1000 + step)
    for name, p in params.items():
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5
        if gradient_absent(case, name, step):
            p.grad = None
        elif case.mode in FLAT_MODES and p.grad is not None:
            p.grad.copy_(g)
        else:
            p.grad = g.to(p.dtype)
    if case.skip_nonfinite and step == NONFINITE_STEP:
        params["fc1.bias"].grad[0] = math.inf


# -- the mode -------------------------------------------------------------------------------------


@dataclass
class LarsOptions:
    """The LARS options a run is meant to have (the oracle's, never read back from the optimizer)."""

    coefficient: float = COEFFICIENT
    epsilon: float = EPSILON
    use_clip: bool = False
    unit_trust_on_zero_norm: bool = False
    lr_inside_momentum: bool = False
    lars_filter: Callable[[ParamInfo], bool] = default_lars_filter

    def changed(self, attribute: str) -> Any:
        """The value ``attribute`` takes at CHANGE_STEP."""
        return {
            "coefficient": 0.12,
            "epsilon": 0.5,
            "use_clip": not self.use_clip,
            "unit_trust_on_zero_norm": not self.unit_trust_on_zero_norm,
            "lr_inside_momentum": not self.lr_inside_momentum,
            "lars_filter": other_lars_filter,
        }[attribute]


@dataclass
class Driver:
    """A built mode: what to call each step and what to hand the scheduler."""

    case: Case
    sgd: torch.optim.SGD
    lars: lars_fx.LARS | None
    step: Callable[[], Any]
    options: LarsOptions
    rebuild: Callable[[LarsOptions], Callable[[], Any]] | None = None  # backend: a new compiled step
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.lars if self.lars is not None else self.sgd

    def change(self, attribute: str) -> None:
        """Change a LARS option mid-run, as a user would; a refusal must name the attribute."""
        value = self.options.changed(attribute)
        if self.rebuild is not None:
            self.options = dataclasses.replace(self.options, **{attribute: value})
            self.step = self.rebuild(self.options)
            return
        try:
            setattr(self.lars, attribute, value)
        except (AttributeError, TypeError, ValueError) as error:
            assert attribute in str(error), (
                f"refusing to change {attribute}, the error does not name it: {error}"
            )
            self.refused[attribute] = str(error)
            return
        self.options = dataclasses.replace(self.options, **{attribute: value})


def build(case: Case, params: dict[str, torch.nn.Parameter]) -> Driver:
    def lr(value: float) -> float | Tensor:
        return torch.tensor(value) if case.tensor_lr else value

    groups = [
        {"params": [(name, params[name]) for name in names], "lr": lr(base_lr), "weight_decay": decay}
        for names, base_lr, decay in zip(GROUPS, BASE_LRS, WEIGHT_DECAYS, strict=True)
    ]
    sgd = torch.optim.SGD(
        groups, lr=lr(BASE_LRS[0]), momentum=case.momentum, dampening=case.dampening, nesterov=case.nesterov,
        maximize=case.maximize,
    )
    options = LarsOptions(use_clip=case.use_clip, unit_trust_on_zero_norm=case.unit_trust_on_zero_norm,
                          lr_inside_momentum=case.lr_inside_momentum)
    if case.mode == "backend":
        def compiled_sgd_step(options: LarsOptions) -> Callable[[], Any]:
            return torch.compile(sgd.step, backend="lars_fx", options=dataclasses.asdict(options))

        return Driver(case, sgd, None, compiled_sgd_step(options), options, rebuild=compiled_sgd_step)
    lars = lars_fx.LARS(
        sgd, **dataclasses.asdict(options), telemetry=case.telemetry, skip_nonfinite=case.skip_nonfinite,
        foreach=case.mode != "per_tensor", fused=case.mode in ("fused", "flat_fused"),
        flat=case.mode in FLAT_MODES,
    )
    step = torch.compile(lars.step) if case.mode == "compiled_step" else lars.step
    return Driver(case, sgd, lars, step, options)


# -- the schedules ----------------------------------------------------------------------------------

PLATEAU_METRICS = (1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7)
Scheduler = Callable[[int], None]  # called after the optimizer step of step t


def make_schedule(name: str, opt: torch.optim.Optimizer) -> Scheduler:
    S = torch.optim.lr_scheduler
    if name == "constant":
        return lambda t: None
    if name == "manual":
        def set_lrs(t: int) -> None:  # 0.3, 0.279, 0.258, ...: a new float every step
            for group, base in zip(opt.param_groups, BASE_LRS, strict=True):
                value = base * (1 - 0.07 * (t + 1))
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(value)
                else:
                    group["lr"] = value
        return set_lrs
    if name == "plateau":
        plateau = S.ReduceLROnPlateau(opt, factor=0.5, patience=1)
        return lambda t: plateau.step(PLATEAU_METRICS[t])
    scheduler = {
        "step": lambda: S.StepLR(opt, step_size=3, gamma=0.5),
        "multistep": lambda: S.MultiStepLR(opt, milestones=[2, 5, 9], gamma=0.3),
        "linear_warmup": lambda: S.LinearLR(opt, start_factor=0.1, total_iters=5),
        "cosine": lambda: S.CosineAnnealingLR(opt, T_max=STEPS, eta_min=0.005),
        "onecycle": lambda: S.OneCycleLR(opt, max_lr=[0.5, 0.2], total_steps=STEPS + 1),
        "cyclic": lambda: S.CyclicLR(opt, base_lr=[0.02, 0.01], max_lr=[0.5, 0.2], step_size_up=3,
                                     base_momentum=0.8, max_momentum=0.95),
        "polynomial": lambda: S.PolynomialLR(opt, total_iters=STEPS, power=2.0),
        "lambda": lambda: S.LambdaLR(opt, lr_lambda=lambda t: 1.0 / (1.0 + 0.5 * t)),
        "sequential": lambda: S.SequentialLR(
            opt,
            [S.LinearLR(opt, start_factor=0.2, total_iters=3),
             S.CosineAnnealingLR(opt, T_max=9, eta_min=0.01)],
            milestones=[3],
        ),
    }[name]()
    return lambda t: scheduler.step()


# -- the oracle -------------------------------------------------------------------------------------


def _number(value: float | Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


class Oracle:
    """The float64 reference over copies of the parameters, fed the hyperparameters the run had."""

    def __init__(self, params: dict[str, Tensor]) -> None:
        self.params = params
        self.weights = {name: p.detach().double().clone() for name, p in params.items()}
        self.buffers: dict[str, Tensor] = {}
        self.telemetry: dict[tuple[int, str], tuple[float, float, float]] = {}
        self.recorded_steps = 0

    def step(self, step: int, groups: list[dict[str, Any]], grads: dict[str, Tensor], options: LarsOptions,
             skip_nonfinite: bool) -> None:
        if skip_nonfinite and not all(bool(g.isfinite().all()) for g in grads.values()):
            return
        for group_index, group in enumerate(groups):
            names = [n for n in group["param_names"] if n in grads]
            if not names:
                continue
            positions = [group["param_names"].index(n) for n in names]
            mask = [bool(options.lars_filter(ParamInfo(n, self.params[n], group_index, position)))
                    for n, position in zip(names, positions, strict=True)]
            lr, momentum, decay = _number(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
            lars_options = dict(coefficient=options.coefficient, epsilon=options.epsilon,
                                use_clip=options.use_clip,
                                unit_trust_on_zero_norm=options.unit_trust_on_zero_norm)
            self._expect_telemetry(
                step, group_index, names, mask, grads, dict(lars_options, weight_decay=decay, lr=lr)
            )
            new_buffers = F.lars_sgd_reference(
                [self.weights[n] for n in names], [grads[n] for n in names],
                [self.buffers.get(n) if momentum != 0 else None for n in names], mask,
                lr=lr, weight_decay=decay, momentum=momentum, dampening=float(group["dampening"]),
                nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]),
                lr_inside_momentum=options.lr_inside_momentum, **lars_options,
            )
            for n, buf in zip(names, new_buffers, strict=True):
                if buf is not None:
                    self.buffers[n] = buf

    def _expect_telemetry(self, step, group_index, names, mask, grads, options) -> None:
        for n, use_lars in zip(names, mask, strict=True):
            if use_lars:
                w, g = torch.linalg.vector_norm(self.weights[n]), torch.linalg.vector_norm(grads[n])
                ratio = F.trust_ratio(w, g, **options)
                self.telemetry[(step, n)] = (float(w), float(g), float(ratio))

    def reanchor(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Take the run's value of a half-precision tensor: its rounding is checked per step, not over the
        run."""
        p = self.params[name]
        self.weights[name] = p.detach().double().clone()
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None and name in self.buffers:
            self.buffers[name] = buf.double().clone()


# bf16: rounding of the update too
TOLERANCES = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-5, 2e-6), torch.bfloat16: (1e-2, 1e-2)}


def _compare(what: str, got: Tensor, want: Tensor, case: Case, step: int) -> None:
    rtol, atol = TOLERANCES[got.dtype]
    got64 = got.detach().double()
    if not torch.allclose(got64, want, rtol=rtol, atol=atol, equal_nan=False):
        error = (got64 - want).abs().max().item()
        raise AssertionError(
            f"{case.id}: after step {step}, {what} differs from the float64 reference by up to {error:.3g} "
            f"(rtol {rtol}, atol {atol}; |reference| up to {want.abs().max().item():.3g})"
        )


def check_against(oracle: Oracle, driver: Driver, step: int) -> None:
    state = driver.sgd.state
    for name, p in oracle.params.items():
        _compare(name, p, oracle.weights[name], driver.case, step)
        buf = state.get(p, {}).get("momentum_buffer")
        if name in oracle.buffers:
            assert buf is not None, f"{driver.case.id}: after step {step}, {name} has no momentum buffer"
            _compare(f"momentum buffer of {name}", buf, oracle.buffers[name], driver.case, step)


def check_telemetry(oracle: Oracle, driver: Driver) -> None:
    if driver.lars is None or driver.lars.telemetry is None:
        return
    records = {(r["step"], r["param"]): (r["w_norm"], r["g_norm"], r["trust_ratio"])
               for r in driver.lars.telemetry.to_records()}
    assert set(records) == set(oracle.telemetry), (
        f"{driver.case.id}: telemetry recorded {sorted(set(records) - set(oracle.telemetry))} beyond and "
        f"misses {sorted(set(oracle.telemetry) - set(records))}"
    )
    for key, want in oracle.telemetry.items():
        assert records[key] == pytest.approx(want, rel=1e-4, abs=1e-7), f"{driver.case.id}: telemetry {key}"


# -- the runner -------------------------------------------------------------------------------------

# Per configuration: Dynamo's automatic dynamic recompiles once when a float (lr; momentum) first changes.
MAX_RECOMPILES_ON_VALUES = 2


def inductor_compiles() -> int:
    """Graphs handed to Inductor so far in this process (every compile looks in its FX graph cache)."""
    inductor = torch._dynamo.utils.counters["inductor"]
    return inductor["fxgraph_cache_hit"] + inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_bypass"]


class Run:
    """One case in progress: ``advance(step)`` steps the mode and the oracle and compares; ``finish`` checks
    what only the whole run shows. Runs may interleave (several optimizers in one process)."""

    def __init__(self, case: Case, absent: Callable[[str, int], bool] | None = None) -> None:
        reason = invalid(case)
        assert reason is None, f"{case.id} is not a valid case: {reason}"
        self.case = case
        self.params = make_parameters(case)
        self.driver = build(case, self.params)
        self.schedule = make_schedule(case.schedule, self.driver.optimizer)
        self.oracle = Oracle(self.params)
        self.absent = absent
        self.compiles = 0
        self.seen: set[tuple] = set()
        self.value_recompiles: dict[tuple, list[int]] = {}

    def structure(self, step: int) -> tuple:
        """What a compiled step may legitimately recompile for (anything else is a value: lr, momentum,
        ...)."""
        sgd = self.driver.sgd
        groups = tuple(
            (float(g["weight_decay"]), float(g["momentum"]) != 0, float(g["dampening"]), bool(g["nesterov"]))
            for g in sgd.param_groups
        )
        has = tuple(
            (p.grad is not None, "momentum_buffer" in sgd.state.get(p, {})) for p in self.params.values()
        )
        options = dataclasses.astuple(self.driver.options) + tuple(self.driver.refused)
        return groups, has, options, step == NONFINITE_STEP and self.case.skip_nonfinite

    def change_options(self, step: int) -> None:
        change = self.case.change
        if step != CHANGE_STEP or change == "none":
            return
        if change in LARS_ATTRIBUTE_CHANGES:
            self.driver.change(change)
            return
        for group in self.driver.sgd.param_groups:
            group[change] = {"weight_decay": 3 * group["weight_decay"], "momentum": 0.6,
                             "dampening": 0.3 if group["dampening"] == 0 else 0.0}[change]

    def advance(self, step: int) -> None:
        case, driver, params = self.case, self.driver, self.params
        self.change_options(step)
        set_gradients(case, params, step)
        if self.absent is not None:
            for name, p in params.items():
                if self.absent(name, step):
                    p.grad = None
        grads = {name: p.grad.double() for name, p in params.items() if p.grad is not None}
        groups_before = [{**g, "lr": _number(g["lr"])} for g in driver.sgd.param_groups]
        signature = self.structure(step)
        before = inductor_compiles()
        driver.step()
        compiled = inductor_compiles() - before
        self.compiles += compiled
        if compiled and signature in self.seen:
            self.value_recompiles.setdefault(signature, []).append(step)
        self.seen.add(signature)
        self.oracle.step(step, groups_before, grads, driver.options, case.skip_nonfinite)
        check_against(self.oracle, driver, step)
        for name, p in params.items():
            if p.dtype == torch.bfloat16:
                self.oracle.reanchor(name, driver.sgd)
        self.schedule(step)

    def finish(self) -> None:
        case, driver = self.case, self.driver
        check_telemetry(self.oracle, driver)
        if case.skip_nonfinite:
            assert driver.lars.skipped_steps == 1, (
                f"{case.id}: skipped_steps {driver.lars.skipped_steps}, expected 1"
            )
        if case.mode in COMPILED_MODES:
            assert self.compiles > 0, f"{case.id}: nothing was compiled (Inductor's FX graph cache off?)"
        worst = max(self.value_recompiles.values(), key=len, default=[])
        assert len(worst) <= MAX_RECOMPILES_ON_VALUES, (
            f"{case.id}: recompiled at steps {worst}, each time for a configuration it had compiled already, "
            "where only values (lr, momentum, a counter, ...) had changed"
        )


def run_case(case: Case, absent: Callable[[str, int], bool] | None = None) -> Run:
    if case.mode in ("compiled_step", "backend"):
        torch._dynamo.reset()  # one case's recompiles must not count against the next's limit
    run = Run(case, absent)
    for step in range(STEPS):
        run.advance(step)
    run.finish()
    return run


ignore_scheduler_warnings = pytest.mark.filterwarnings(
    "ignore:Detected call of `lr_scheduler.step\\(\\)` "
    "before"  # a compiled step bypasses the scheduler's counter
)


@ignore_scheduler_warnings
@pytest.mark.parametrize("case", ci_cases(), ids=lambda c: c.id)
def test_case(case: Case) -> None:
    run_case(case)


@ignore_scheduler_warnings
@pytest.mark.slow
@pytest.mark.parametrize("case", sweep_cases(), ids=lambda c: c.id)
def test_sweep(case: Case) -> None:
    run_case(case)


# -- several optimizers, models and modes in one process -------------------------------------------


@ignore_scheduler_warnings
def test_several_optimizers_and_models_in_one_process():
    """Dynamo's and Inductor's caches are process-wide: interleaved runs must not see each other's values."""
    torch._dynamo.reset()
    cases = [
        Case(mode="compiled_step", schedule="manual", use_clip=True, absent_grads=False, seed=31),
        Case(mode="compiled_step", schedule="cosine", nesterov=True, absent_grads=False, seed=32),
        Case(mode="backend", schedule="manual", absent_grads=False, seed=33),
        Case(mode="backend", schedule="step", use_clip=True, absent_grads=False, seed=34, extra_rows=2),
        Case(mode="fused", schedule="onecycle", use_clip=True, seed=35),
        Case(mode="foreach", schedule="cyclic", use_clip=True, seed=36),
    ]
    runs = [Run(case) for case in cases]
    for step in range(STEPS):
        for run in runs:
            run.advance(step)
    for run in runs:
        run.finish()


# -- when Dynamo gives up, and unbounded keys --------------------------------------------------------


def _recompile_limit_config() -> str:
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_backend_never_runs_plain_sgd_when_dynamo_gives_up():
    """Another parameter without a gradient every step: after Dynamo's recompile limit the SGD step would run
    uncompiled, as plain SGD. The step must stay LARS, or refuse with an error before anything moves."""
    torch._dynamo.reset()
    names = list(PARAMETERS)
    run = Run(
        Case(mode="backend", absent_grads=False, seed=41), absent=lambda name, step: name == names[step % 6]
    )
    with torch._dynamo.config.patch(**{_recompile_limit_config(): 2}):  # reach the limit in a few steps
        for step in range(6):
            before = {name: p.detach().clone() for name, p in run.params.items()}
            try:
                run.advance(step)
            except AssertionError:
                raise
            except Exception as error:  # a refusal: loud, and before any number moved
                assert all(torch.equal(before[n], p) for n, p in run.params.items()), (
                    f"step {step} moved, then raised"
                )
                assert "lars" in str(error).lower(), f"the refusal does not say it is about LARS: {error}"
                break
    torch._dynamo.reset()


def test_fused_keys_for_changing_gradient_subsets_are_bounded():
    """An MoE-like model whose experts get gradients in turn: every step right, and a bounded number of
    compiles (a missing gradient handled without a new graph, or the eager step after a few keys, saying so
    once)."""
    import warnings

    import lars_fx.fused

    bound = getattr(lars_fx.fused, "MAX_GRAPHS", 8)
    assert bound <= 8, f"{bound} graphs is not 'a few'"
    experts = 12
    gen = torch.Generator().manual_seed(51)
    params = {
        f"expert{k}.weight": torch.nn.Parameter(torch.randn(3, 4, generator=gen)) for k in range(experts)
    }
    sgd = torch.optim.SGD([{"params": list(params.items())}], lr=0.2, momentum=0.9, weight_decay=1e-3)
    lars = lars_fx.LARS(sgd, coefficient=COEFFICIENT, fused=True)
    oracle = Oracle(params)
    before = inductor_compiles()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2 * experts):
            active = {f"expert{step % experts}.weight", f"expert{(step + 5) % experts}.weight"}
            for name, p in params.items():
                p.grad = torch.randn(p.shape, generator=gen) if name in active or step == 0 else None
            grads = {n: p.grad.double() for n, p in params.items() if p.grad is not None}
            groups = [dict(g) for g in sgd.param_groups]
            lars.step()
            oracle.step(step, groups, grads, LarsOptions(), skip_nonfinite=False)
            for name, p in params.items():
                _compare(name, p, oracle.weights[name], Case(mode="fused"), step)
            compiles = inductor_compiles() - before
            assert compiles <= bound, (
                f"step {step}: {compiles} graphs compiled for {step + 1} gradient subsets"
            )
    said = [w for w in caught if "fused" in str(w.message)]
    if compiles == bound:
        assert len(said) == 1, f"reaching the limit of {bound} graphs said so {len(said)} times"


# -- found by the property test, pinned ----------------------------------------------------------------------


def _single_parameter_step(mode: str, params: dict[str, torch.nn.Parameter], lr: float | Tensor,
                           **lars_options: Any) -> Callable[[], Any]:
    return lars_step_in_mode(mode, list(params.items()), {"lr": lr, "momentum": 0.9, "weight_decay": 1e-3},
                             **lars_options)


@pytest.mark.parametrize("mode", MODES)
def test_norms_past_float32_range(mode):
    """Float32 weights (or gradients) near 1e20: their squared norm overflows float32 where the float64
    reference is finite. lars-fx's documented limit: such a tensor's step is NaN/inf, never a finite wrong
    one (a norm of inf used to give a trust ratio of 0: no step at all); the other tensors step exactly."""
    gen = torch.Generator().manual_seed(61)
    params = {"huge.weight": torch.nn.Parameter(torch.randn(3, 4, generator=gen) * 1e20),
              "fine.weight": torch.nn.Parameter(torch.randn(3, 4, generator=gen)),
              "other.weight": torch.nn.Parameter(torch.randn(3, 4, generator=gen))}
    step = _single_parameter_step(mode, params, 0.1, coefficient=0.02)
    oracle = Oracle(params)
    sgd_groups = lambda: [{"params": list(params.values()), "param_names": list(params), "lr": 0.1,  # noqa: E731
                           "weight_decay": 1e-3, "momentum": 0.9, "dampening": 0.0, "nesterov": False,
                           "maximize": False}]
    overflowed = set()
    for index in range(3):
        for name, p in params.items():
            scale = 1e20 if name == "fine.weight" and index == 1 else 1.0  # step 1: a huge gradient too
            p.grad = torch.randn(p.shape, generator=gen) * scale
        grads = {n: p.grad.double() for n, p in params.items()}
        overflowed |= {n for n, p in params.items() if _norm_overflows(p.detach(), p.grad)}
        step()
        oracle.step(index, sgd_groups(), grads, LarsOptions(coefficient=0.02), skip_nonfinite=False)
        for name, p in params.items():
            if name in overflowed:
                assert not p.isfinite().all(), (
                    f"{mode}, step {index}: {name} overflowed float32 yet is finite"
                )
            else:
                _compare(name, p, oracle.weights[name], Case(mode=mode), index)
    assert overflowed == {"huge.weight", "fine.weight"}


def causes(error: BaseException) -> list[BaseException]:
    """The error and what it wraps (Dynamo wraps a backend's error in BackendCompilerFailed)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or getattr(error, "inner_exception", None) or error.__context__
    return chain


@pytest.mark.parametrize("lr_inside_momentum", [False, True])
@pytest.mark.parametrize("mode", ("foreach", "per_tensor", "fused"))
def test_zero_dim_parameters_keep_their_dtype(mode, lr_inside_momentum):
    """As torch.optim.SGD: a momentum buffer has its parameter's dtype, 0-d parameters (a learnable scale,
    a temperature) included, whatever the dtype of the lr tensor."""
    params = {"scale": torch.nn.Parameter(torch.tensor(0.7, dtype=torch.bfloat16)),
              "temperature": torch.nn.Parameter(torch.tensor(1.3)),
              "weight": torch.nn.Parameter(torch.ones(2, 3, dtype=torch.bfloat16))}
    step = _single_parameter_step(mode, params, torch.tensor(0.1, dtype=torch.float64),
                                  lr_inside_momentum=lr_inside_momentum)
    for _ in range(3):
        for p in params.values():
            p.grad = torch.full_like(p, 0.25)
        step()
    opt_state = step.__self__.state
    for name, p in params.items():
        assert p.dtype == {"temperature": torch.float32}.get(name, torch.bfloat16), name
        buf = opt_state[p]["momentum_buffer"]
        assert buf.dtype == p.dtype and buf.shape == p.shape, (
            f"{name}: {p.dtype} {tuple(p.shape)}, buffer {buf.dtype}"
        )


def test_fused_norms_of_half_precision_weights_are_of_the_stored_weights():
    """The trust ratio of a bfloat16 weight uses ||w|| of the weight as stored (rounded to bfloat16), as the
    eager step does; a norm carried from the update loop must not be the one from before the rounding."""
    gen = torch.Generator().manual_seed(71)
    params = {"weight": torch.nn.Parameter((torch.randn(4, 3, generator=gen) * 0.5).bfloat16())}
    step = _single_parameter_step("fused", params, 0.3, coefficient=0.05, telemetry=True)
    want = []
    for _ in range(4):
        params["weight"].grad = (torch.randn(4, 3, generator=gen) * 0.5).bfloat16()
        want.append(float(torch.linalg.vector_norm(params["weight"].detach().float())))
        step()
    got = [record["w_norm"] for record in step.__self__.telemetry.to_records()]
    assert got == pytest.approx(want, rel=1e-6)


# -- LARS option changes: every mode agrees on which it honours ---------------------------------------


def test_every_mode_agrees_on_which_option_changes_it_honours():
    """An option change is either honoured by every mode (the matrix checks the numbers) or refused by every
    mode with an error that names the attribute; never honoured by one mode and refused by another."""
    outcomes = {}
    for mode in ("foreach", "per_tensor", "fused"):
        case = Case(mode=mode)
        driver = build(case, make_parameters(case))
        for attribute in LARS_ATTRIBUTE_CHANGES:
            driver.change(attribute)
        outcomes[mode] = sorted(driver.refused)
    assert len({tuple(v) for v in outcomes.values()}) == 1, outcomes


# -- the matrix's own guarantees ---------------------------------------------------------------------


def test_covering_arrays_cover_every_valid_pair():
    for cases in (eager_cases("foreach"), compiled_cases("backend")):
        assert all(invalid(c) is None for c in cases)
        rows = [dataclasses.asdict(c) for c in cases]
        skip = {"schedule", "change"} if cases[0].mode in COMPILED_MODES else set()
        for a, b in itertools.combinations([d for d in DIMENSIONS if d != "mode"], 2):
            if {a, b} == skip:
                continue
            for va, vb in itertools.product(DIMENSIONS[a], DIMENSIONS[b]):
                if not any(r[a] == va and r[b] == vb for r in rows):
                    assert not _coverable(cases[0].mode, {a: va, b: vb}), (a, va, b, vb)


def _coverable(mode: str, fixed: dict[str, Any]) -> bool:
    fixed = {"mode": mode, **fixed}
    others = {d: v for d, v in DIMENSIONS.items() if d not in fixed and d not in ("schedule", "change")}
    return any(
        invalid(Case(**fixed, **dict(zip(others, values, strict=True)))) is None
        for values in itertools.product(*others.values())
    )


def test_the_comparison_sees_a_wrong_step():
    """The comparison is not vacuous: a step that ignores the trust ratio (plain SGD) fails it."""
    case = Case(mode="foreach", schedule="cosine")
    run = Run(case)
    run.driver.step = run.driver.sgd.step
    with pytest.raises(AssertionError, match=r"fc1\.weight differs from the float64 reference"):
        run.advance(0)


# -- property test: random shapes, dtypes, scales, options and gradients -------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HUGE = 1e20  # a squared norm of it overflows float32; the float64 reference stays finite


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    scale: float  # of the weights; 0 gives a zero-norm tensor
    use_lars: bool


@dataclass(frozen=True)
class Scenario:
    params: tuple[ParamSpec, ...]
    sgd: dict[str, Any]
    lars: dict[str, Any]
    tensor_lr: bool
    # (lr, per parameter: gradient scale, None: absent)
    steps: tuple[tuple[float, tuple[float | None, ...]], ...]
    seed: int


@st.composite
def scenarios(draw, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), max_steps=3):
    specs = []
    for _ in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(dtypes))
        wide = dtype != torch.float16  # float16 cannot hold HUGE at all
        specs.append(ParamSpec(
            shape=tuple(draw(st.lists(st.integers(0, 4), max_size=3))),
            dtype=dtype,
            scale=draw(st.sampled_from([0.0, 1e-3, 1.0, 1e3] + ([HUGE] if wide else []))),
            use_lars=draw(st.booleans()),
        ))
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    sgd = dict(
        momentum=momentum, nesterov=nesterov,
        dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
        maximize=draw(st.booleans()), weight_decay=draw(st.sampled_from([0.0, 1e-4, 0.1])),
    )
    lars = dict(
        coefficient=draw(st.sampled_from([0.0, 1e-3, 0.02, 1.0])),
        epsilon=draw(st.sampled_from([1e-8, 1e-5, 1.0])),
        use_clip=draw(st.booleans()),
        unit_trust_on_zero_norm=draw(st.booleans()),
        lr_inside_momentum=draw(st.booleans()),
    )
    lr = st.one_of(st.sampled_from([0.0, 1e-3, 0.1, 1.0]), st.floats(1e-4, 2.0))
    grad_scales = [
        st.sampled_from([None, 0.0, 1e-3, 1.0, 1e3] + ([HUGE] if spec.dtype != torch.float16 else []))
        for spec in specs
    ]
    steps = draw(st.lists(st.tuples(lr, st.tuples(*grad_scales)), min_size=1, max_size=max_steps))
    return Scenario(tuple(specs), sgd, lars, draw(st.booleans()), tuple(steps), draw(st.integers(0, 2**16)))


PER_STEP_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _tolerance(dtype: torch.dtype, scale: float) -> float:
    """Relative to the magnitudes combined, with a floor of a few subnormal steps (float16 reaches them)."""
    info = torch.finfo(dtype)
    return PER_STEP_RTOL[dtype] * scale + 4 * info.tiny * info.eps


def _max(t: Tensor | None) -> float:
    return float(t.abs().max()) if t is not None and t.numel() else 0.0


def _update_bound(
    w: Tensor, g: Tensor, use_lars: bool, lr: float, decay: float, options: dict[str, Any]
) -> float:
    """The largest term of the scaled gradient u = coeff * (g + decay * w), whose rounding a step inherits."""
    if not use_lars:
        return _max(g)
    coeff = F.trust_ratio(torch.linalg.vector_norm(w), torch.linalg.vector_norm(g), weight_decay=decay, lr=lr,
                          **{k: v for k, v in options.items() if k != "lr_inside_momentum"})
    return float(coeff) * (_max(g) + decay * _max(w))


def check_scenario(scenario: Scenario, mode: str) -> None:
    """Per step (each step starts from the run's own values): weights and buffers within their dtype's
    rounding of the magnitudes the step combines."""
    gen = torch.Generator().manual_seed(scenario.seed)
    params = {f"p{k}": torch.nn.Parameter((torch.randn(spec.shape, generator=gen, dtype=torch.float64)
                                           * spec.scale).to(spec.dtype))
              for k, spec in enumerate(scenario.params)}
    masks = {f"p{k}": spec.use_lars for k, spec in enumerate(scenario.params)}
    lars_filter = lambda info: masks[info.name]  # noqa: E731
    first_lr = scenario.steps[0][0]
    # A float64 tensor lr: the matrix covers float32 ones (whose products with other numbers round in
    # float32).
    sgd = torch.optim.SGD([{"params": list(params.items())}], lr=torch.tensor(first_lr, dtype=torch.float64)
                          if scenario.tensor_lr else first_lr, **scenario.sgd)
    if mode == "backend":
        torch._dynamo.reset()
        step = torch.compile(
            sgd.step, backend="lars_fx", options={**scenario.lars, "lars_filter": lars_filter}
        )
    else:
        lars = lars_fx.LARS(sgd, **scenario.lars, lars_filter=lars_filter, foreach=mode != "per_tensor",
                            fused=mode == "fused")
        if mode == "compiled_step":
            torch._dynamo.reset()
        step = torch.compile(lars.step) if mode == "compiled_step" else lars.step
    options = LarsOptions(**scenario.lars, lars_filter=lars_filter)
    momentum, dampening, decay = (scenario.sgd[k] for k in ("momentum", "dampening", "weight_decay"))
    oracle = Oracle(params)
    for index, (lr, grad_scales) in enumerate(scenario.steps):
        group = sgd.param_groups[0]
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
        for p, grad_scale in zip(params.values(), grad_scales, strict=True):
            p.grad = None if grad_scale is None else (
                torch.randn(p.shape, generator=gen, dtype=torch.float64) * grad_scale).to(p.dtype)
        grads = {n: p.grad.double() for n, p in params.items() if p.grad is not None}
        before = {n: p.detach().double().clone() for n, p in params.items()}
        buffers_before = {n: oracle.buffers.get(n) for n in params}
        groups = [{**group, "lr": _number(group["lr"])}]
        try:
            step()
        except ValueError as error:  # a documented limit: loud, naming the parameter, nothing moved
            assert any(n in str(error) for n in params), f"the refusal names no parameter: {error}"
            assert all(torch.equal(before[n], p.detach().double()) for n, p in params.items()), (
                "moved, then raised"
            )
            return
        oracle.step(index, groups, grads, options, skip_nonfinite=False)
        overflowed = []
        for name, p in params.items():
            if name not in grads or p.numel() == 0:
                assert torch.equal(p.detach().double(), before[name]), f"{mode}, step {index}: {name} moved"
                continue
            overflows = (
                masks[name] and p.dtype != torch.float64 and _norm_overflows(before[name], grads[name])
            )
            if overflows and not p.isfinite().all():
                # The documented limit: a squared norm past float32's range gives a NaN/inf step (or, where a
                # mode's norm kernel does not overflow, the right one: checked below), never a wrong finite
                # one.
                overflowed.append(name)
                continue
            u = _update_bound(before[name], grads[name], masks[name], lr, decay, scenario.lars)
            velocity = (lr if scenario.lars["lr_inside_momentum"] else 1.0) * u
            buf_scale = momentum * _max(buffers_before[name]) + velocity + _max(oracle.buffers.get(name))
            step_scale = _max(before[name]) + (lr + 1.0) * (u + buf_scale)
            error = (p.detach().double() - oracle.weights[name]).abs().max().item()
            assert error <= _tolerance(p.dtype, step_scale), (
                f"{mode}, step {index}: {name} ({p.dtype}, {tuple(p.shape)}) is off by {error:.3g}, more "
                f"than {PER_STEP_RTOL[p.dtype]} x {step_scale:.3g} (the magnitudes this step combines)"
            )
            buf = sgd.state.get(p, {}).get("momentum_buffer")
            if name in oracle.buffers and momentum != 0:
                assert buf is not None, f"{mode}, step {index}: {name} has no momentum buffer"
                assert buf.dtype == p.dtype, (
                    f"{mode}: the momentum buffer of {name} ({p.dtype}) is {buf.dtype}"
                )
                error = (buf.double() - oracle.buffers[name]).abs().max().item()
                assert error <= _tolerance(p.dtype, buf_scale), (
                    f"{mode}, step {index}: the momentum buffer of {name} is off by {error:.3g}, more than "
                    f"{PER_STEP_RTOL[p.dtype]} x {buf_scale:.3g}"
                )
            oracle.reanchor(name, sgd)  # steps are checked one at a time: rounding does not accumulate
        if overflowed:
            return  # from here the run is NaN by design, and its reference finite


def _norm_overflows(*tensors: Tensor) -> bool:
    """A squared norm past float32's range, where lars-fx computes the norms of non-float64 tensors."""
    limit = torch.finfo(torch.float32).max
    return any(torch.linalg.vector_norm(t.double()).item() ** 2 > limit for t in tensors)


PROPERTY_SETTINGS = dict(derandomize=True, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("mode", EAGER_MODES)
@settings(max_examples=150, **PROPERTY_SETTINGS)
@given(scenario=scenarios())
def test_property_eager(mode, scenario):
    check_scenario(scenario, mode)


@pytest.mark.parametrize("mode", COMPILED_MODES)
@settings(max_examples=3, **PROPERTY_SETTINGS)
@given(scenario=scenarios(dtypes=(torch.float32, torch.float64), max_steps=2))
def test_property_compiled(mode, scenario):
    check_scenario(scenario, mode)
