"""``LARS(flat=True)``: the flat parameter layout (``lars_fx.flat_layout``) and its step, against the float64
per-tensor reference.

Most tests drive a ``Twin``: a model stepped by ``LARS(..., flat=True)`` and a float64 copy of it stepped by
``LARS(..., foreach=False)`` (the oracle), fed the same fresh random gradients, with the same options, groups,
schedulers and mid-run changes; after every step the weights and momentum buffers of the two are compared.
Others check what only the layout has: parameters that became views of its buffers, gradients that are not
(and the copies and warning they cost), rebuilt layouts, refusals, and ``lars_fx.functional.flat``'s pieces.

The ``fused`` variants run ``LARS(flat=True, fused=True)`` (an Inductor compile each: 10-30 s on a CPU).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import pickle
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import dist_flat_workers
import dist_workers
import lars_fx
from dist_harness import run_on_ranks
from lars_fx import functional as F
from lars_fx.flat_layout import GRAD_COPY_WARNING
from lars_fx.functional.flat import chunk_layout, lars_sgd_flat, per_chunk, segment_squared_norms

STEPS = 10
COEFFICIENT = 0.05  # larger than the default, so that a wrong trust ratio moves the weights visibly
BASE_GROUPS = ({"lr": 0.3, "weight_decay": 1e-2}, {"lr": 0.1, "weight_decay": 1e-3})
# per step, no re-anchoring: float32 rounding grown over the run; bf16 is compared with the non-flat step
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-6)}
COPY_WARNING_START = GRAD_COPY_WARNING.split("{")[0]
FUSED = pytest.param(True, id="fused")
EAGER = pytest.param(False, id="eager")

ignore_copy_warning = pytest.mark.filterwarnings("ignore:LARS\\(flat=True\\) found gradients")


# -- the model and the twin runs -----------------------------------------------------------------------------


class Net(nn.Module):
    """Four LARS weights (``wide`` spans several chunks of its bucket, ``zero`` starts at norm 0), and biases
    and a LayerNorm, which the default filter leaves out of LARS."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(5, 7)
        self.LayerNorm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)
        self.wide = nn.Linear(37, 30, bias=False)
        self.zero = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.LayerNorm.bias.uniform_(-0.5, 0.5)
            self.zero.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.LayerNorm(torch.tanh(self.fc1(x)))
        return self.fc2(hidden) + self.wide.weight.tanh().mean() + self.zero.weight.sum()


def group_of(name: str) -> int:
    return 0 if name.startswith(("fc1.", "LayerNorm.")) else 1


def param_groups(
    model: nn.Module, options: tuple[dict[str, Any], ...] = ({}, {}), tensor_lr: bool = False
) -> list[dict[str, Any]]:
    """Two groups (fc1 and the LayerNorm; the rest) with their own lr and weight decay, and ``options``."""
    groups: list[dict[str, Any]] = [
        {"params": [], **base, **extra} for base, extra in zip(BASE_GROUPS, options, strict=True)
    ]
    for name, p in model.named_parameters():
        groups[group_of(name)]["params"].append((name, p))
    if tensor_lr:
        for group in groups:
            group["lr"] = torch.tensor(group["lr"])  # float32, as users make them
    return groups


def gradients(model: nn.Module, seed: int, step: int, absent: Iterable[str] = ()) -> dict[str, Tensor | None]:
    """Fresh float64 gradients of every trainable parameter (None for those named in ``absent``)."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads: dict[str, Tensor | None] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5
            grads[name] = None if name in absent else g
    return grads


def put_gradient(p: Tensor, g: Tensor | None) -> None:
    """As ``opt.zero_grad()`` and backward leave it: written into the existing gradient (the flat view), else
    a new tensor."""
    if g is None:
        p.grad = None
    elif p.grad is None:
        p.grad = g.to(p.dtype)
    else:
        p.grad.copy_(g)


def close(got: Tensor, want: Tensor, what: str, **tolerance: float) -> None:
    tolerance = tolerance or TOLERANCES[got.dtype]
    torch.testing.assert_close(got.detach().double(), want.detach().double(), **tolerance,
                               msg=lambda message: f"{what}: {message}")


Edit = Callable[[int, dict[str, Tensor | None]], None]


class Twin:
    """``model`` stepped by ``LARS(flat=True)`` (``flat=False``: a non-flat step) and a float64 copy
    stepped by the per-tensor reference, with the same groups, options and gradients."""

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        seed: int = 0,
        sgd: dict[str, Any] | None = None,
        groups: tuple[dict[str, Any], ...] = ({}, {}),
        tensor_lr: bool = False,
        flat: bool = True,
        fused: bool = False,
        foreach: bool = True,
        **lars_options: Any,
    ) -> None:
        self.seed = seed
        self.model = model if model is not None else Net(seed)
        self.reference_model = copy.deepcopy(self.model).double()
        sgd = {"lr": 0.1, "momentum": 0.9, **(sgd or {})}
        lars_options = {"coefficient": COEFFICIENT, **lars_options}
        self.opt = lars_fx.LARS(
            torch.optim.SGD(param_groups(self.model, groups, tensor_lr), **sgd), flat=flat, fused=fused,
            foreach=foreach, **lars_options,
        )
        self.reference = lars_fx.LARS(
            torch.optim.SGD(param_groups(self.reference_model, groups, tensor_lr), **sgd), foreach=False,
            **lars_options,
        )
        self.schedulers: list[Any] = []
        self.tolerance: dict[str, float] = {}  # by the model's dtype unless set
        self.assign_gradients = False  # put new gradient tensors, as `p.grad = t` does

    def both(self, change: Callable[[lars_fx.LARS], Any]) -> None:
        """The same change to both optimizers (an option, a group's hyperparameter, ...)."""
        change(self.opt)
        change(self.reference)

    def schedule(self, make: Callable[[torch.optim.Optimizer], Any]) -> None:
        self.schedulers = [make(self.opt), make(self.reference)]

    def put(self, grads: dict[str, Tensor | None]) -> None:
        """Into the flat run's gradients in place (``assign_gradients``: new tensors), and the reference's."""
        parameters = dict(self.model.named_parameters())
        for name, q in self.reference_model.named_parameters():
            if name not in grads:
                continue
            g = grads[name]
            if self.assign_gradients and g is not None:
                parameters[name].grad = g.to(parameters[name].dtype)
            else:
                put_gradient(parameters[name], g)
            q.grad = None if g is None else g.clone()

    def step(self, step: int, absent: Iterable[str] = (), edit: Edit | None = None) -> None:
        grads = gradients(self.model, self.seed, step, absent)
        if edit is not None:
            edit(step, grads)
        self.put(grads)
        self.opt.step()
        self.reference.step()
        for scheduler in self.schedulers:
            scheduler.step()
        self.check(f"after step {step}")

    def run(self, steps: Iterable[int], before: Callable[[int], Any] | None = None,
            absent: Callable[[int], Iterable[str]] = lambda step: (), edit: Edit | None = None) -> None:
        """``before(step)`` (changes mid-run), then the step with ``absent(step)`` gradients missing and the
        rest edited by ``edit(step, grads)``."""
        for step in steps:
            if before is not None:
                before(step)
            self.step(step, absent(step), edit)

    def check(self, when: str) -> None:
        references = dict(self.reference_model.named_parameters())
        for name, p in self.model.named_parameters():
            q = references[name]
            close(p, q, f"{when}, {name}", **self.tolerance)
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            want = self.reference.state.get(q, {}).get("momentum_buffer")
            assert (buf is None) == (want is None), f"{when}: momentum buffer of {name}: {buf} vs {want}"
            if want is not None:
                close(buf, want, f"{when}, momentum buffer of {name}", **self.tolerance)


def assert_views(opt: lars_fx.LARS) -> None:
    """Every parameter of the layout is a view of its bucket's weights, its gradient its gradient view, its
    momentum buffer (when it has one) its momentum view: the step ran on the buffers."""
    layout = opt.flat_layout
    assert layout is not None
    for bucket in layout.buckets:
        for k, p in enumerate(bucket.params):
            assert p.data_ptr() == bucket.weight_views[k].data_ptr(), f"parameter {k} is not its view"
            assert p.grad is bucket.grad_views[k], f"the gradient of parameter {k} is not its view"
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                assert bucket.momentum is not None and buf is bucket.momentum_views[k], (
                    f"the momentum buffer of parameter {k} is not its view"
                )


def bucket_names(opt: lars_fx.LARS) -> list[tuple[int, bool, torch.dtype, list[str]]]:
    layout = opt.flat_layout
    assert layout is not None
    return [
        (b.group_index, b.use_lars, b.weights.dtype,
         [opt.param_groups[b.group_index]["param_names"][i] for i in b.indices])
        for b in layout.buckets
    ]


def assert_compiled_if_fused(opt: lars_fx.LARS) -> None:
    """With ``fused=True``: the flat steps ran a compiled graph (did not all fall back to the eager step)."""
    if opt.fused:
        assert opt.fused_step is not None and opt.fused_step.compile_count > 0, "no graph was compiled"
        assert opt.fused_step.fallback is None, opt.fused_step.fallback


@pytest.fixture
def whole_buckets(monkeypatch) -> list[int]:
    """How many buckets each eager step stepped whole (``functional.lars_sgd_flat`` calls), step by step:
    ``counts[-1]`` grows while a step runs; the test appends 0 before each step."""
    counts: list[int] = [0]
    original = F.lars_sgd_flat

    def counting(*args: Any, **kwargs: Any) -> Any:
        counts[-1] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "lars_sgd_flat", counting)
    return counts


# -- every option, against the float64 reference -------------------------------------------------------------


def changing_lr(twin: Twin) -> Callable[[int], None]:
    """A new float lr before every step (clip and the paper's momentum read it)."""
    def set_lrs(step: int) -> None:
        def change(opt: lars_fx.LARS) -> None:
            for group, base in zip(opt.param_groups, BASE_GROUPS, strict=True):
                group["lr"] = base["lr"] * (1 - 0.07 * step)
        twin.both(change)
    return set_lrs


OPTION_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "coefficient_epsilon": dict(coefficient=0.3, epsilon=0.05),
    "use_clip_lr_changes": dict(use_clip=True, lr_changes=True),
    "unit_trust_on_zero_norm": dict(unit_trust_on_zero_norm=True),
    "lr_inside_momentum_lr_changes": dict(lr_inside_momentum=True, lr_changes=True),
    "momentum_0": dict(sgd=dict(momentum=0.0)),
    "dampening": dict(sgd=dict(dampening=0.3)),
    "nesterov": dict(sgd=dict(nesterov=True)),
    "maximize": dict(sgd=dict(maximize=True)),
    "weight_decay_0": dict(groups=({"weight_decay": 0.0}, {"weight_decay": 0.0})),
    "groups_differ": dict(groups=(dict(momentum=0.0, maximize=True, lr=0.05),
                                  dict(nesterov=True, weight_decay=0.0, lr=0.2))),
    "groups_differ_dampening": dict(groups=(dict(dampening=0.5), dict(momentum=0.5, weight_decay=0.1)),
                                    use_clip=True),
    "float64": dict(dtype=torch.float64),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_every_option_matches_the_float64_reference(case):
    options = dict(OPTION_CASES[case])
    lr_changes = options.pop("lr_changes", False)
    dtype = options.pop("dtype", torch.float32)
    seed = list(OPTION_CASES).index(case)
    twin = Twin(Net(seed).to(dtype), seed=seed, **options)
    twin.run(range(STEPS), before=changing_lr(twin) if lr_changes else None)
    assert_views(twin.opt)
    assert twin.opt.flat_layout.grad_copies == 0


def test_buckets_per_group_dtype_and_lars():
    model = Net()
    model.fc2.to(torch.float64)
    opt = Twin(model).opt
    assert bucket_names(opt) == [
        (0, True, torch.float32, ["fc1.weight"]),
        (0, False, torch.float32, ["fc1.bias", "LayerNorm.weight", "LayerNorm.bias"]),
        (1, True, torch.float64, ["fc2.weight"]),
        (1, False, torch.float64, ["fc2.bias"]),
        (1, True, torch.float32, ["wide.weight", "zero.weight"]),
    ]
    wide = opt.flat_layout.buckets[-1]
    assert wide.weights.shape == (wide.layout.chunks, wide.layout.chunk_size)
    assert wide.layout.chunks > 2, "wide.weight should span several chunks of its bucket"


def bf16_ulp(t: Tensor) -> float:
    """One bf16 unit in the last place at ``t``'s largest magnitude (8 significant bits)."""
    largest = float(t.detach().double().abs().max())
    return 2.0 ** (math.floor(math.log2(largest)) - 7) if largest > 0 else 0.0


def test_bf16_parameters_step_as_the_non_flat_bf16_step():
    """bf16 buckets (norms in float32) against the non-flat per-tensor bf16 step (the defined behaviour),
    each step from the same values: within one bf16 rounding of the largest element; the float32 parameters
    of the same runs alike to float32 rounding."""
    def mixed() -> Net:
        model = Net(seed=3)
        model.fc1.to(torch.bfloat16)
        model.wide.to(torch.bfloat16)
        return model

    flat = Twin(mixed(), seed=3, telemetry=True)
    plain = Twin(mixed(), seed=3, flat=False, foreach=False, telemetry=True)
    flat_params, plain_params = dict(flat.model.named_parameters()), dict(plain.model.named_parameters())
    for step in range(STEPS):
        grads = gradients(flat.model, flat.seed, step)
        for twin in (flat, plain):
            twin.put(grads)
            twin.opt.step()
        for name, p in flat_params.items():
            q = plain_params[name]
            buf, plain_buf = flat.opt.state[p]["momentum_buffer"], plain.opt.state[q]["momentum_buffer"]
            if p.dtype == torch.bfloat16:
                close(p, q, f"step {step}, {name}", rtol=0, atol=bf16_ulp(q))
                close(buf, plain_buf, f"step {step}, momentum buffer of {name}", rtol=0,
                      atol=bf16_ulp(plain_buf))
                with torch.no_grad():
                    q.copy_(p)
                    plain_buf.copy_(buf)
            else:
                close(p, q, f"step {step}, {name}", rtol=1e-6, atol=1e-7)
    assert_views(flat.opt)
    assert len([b for b in flat.opt.flat_layout.buckets if b.weights.dtype == torch.bfloat16]) == 3
    # each step starts from the same values: norms summed in float32 agree to float32 rounding (in bf16 they
    # would be ~1e-3 apart)
    got, want = flat.opt.telemetry.to_records(), plain.opt.telemetry.to_records()
    assert [(r["step"], r["param"]) for r in got] == [(r["step"], r["param"]) for r in want]
    for a, b in zip(got, want, strict=True):
        for field in ("w_norm", "g_norm", "trust_ratio"):
            assert a[field] == pytest.approx(b[field], rel=1e-5), (a, b)


def test_skip_nonfinite_skips_the_whole_step():
    def poison(step: int, grads: dict[str, Tensor | None]) -> None:
        if step == 4:
            grads["wide.weight"][3, 5] = math.inf  # type: ignore[index]

    twin = Twin(skip_nonfinite=True)
    twin.run(range(STEPS), edit=poison)
    assert twin.opt.skipped_steps == twin.reference.skipped_steps == 1


@pytest.mark.parametrize("fused", [EAGER, FUSED])
@ignore_copy_warning
def test_telemetry_equals_the_non_flat_telemetry(fused):
    """Also on steps where a parameter has no gradient, so that its bucket (fc2.weight and zero.weight,
    float64) steps per tensor while the other LARS bucket of its group (wide.weight, float32) steps whole."""
    def model() -> Net:
        net = Net(seed=5)
        for p in (net.fc2.weight, net.zero.weight):
            p.data = p.data.double()
        return net

    absent = lambda step: ("zero.weight",) if step % 3 == 1 else ()  # noqa: E731
    flat = Twin(model(), seed=5, telemetry=True, fused=fused)
    plain = Twin(model(), seed=5, telemetry=True, flat=False)
    for twin in (flat, plain):
        twin.run(range(STEPS), absent=absent)
    got, want = flat.opt.telemetry.to_records(), plain.opt.telemetry.to_records()
    assert [(r["step"], r["group"], r["param"]) for r in got] == [
        (r["step"], r["group"], r["param"]) for r in want
    ]
    for a, b in zip(got, want, strict=True):
        for field in ("w_norm", "g_norm", "trust_ratio"):
            assert a[field] == pytest.approx(b[field], rel=1e-5, abs=1e-8), (a, b)
    assert_compiled_if_fused(flat.opt)


# -- schedulers and changes mid-run --------------------------------------------------------------------------

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[0.5, 0.2], total_steps=STEPS + 1),  # cycles momentum too
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=0.005),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_schedulers(scheduler, tensor_lr):
    twin = Twin(tensor_lr=tensor_lr, use_clip=scheduler == "cosine")
    lr = twin.opt.param_groups[0]["lr"]
    twin.schedule(SCHEDULERS[scheduler])
    twin.run(range(STEPS))
    assert twin.opt.param_groups[0]["lr"] is lr or not tensor_lr, "the scheduler replaced the tensor lr"
    assert_views(twin.opt)


def test_coefficient_and_filter_changed_mid_run_rebucket():
    twin = Twin()
    before = bucket_names(twin.opt)
    everything_but_fc2 = lambda info: info.name != "fc2.weight"  # noqa: E731

    def change(step: int) -> None:
        if step == 3:
            twin.both(lambda opt: setattr(opt, "coefficient", 0.2))
        if step == 6:
            twin.both(lambda opt: setattr(opt, "lars_filter", everything_but_fc2))
            after = bucket_names(twin.opt)
            assert after != before
            assert (1, False, torch.float32, ["fc2.weight"]) in after

    twin.run(range(STEPS), before=change)
    assert_views(twin.opt)


def test_group_hyperparameters_changed_mid_run():
    """Momentum off (buffers kept, as torch's SGD keeps them), then on again; weight decay and dampening."""
    twin = Twin(seed=12)
    changes = {3: dict(momentum=0.0, weight_decay=3e-2), 6: dict(momentum=0.6, dampening=0.3)}

    def change(step: int) -> None:
        def set_groups(opt: lars_fx.LARS) -> None:
            for group in opt.param_groups:
                group.update(changes[step])

        if step in changes:
            twin.both(set_groups)

    twin.run(range(STEPS), before=change)
    assert_views(twin.opt)


def test_momentum_switched_on_mid_run_makes_the_buffers_then():
    twin = Twin(seed=13, sgd=dict(momentum=0.0))

    def change(step: int) -> None:
        if step == 4:
            twin.both(lambda opt: opt.param_groups[1].update(momentum=0.9))

    twin.run(range(STEPS), before=change)
    assert all(b.momentum is None for b in twin.opt.flat_layout.buckets if b.group_index == 0)
    assert all(b.momentum is not None for b in twin.opt.flat_layout.buckets if b.group_index == 1)
    assert_views(twin.opt)


def test_flat_switched_off_and_on_mid_run():
    twin = Twin()

    def switch(step: int) -> None:
        if step in (3, 6):
            twin.opt.flat = step == 6
            assert (twin.opt.flat_layout is None) == (step == 3)

    twin.run(range(STEPS), before=switch)
    assert_views(twin.opt)


@pytest.mark.parametrize("how", ["add_param_group", "appended_to_a_group"])
def test_parameters_added_mid_run(how):
    twin = Twin()
    new = {model: nn.Linear(6, 4) for model in (twin.model, twin.reference_model)}
    new[twin.reference_model].load_state_dict(new[twin.model].state_dict())
    new[twin.reference_model].double()

    def add(step: int) -> None:
        if step != 4:
            return
        for model, opt in ((twin.model, twin.opt), (twin.reference_model, twin.reference)):
            model.head = new[model]
            named = list(model.head.named_parameters(prefix="head"))
            if how == "add_param_group":
                opt.add_param_group({"params": named, "lr": 0.2, "momentum": 0.5})
            else:
                group = opt.param_groups[1]
                group["params"] += [p for _, p in named]
                group["param_names"] += [n for n, _ in named]

    twin.run(range(STEPS), before=add)
    assert any("head.weight" in names for *_, names in bucket_names(twin.opt))
    assert_views(twin.opt)


# -- copies and state dicts ----------------------------------------------------------------------------------


def step_in_place(model: nn.Module, opt: torch.optim.Optimizer, seed: int, steps: Iterable[int]) -> None:
    """``Twin``'s gradients of ``steps`` for another model and optimizer, written in place."""
    for step in steps:
        grads = gradients(model, seed, step)
        for name, p in model.named_parameters():
            put_gradient(p, grads[name])
        opt.step()


@pytest.mark.parametrize("fused", [EAGER, FUSED])
@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_a_copy_steps_like_the_original(copier, fused):
    twin = Twin(fused=fused)
    twin.run(range(3))
    original = (twin.model, twin.opt)
    model, opt = copy.deepcopy(original) if copier == "deepcopy" else pickle.loads(pickle.dumps(original))
    assert opt.flat and opt.flat_layout is not None
    assert bucket_names(opt) == bucket_names(twin.opt)
    ours = {p.data_ptr() for b in twin.opt.flat_layout.buckets for p in b.params}
    assert not ours & {p.data_ptr() for p in model.parameters()}, "the copy shares the original's buffers"
    for step in range(3, STEPS):
        twin.step(step)
        step_in_place(model, opt, twin.seed, [step])
        for (name, p), q in zip(model.named_parameters(), twin.model.parameters(), strict=True):
            assert torch.equal(p, q), f"step {step}, {name}"
            assert torch.equal(opt.state[p]["momentum_buffer"], twin.opt.state[q]["momentum_buffer"]), name
    assert_views(opt)


def through_bytes(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_is_the_non_flat_state_dict():
    """Per-parameter momentum buffers shaped as their parameters, the same groups: what a non-flat LARS over
    the same run saves."""
    flat, plain = Twin(seed=1), Twin(seed=1, flat=False)
    for twin in (flat, plain):
        twin.run(range(3))
    got, want = flat.opt.state_dict(), plain.opt.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for index, state in want["state"].items():
        assert got["state"][index].keys() == state.keys()
        buf = got["state"][index]["momentum_buffer"]
        assert buf.shape == state["momentum_buffer"].shape and buf.dtype == state["momentum_buffer"].dtype
        close(buf, state["momentum_buffer"], f"momentum buffer {index}", rtol=1e-5, atol=1e-6)


def test_state_dict_round_trips_flat_non_flat_flat_sgd():
    """One run through four optimizers (flat, non-flat, flat, then a plain SGD's state loaded into a flat
    one), each resuming from the last one's state dict: the float64 reference's run throughout."""
    twin = Twin(seed=2)
    twin.run(range(3))
    model, opt = twin.model, twin.opt
    flat, non_flat = dict(flat=True), dict(flat=False)
    stages = [("non-flat", non_flat), ("flat", flat), ("sgd", None), ("flat again", flat)]
    step = 3
    for what, lars_options in stages:
        saved = through_bytes(opt.state_dict())
        assert saved["param_groups"][1]["param_names"] == [n for n, _ in param_groups(model)[1]["params"]]
        for index, (name, p) in enumerate((n, p) for g in param_groups(model) for n, p in g["params"]):
            buf = saved["state"][index]["momentum_buffer"]
            assert buf.shape == p.shape, f"{what}: the saved momentum buffer of {name} is not shaped as it"
        next_model = Net(seed=99)
        next_model.load_state_dict(model.state_dict())
        sgd = torch.optim.SGD(param_groups(next_model), lr=0.1, momentum=0.9)
        if lars_options is None:
            sgd.load_state_dict(saved)
            for index, p in enumerate(q for g in sgd.param_groups for q in g["params"]):
                assert torch.equal(sgd.state[p]["momentum_buffer"], saved["state"][index]["momentum_buffer"])
            opt, model = sgd, next_model
            continue
        next_opt = lars_fx.LARS(sgd, coefficient=COEFFICIENT, **lars_options)
        next_opt.load_state_dict(saved)
        assert (next_opt.flat_layout is not None) == lars_options["flat"]
        model, opt = next_model, next_opt
        for _ in range(2):
            step_in_place(model, opt, twin.seed, [step])
            step_in_place(twin.reference_model, twin.reference, twin.seed, [step])
            references = dict(twin.reference_model.named_parameters())
            for name, p in model.named_parameters():
                close(p, references[name], f"{what}, step {step}, {name}")
                want = twin.reference.state[references[name]]["momentum_buffer"]
                got = opt.state[p]["momentum_buffer"]
                close(got, want, f"{what}, step {step}, momentum buffer of {name}")
            step += 1
    assert_views(opt)


@pytest.mark.parametrize("fused", [EAGER, FUSED])
def test_state_dict_resumes_a_flat_run_exactly(fused):
    twin = Twin(seed=4, fused=fused)
    twin.run(range(4))
    model = Net(seed=8)
    model.load_state_dict(twin.model.state_dict())
    opt = lars_fx.LARS(torch.optim.SGD(param_groups(model), lr=0.5, momentum=0.1), coefficient=COEFFICIENT,
                       flat=True, fused=fused)
    opt.load_state_dict(through_bytes(twin.opt.state_dict()))
    for step in range(4, STEPS):
        twin.step(step)  # checked against the float64 reference
        step_in_place(model, opt, twin.seed, [step])
        for (name, p), q in zip(model.named_parameters(), twin.model.parameters(), strict=True):
            if fused:  # the resumed graph sums its first ||w||^2 afresh, the twin carries it: rounding apart
                close(p, q, f"step {step}, {name}", rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(p, q), f"step {step}, {name}"
    assert_views(opt)


# -- identity: the same Parameter objects, now views ---------------------------------------------------------


def test_parameters_stay_the_same_objects_as_views_and_zero_grad_keeps_the_views():
    model = Net()
    before = dict(model.named_parameters())
    opt = lars_fx.LARS(torch.optim.SGD(param_groups(model), lr=0.1, momentum=0.9), flat=True)
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in before.items()}
    layout = opt.flat_layout
    for bucket in layout.buckets:
        for p, view in zip(bucket.params, bucket.weight_views, strict=True):
            assert isinstance(p, nn.Parameter) and p.requires_grad
            assert p.data_ptr() == view.data_ptr() and p.shape == view.shape
            assert p.untyped_storage().data_ptr() == bucket.weights.untyped_storage().data_ptr()
    for step in range(3):
        x = torch.randn(4, 5)
        model(x).square().mean().backward()
        for bucket in layout.buckets:
            for k, p in enumerate(bucket.params):
                if step > 0:
                    assert p.grad is bucket.grad_views[k], "backward did not accumulate into the view"
        opt.step()
        assert_views(opt)
        assert any(bool(b.grads.ne(0).any()) for b in layout.buckets)
        opt.zero_grad()
        for bucket in layout.buckets:
            assert not bool(bucket.grads.any())
            for k, p in enumerate(bucket.params):
                assert p.grad is bucket.grad_views[k]
    assert layout.grad_copies == 0


# -- gradients that are not views ----------------------------------------------------------------------------


def batch(step: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    return (torch.randn(6, 5, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(6, 3, generator=gen, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("fused", [EAGER, FUSED])
def test_model_zero_grad_between_steps_copies_counts_and_warns_once(fused):
    twin = Twin(fused=fused)
    layout = twin.opt.flat_layout
    trainable = sum(len(b.params) for b in layout.buckets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            for model, dtype in ((twin.model, torch.float32), (twin.reference_model, torch.float64)):
                model.zero_grad()  # set_to_none: backward makes new gradients
                x, y = batch(step, dtype)
                nn.functional.mse_loss(model(x), y).backward()
            twin.opt.step()
            twin.reference.step()
            twin.check(f"after step {step}")
    copies = [w for w in caught if str(w.message).startswith(COPY_WARNING_START)]
    assert len(copies) == 1, [str(w.message)[:80] for w in caught]
    assert "model.zero_grad()" in str(copies[0].message)
    # the first step's gradients are copied in for free (the layout had none yet); each later step copies all
    assert twin.opt.flat_layout.grad_copies == trainable * (STEPS - 1)
    assert_views(twin.opt)
    assert_compiled_if_fused(twin.opt)


@ignore_copy_warning
def test_assigned_gradients_are_copied_in_exactly():
    twin = Twin(seed=6)
    twin.assign_gradients = True
    twin.run(range(STEPS))
    layout = twin.opt.flat_layout
    assert layout.grad_copies == sum(len(b.params) for b in layout.buckets) * (STEPS - 1)
    assert_views(twin.opt)


@pytest.fixture(scope="module")
def ddp_results():
    return run_on_ranks(dist_flat_workers.ddp_flat_job, 2, STEPS, bound_s=300)


@functools.cache
def ddp_reference() -> list[dict[str, Tensor]]:
    """The single-process full-batch float64 run of the per-tensor reference (dist_workers' model, data)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")
        return dist_workers.reference_trajectory("net", dist_flat_workers.VARIANT, range(STEPS))


@pytest.mark.parametrize("config", dist_flat_workers.DDP_CONFIGS)
def test_ddp_matches_the_full_batch_reference(ddp_results, config):
    """2 ranks on gloo, each on half of the batch: DDP's averaged gradients copied back into the flat views
    (default: no copies by LARS), or bucket views that LARS copies in (one warning), the float64 reference's
    numbers either way."""
    expected = ddp_reference()
    for rank, results in enumerate(ddp_results):
        result = results[config]
        assert "error" not in result, result.get("error")
        for step, (got, want) in enumerate(zip(result["trajectory"], expected, strict=True)):
            for name in want:
                close(got[name], want[name], f"{config}, rank {rank}, step {step}, {name}",
                      rtol=1e-10, atol=1e-12)
        assert result["views"], f"{config}, rank {rank}: parameters are no longer views of the buffers"
        if config == "ddp":
            assert result["grad_copies"] == 0 and result["copy_warnings"] == 0, result
        else:
            assert result["grad_copies"] > 0 and result["copy_warnings"] == 1, result


# -- parameters that do not step as the others ---------------------------------------------------------------


@ignore_copy_warning
def test_a_parameter_without_gradient_steps_its_bucket_per_tensor(whole_buckets):
    twin = Twin(seed=7)
    absent = lambda step: ("wide.weight",) if step in (0, 4, 5) else ()  # noqa: E731
    per_step = []
    for step in range(STEPS):
        whole_buckets.append(0)
        twin.step(step, absent(step))
        per_step.append(whole_buckets[-1])
    # wide.weight's bucket (with zero.weight) steps per tensor while wide.weight has no gradient, and once
    # more when it has one again but no momentum buffer yet; whole again from then on
    whole = len(twin.opt.flat_layout.buckets)
    assert per_step == [whole - 1, whole - 1, whole, whole, whole - 1, whole - 1, whole, whole, whole, whole]
    assert_views(twin.opt)


def test_frozen_parameters_stay_out_and_do_not_move():
    model = Net()
    model.LayerNorm.weight.requires_grad_(False)
    model.fc2.weight.requires_grad_(False)
    frozen = {"LayerNorm.weight": model.LayerNorm.weight, "fc2.weight": model.fc2.weight}
    kept = {name: (p.data_ptr(), p.detach().clone()) for name, p in frozen.items()}
    twin = Twin(model)
    twin.run(range(STEPS))
    in_buckets = {name for *_, names in bucket_names(twin.opt) for name in names}
    assert not in_buckets & set(frozen)
    for name, p in frozen.items():
        assert p.data_ptr() == kept[name][0] and torch.equal(p, kept[name][1]), name
    assert_views(twin.opt)


@pytest.mark.parametrize("when", [0, 3])
def test_model_to_float64_after_building_rebuilds_the_layout(when):
    twin = Twin(seed=9)
    if when > 0:  # float32 steps first
        twin.tolerance = TOLERANCES[torch.float32]

    def convert(step: int) -> None:
        if step == when:
            twin.model.to(torch.float64)

    twin.run(range(STEPS), before=convert)
    assert {b.weights.dtype for b in twin.opt.flat_layout.buckets} == {torch.float64}
    assert all(buf.dtype == torch.float64 for buf in (s["momentum_buffer"] for s in twin.opt.state.values()))
    assert_views(twin.opt)
    if when == 0:  # float64 from the first step: float64 rounding
        for p, q in zip(twin.model.parameters(), twin.reference_model.parameters(), strict=True):
            close(p, q, "float64 run", rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fused", [EAGER, FUSED])
def test_zero_size_parameters(fused):
    """They stay out of the buffers (and, fused, do not keep the others' step from running compiled)."""
    model = Net()
    model.empty = nn.Module()
    model.empty.weight = nn.Parameter(torch.zeros(3, 0))
    model.empty.bias = nn.Parameter(torch.randn(3))
    model.register_parameter("void", nn.Parameter(torch.zeros(0)))
    twin = Twin(model, fused=fused)
    twin.run(range(STEPS))
    in_buckets = {name for *_, names in bucket_names(twin.opt) for name in names}
    assert "empty.bias" in in_buckets and not {"empty.weight", "void"} & in_buckets
    assert_views(twin.opt)
    assert_compiled_if_fused(twin.opt)


# -- refusals ------------------------------------------------------------------------------------------------


@pytest.fixture
def single_rank_mesh(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_a_dtensor_parameter_is_refused(single_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    sharded = nn.Parameter(distribute_tensor(torch.randn(4, 3), single_rank_mesh, [Shard(0)]))
    plain = nn.Parameter(torch.randn(3))
    sgd = torch.optim.SGD([("plain.weight", plain), ("sharded.weight", sharded)], lr=0.1)
    with pytest.raises(ValueError, match=r"(?s)sharded\.weight.*flat=False"):
        lars_fx.LARS(sgd, flat=True)


def _autograd_view(base: Tensor) -> Tensor:
    return base[2:5].requires_grad_()


def _parameter_over_a_slice(base: Tensor) -> Tensor:
    return nn.Parameter(base[2:5])


@pytest.mark.parametrize("make_view", [_autograd_view, _parameter_over_a_slice])
def test_a_parameter_that_is_a_view_of_another_tensor_is_refused(make_view):
    base = torch.randn(10, 4)
    view = make_view(base)
    sgd = torch.optim.SGD([("other.weight", nn.Parameter(torch.randn(3))), ("tied.weight", view)], lr=0.1)
    with pytest.raises(ValueError, match=r"(?s)tied\.weight.*flat=False"):
        lars_fx.LARS(sgd, flat=True)
    with torch.no_grad():
        base[2:5] = 7.0
    assert bool((view == 7.0).all()), "the refused parameter was cut off from the tensor it views"


def test_sparse_gradients_are_refused_naming_the_parameter():
    model = nn.Sequential()
    model.embedding = nn.Embedding(10, 3, sparse=True)
    model.fc = nn.Linear(3, 2)
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), flat=True)
    model.fc(model.embedding(torch.tensor([1, 4]))).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"(?s)sparse.*embedding\.weight"):
        opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b), "moved, then raised"


def test_flat_over_adam_is_refused():
    model = Net()
    with pytest.raises(ValueError, match=r"flat=True needs torch\.optim\.SGD.*Adam.*flat=False"):
        lars_fx.LARS(torch.optim.Adam(model.named_parameters(), lr=1e-3), flat=True)
    opt = lars_fx.LARS(torch.optim.Adam(model.named_parameters(), lr=1e-3))
    with pytest.raises(ValueError, match=r"flat=True needs torch\.optim\.SGD"):
        opt.flat = True
    assert not opt.flat and opt.flat_layout is None, "a refused flat=True stayed set"


# -- the busiest run, eager and fused ------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [EAGER, FUSED])
@ignore_copy_warning
def test_busiest_run(fused):
    """Two groups with different SGD options, a tensor lr under OneCycleLR (momentum cycled too), a zero-norm
    weight, a parameter without gradient on some steps, coefficient and clip changed mid-run: against the
    float64 reference."""
    model = Net(seed=11)
    twin = Twin(model, seed=11, tensor_lr=True, fused=fused,
                groups=(dict(nesterov=True), dict(dampening=0.2, weight_decay=5e-3)))
    twin.schedule(SCHEDULERS["onecycle"])

    def change(step: int) -> None:
        if step == 3:
            twin.both(lambda opt: setattr(opt, "coefficient", 0.2))
        if step == 5:
            twin.both(lambda opt: setattr(opt, "use_clip", True))

    twin.run(range(STEPS), before=change, absent=lambda step: ("fc2.weight",) if step % 4 == 2 else ())
    assert_views(twin.opt)
    assert_compiled_if_fused(twin.opt)


# -- property: random shapes and options ---------------------------------------------------------------------


@st.composite
def scenarios(draw):
    shapes = draw(st.lists(st.lists(st.integers(0, 40), max_size=3).map(tuple), min_size=1, max_size=5))
    momentum = draw(st.sampled_from([0.0, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    sgd = dict(lr=draw(st.floats(1e-3, 1.0)), momentum=momentum, nesterov=nesterov,
               dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
               maximize=draw(st.booleans()), weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])))
    lars = dict(coefficient=draw(st.sampled_from([1e-3, 0.05, 1.0])),
                epsilon=draw(st.sampled_from([1e-8, 1e-5])), use_clip=draw(st.booleans()),
                unit_trust_on_zero_norm=draw(st.booleans()), lr_inside_momentum=draw(st.booleans()))
    use_lars = draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
    zero_weights = draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
    return shapes, use_lars, zero_weights, sgd, lars, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=20, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario=scenarios())
def test_property_flat_matches_foreach_and_the_reference(scenario):
    """Per step, each from the flat run's values: the flat step within float32 rounding of the float64
    reference and of the non-flat foreach step."""
    shapes, use_lars, zero_weights, sgd, lars, tensor_lr, seed = scenario
    gen = torch.Generator().manual_seed(seed)
    values = [
        torch.zeros(s, dtype=torch.float64) if zero else torch.randn(s, generator=gen, dtype=torch.float64)
        for s, zero in zip(shapes, zero_weights, strict=True)
    ]
    masks = {f"p{k}": use for k, use in enumerate(use_lars)}
    runs = {}
    for name, dtype, options in (("flat", torch.float32, dict(flat=True)), ("foreach", torch.float32, {}),
                                 ("reference", torch.float64, dict(foreach=False))):
        params = [nn.Parameter(v.to(dtype)) for v in values]
        lr = torch.tensor(sgd["lr"], dtype=torch.float64) if tensor_lr else sgd["lr"]
        opt = lars_fx.LARS(
            torch.optim.SGD([{"params": [(f"p{k}", p) for k, p in enumerate(params)]}], **{**sgd, "lr": lr}),
            lars_filter=lambda info: masks[info.name], **lars, **options,
        )
        runs[name] = (params, opt)
    flat_params, flat = runs["flat"]
    for step in range(STEPS):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in flat_params]
        lr = sgd["lr"] * (1 - 0.05 * step)
        for params, opt in runs.values():
            group = opt.param_groups[0]
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            for p, g in zip(params, grads, strict=True):
                put_gradient(p, g)
            opt.step()
        for other in ("foreach", "reference"):
            params, opt = runs[other]
            for k, (p, q) in enumerate(zip(flat_params, params, strict=True)):
                scale = 1.0 + float(q.detach().abs().max()) if q.numel() else 1.0
                close(p, q, f"step {step}, p{k} against {other}", rtol=1e-5, atol=1e-6 * scale)
                buf, want = flat.state[p].get("momentum_buffer"), opt.state[q].get("momentum_buffer")
                assert (buf is None) == (want is None), f"step {step}, p{k}: momentum buffer"
                if want is not None:
                    close(buf, want, f"step {step}, momentum of p{k} against {other}", rtol=1e-5,
                          atol=1e-6 * (1.0 + float(want.abs().max()) if want.numel() else 1.0))
                with torch.no_grad():  # the next step starts from the flat run's values
                    q.copy_(p)
                    if want is not None:
                        want.copy_(buf)
    if any(math.prod(s) > 0 for s in shapes):
        assert_views(flat)


# -- lars_fx.functional.flat ---------------------------------------------------------------------------------


def test_chunk_layout_by_hand():
    layout = chunk_layout([5, 16, 1], chunk_size=4)
    assert layout.offsets == (0, 8, 24)
    assert layout.chunk_segment == (0, 0, 1, 1, 1, 1, 2)
    assert layout.chunk_valid == (4, 1, 4, 4, 4, 4, 1)
    assert (layout.chunks, layout.size) == (7, 28)
    with pytest.raises(ValueError, match="at least one element"):
        chunk_layout([3, 0, 2])


@settings(max_examples=30, derandomize=True, deadline=None, database=None)
@given(numels=st.lists(st.integers(1, 5000), min_size=1, max_size=12),
       chunk_size=st.one_of(st.none(), st.sampled_from([1, 3, 16, 128])))
def test_chunk_layout_places_every_segment_on_chunk_boundaries(numels, chunk_size):
    layout = chunk_layout(numels, chunk_size)
    size = layout.chunk_size
    if chunk_size is None:
        assert 16 <= size <= 2048 and size & (size - 1) == 0
    else:
        assert size == chunk_size
    assert layout.numels == tuple(numels) and layout.size == layout.chunks * size
    for k, (offset, numel) in enumerate(zip(layout.offsets, numels, strict=True)):
        first = offset // size
        count = -(-numel // size)
        assert offset % size == 0
        assert layout.chunk_segment[first : first + count] == (k,) * count
        assert sum(layout.chunk_valid[first : first + count]) == numel
        assert all(1 <= v <= size for v in layout.chunk_valid[first : first + count])
    assert len(layout.chunk_segment) == sum(-(-n // size) for n in numels)


def segmented(numels: list[int], chunk_size: int, dtype: torch.dtype, seed: int, padding: float = 0.0):
    """A ``[chunks, chunk_size]`` buffer with random segments and ``padding`` elsewhere, and the segments."""
    layout = chunk_layout(numels, chunk_size)
    gen = torch.Generator().manual_seed(seed)
    buffer = torch.full((layout.chunks, chunk_size), padding, dtype=torch.float64)
    segments = [torch.randn(n, generator=gen, dtype=torch.float64) for n in numels]
    for offset, segment in zip(layout.offsets, segments, strict=True):
        buffer.view(-1)[offset : offset + segment.numel()] = segment
    return layout, buffer.to(dtype), [s.to(dtype) for s in segments]


@pytest.mark.parametrize("dtype, norm_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                               (torch.bfloat16, torch.float32)])
def test_segment_squared_norms_of_zero_padded_segments(dtype, norm_dtype):
    layout, buffer, segments = segmented([5, 16, 1, 33], chunk_size=8, dtype=dtype, seed=1)
    got = segment_squared_norms(buffer, layout.segments(buffer.device), norm_dtype)
    assert got.dtype == norm_dtype and got.shape == (4,)
    want = torch.stack([s.to(norm_dtype).square().sum() for s in segments])
    torch.testing.assert_close(got, want, rtol=1e-6 if norm_dtype == torch.float32 else 1e-12, atol=0)


def test_per_chunk_broadcasts_each_segments_value_to_its_chunks():
    layout = chunk_layout([5, 16, 1, 33], chunk_size=8)
    values = torch.randn(4)
    got = per_chunk(values, layout.segments(values.device))
    assert got.shape == (layout.chunks, 1)
    for row, segment in enumerate(layout.chunk_segment):
        assert got[row, 0] == values[segment]


FLAT_FUNCTION_SGD = {
    "nesterov": dict(momentum=0.9, nesterov=True),
    "dampening_maximize": dict(momentum=0.8, dampening=0.3, maximize=True),
    "no_momentum": dict(momentum=0.0),
}


@pytest.mark.parametrize("sgd", FLAT_FUNCTION_SGD.values(), ids=FLAT_FUNCTION_SGD.keys())
def test_lars_sgd_flat_computes_its_own_norms_as_the_reference(sgd):
    """``lars_sgd_flat`` with ``norms=None`` (its segmented reduction over zero padding) against
    ``lars_sgd_reference`` per segment, over several steps, in float64."""
    numels = [5, 16, 1, 33]
    layout, weights, segments = segmented(numels, chunk_size=8, dtype=torch.float64, seed=2)
    reference = [s.clone() for s in segments]
    buffer, reference_buffers = None, [None] * len(numels)
    options = dict(lr=0.3, weight_decay=1e-2, coefficient=0.05, epsilon=1e-5, use_clip=True, **sgd)
    for step in range(STEPS):
        _, grads, grad_segments = segmented(numels, chunk_size=8, dtype=torch.float64, seed=100 + step)
        buffer, norms = lars_sgd_flat(weights, grads, buffer, layout.segments(weights.device), **options)
        reference_buffers = F.lars_sgd_reference(reference, grad_segments, reference_buffers, [True] * 4,
                                                 **options)
        for k, (offset, numel) in enumerate(zip(layout.offsets, numels, strict=True)):
            close(weights.view(-1)[offset : offset + numel], reference[k], f"step {step}, segment {k}",
                  rtol=1e-12, atol=1e-14)
            if reference_buffers[k] is not None:
                close(buffer.view(-1)[offset : offset + numel], reference_buffers[k],
                      f"step {step}, momentum of segment {k}", rtol=1e-12, atol=1e-14)
        assert norms is not None and norms.trust_ratio.shape == (4,)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_backward_through_weights_saved_before_the_step_is_refused_as_without_flat(fused):
    """The flat step writes the buffers, not the parameters: it bumps the parameters' version counters itself,
    so autograd still refuses a backward that would read weights the step has changed since the forward."""
    lin = nn.Linear(3, 3, bias=False)
    opt = lars_fx.LARS(torch.optim.SGD(lin.named_parameters(), lr=0.1, momentum=0.9), flat=True, fused=fused)
    x = torch.randn(2, 3, requires_grad=True)
    for _ in range(3):  # past the eager first step, to the compiled graph when fused
        opt.zero_grad()
        lin(x).sum().backward()
        opt.step()
    saved = (lin(x) ** 2).sum()  # saves the weight for x's gradient
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_a_segment_made_nan_recovers_when_its_weights_and_momentum_are_written_again(fused):
    """An inf gradient makes a layer's trust ratio NaN, which the step also writes into that segment's
    padding; once the user writes the layer's weights and momentum again, the padding is zeroed and the layer
    steps as without flat (the norms sum whole chunks, padding included)."""
    def build(flat: bool) -> tuple[nn.Module, lars_fx.LARS]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)).double()
        sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        return model, lars_fx.LARS(sgd, coefficient=0.05, flat=flat, fused=flat and fused)

    runs = [build(False), build(True)]
    good = [p.detach().clone() for p in runs[0][0].parameters()]
    for step in range(8):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in good]
        if step == 3:
            grads[0][0, 0] = math.inf  # the first layer's weight: its trust ratio is NaN this step
        for model, opt in runs:
            opt.zero_grad()
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
            opt.step()
            if step == 4:  # the user restores the broken layer and its momentum
                weight = model[0].weight
                assert weight.isnan().any()
                with torch.no_grad():
                    weight.copy_(good[0])
                opt.state[weight]["momentum_buffer"].zero_()
        if step >= 5:
            for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters(), strict=True):
                assert not b.isnan().any(), f"step {step}: the flat layer did not recover"
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
