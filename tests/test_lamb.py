"""LAMB (``lars_fx.lamb.LAMB``, ``lars_fx.functional.lamb_*``): optax.lamb's formula, the float64 reference
as the oracle of the eager modes, torch.optim's habits (schedulers, state dicts, copies, compile), refusals.

Every run draws fresh random gradients at every step. The oracle is ``lamb_reference`` on float64 copies of
the weights, given the hyperparameters each param group holds at that step and the optimizer's filter.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

from lars_fx import functional as F
from lars_fx.lamb import LAMB

MODES = ["foreach", "reference"]
STEPS = 10


class Net(nn.Module):
    """Parameters for every case: LayerNorm and bias names (the default filter leaves them out), a zero weight
    (``||w|| = 0``: ratio 1), one with a gradient on even steps only, and a frozen one (never a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.LayerNorm = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 3)
        self.zero = nn.Parameter(torch.zeros(4, 2))
        self.sometimes = nn.Parameter(torch.randn(3))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)


def _net(seed: int, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def _gradients(model: nn.Module, generator: torch.Generator, step: int) -> dict[str, Tensor]:
    """Fresh float64 gradients of this step, by name; ``sometimes`` has one on even steps only."""
    return {
        name: torch.randn(p.shape, generator=generator, dtype=torch.float64)
        for name, p in model.named_parameters()
        if p.requires_grad and not (name == "sometimes" and step % 2)
    }


def _set_gradients(model: nn.Module, grads: dict[str, Tensor]) -> None:
    for name, p in model.named_parameters():
        p.grad = grads[name].to(p.dtype) if name in grads else None


class Oracle:
    """``lamb_reference`` on float64 copies of the weights, with the state kept here."""

    def __init__(self, model: nn.Module) -> None:
        self.weights = {name: p.detach().double().clone() for name, p in model.named_parameters()}
        self.state: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def step(self, opt: LAMB, grads: dict[str, Tensor]) -> list[F.LarsNorms]:
        """One step of every group with the group's hyperparameters now and ``opt``'s filter and options."""
        norms = []
        for group_index, group in enumerate(opt.param_groups):
            decisions = zip(group["param_names"], opt.lamb_mask(group_index), strict=True)
            present = [(n, use) for n, use in decisions if n in grads]
            for name, _ in present:
                if name not in self.state:
                    w = self.weights[name]
                    self.state[name] = (torch.zeros_like(w), torch.zeros_like(w), torch.tensor(0.0))
            beta1, beta2 = (float(b) for b in group["betas"])
            norms.append(F.lamb_reference(
                [self.weights[n] for n, _ in present], [grads[n].double() for n, _ in present],
                *([self.state[n][k] for n, _ in present] for k in range(3)), [use for _, use in present],
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), trust_clip=opt.trust_clip,
                maximize=group["maximize"],
            ))
        return norms

    def reanchor(self, model: nn.Module, opt: LAMB) -> None:
        """Start the next step from the run's own values, so that rounding does not accumulate."""
        for name, p in model.named_parameters():
            self.weights[name] = p.detach().double().clone()
            if p in opt.state:
                s = opt.state[p]
                self.state[name] = (s["exp_avg"].double(), s["exp_avg_sq"].double(), s["step"].clone())

    def check(self, model: nn.Module, rtol: float, atol: float, where: str) -> None:
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach().double(), self.weights[name], rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{where}, {name}: {m}")


# -- optax.lamb's formula ------------------------------------------------------------------------------------


def optax_lamb(weights: list[np.ndarray], grads: list[np.ndarray], state: dict[str, Any], *, lr: float,
               b1: float, b2: float, eps: float, weight_decay: float) -> list[np.ndarray]:
    """One step of optax.lamb's chain, transcribed in float64 numpy: scale_by_adam(b1, b2, eps, eps_root=0) ->
    add_decayed_weights(weight_decay) -> scale_by_trust_ratio() -> scale_by_learning_rate(lr)."""
    state["count"] = count = state.get("count", 0) + 1
    mu = state.setdefault("mu", [np.zeros_like(w) for w in weights])
    nu = state.setdefault("nu", [np.zeros_like(w) for w in weights])
    new_weights = []
    for k, (w, g) in enumerate(zip(weights, grads, strict=True)):
        mu[k] = (1 - b1) * g + b1 * mu[k]
        nu[k] = (1 - b2) * g**2 + b2 * nu[k]
        mu_hat, nu_hat = mu[k] / (1 - b1**count), nu[k] / (1 - b2**count)
        update = mu_hat / (np.sqrt(nu_hat + 0.0) + eps)
        update = update + weight_decay * w
        param_norm, update_norm = np.linalg.norm(w), np.linalg.norm(update)
        trust = 1.0 if param_norm == 0.0 or update_norm == 0.0 else param_norm / update_norm
        new_weights.append(w + -lr * (update * trust))
    return new_weights


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("mode", MODES)
def test_equals_optax_lamb_in_float64(mode, weight_decay):
    model = nn.Sequential(nn.Linear(7, 4), nn.Linear(4, 3)).double()
    model.add_module("zero", nn.Linear(3, 2, bias=False).double())  # ||w|| = 0: optax's ratio 1
    nn.init.zeros_(model.zero.weight)
    hyper = dict(lr=0.05, b1=0.8, b2=0.99, eps=1e-6, weight_decay=weight_decay)
    opt = LAMB(model.named_parameters(), lr=hyper["lr"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"],
               weight_decay=weight_decay, lamb_filter=lambda p: True, foreach=mode == "foreach")
    weights = [p.detach().numpy().copy() for p in model.parameters()]
    state: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for step in range(STEPS):
        grads = [rng.standard_normal(w.shape) for w in weights]
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        weights = optax_lamb(weights, grads, state, **hyper)
        for (name, p), expected in zip(model.named_parameters(), weights, strict=True):
            np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12, atol=1e-14,
                                       err_msg=f"step {step}, {name}")
    assert all(float(p.detach().norm()) > 0 for p in model.parameters())


# -- float32 against the float64 reference ------------------------------------------------------------------

VARIANTS = {
    "default_filter": dict(lamb={}, weight_decay=0.01, maximize=False),
    # fc2.weight rejected too; a clip that binds on some steps and not on others
    "clip_maximize": dict(lamb=dict(trust_clip=0.3, lamb_filter=lambda p: "bias" not in p.name
                                    and "LayerNorm" not in p.name and p.name != "fc2.weight"),
                          weight_decay=0.02, maximize=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_float32_follows_the_float64_reference(mode, variant):
    case = VARIANTS[variant]
    model = _net(1)
    opt = LAMB(model.named_parameters(), lr=0.02, betas=(0.9, 0.99), weight_decay=case["weight_decay"],
               maximize=case["maximize"], foreach=mode == "foreach", telemetry=True, **case["lamb"])
    oracle = Oracle(model)
    generator = torch.Generator().manual_seed(2)
    frozen = model.frozen.detach().clone()
    ratios, expected_names = [], []
    for step in range(STEPS):
        grads = _gradients(model, generator, step)
        _set_gradients(model, grads)
        sometimes_before = model.sometimes.detach().clone()
        opt.step()
        (norms,) = oracle.step(opt, grads)
        oracle.check(model, rtol=1e-5, atol=1e-6, where=f"step {step}")
        entry = opt.telemetry.device_values[-1]
        torch.testing.assert_close(entry.double(), torch.stack(list(norms)), rtol=1e-5, atol=1e-6)
        names = opt.param_groups[0]["param_names"]
        decisions = zip(names, opt.lamb_mask(0), strict=True)
        expected_names.append([n for n, use in decisions if use and n in grads])
        ratios.append(norms.trust_ratio)
        if step % 2:
            assert torch.equal(model.sometimes, sometimes_before), "a parameter without a gradient moved"
        assert float(opt.state[model.sometimes]["step"]) == step // 2 + 1
    records = opt.telemetry.to_records()
    recorded = [[r["param"] for r in records if r["step"] == step] for step in range(STEPS)]
    assert recorded == expected_names
    filtered = [n for n, use in zip(opt.param_groups[0]["param_names"], opt.lamb_mask(0), strict=True) if use]
    assert "LayerNorm.weight" not in filtered and "fc1.bias" not in filtered and "zero" in filtered
    clip = case["lamb"].get("trust_clip", math.inf)
    assert float(ratios[0][filtered.index("zero")]) == min(1.0, clip)  # ||w|| = 0 on the first step: ratio 1
    assert torch.equal(model.frozen, frozen) and model.frozen not in opt.state
    state = opt.state[model.fc1.weight]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["step"].dtype == torch.float32 and state["step"].dim() == 0 and float(state["step"]) == STEPS
    assert state["exp_avg"].dtype == torch.float32
    if "trust_clip" in case["lamb"]:
        every = torch.cat(ratios)
        assert (every == 0.3).any() and (every < 0.3).any(), "the clip should bind on some steps, not all"


def test_a_rejected_parameter_takes_a_plain_adam_step():
    model = _net(3)
    opt = LAMB(model.named_parameters(), lr=0.01, betas=(0.85, 0.995), eps=1e-6, weight_decay=0.1)
    rejected = [model.fc1.bias, model.LayerNorm.weight]
    copies = [nn.Parameter(p.detach().clone()) for p in rejected]
    adam = torch.optim.Adam(copies, lr=0.01, betas=(0.85, 0.995), eps=1e-6, weight_decay=0.0)
    generator = torch.Generator().manual_seed(4)
    for step in range(STEPS):
        grads = _gradients(model, generator, step)
        _set_gradients(model, grads)
        for copied, name in zip(copies, ["fc1.bias", "LayerNorm.weight"], strict=True):
            copied.grad = grads[name].float()
        opt.step()
        adam.step()
        for p, copied in zip(rejected, copies, strict=True):
            torch.testing.assert_close(p, copied, rtol=1e-6, atol=1e-7)


def test_bfloat16_parameters_with_float32_norms():
    runs = {}
    for mode in MODES:
        model = _net(5, torch.bfloat16)
        opt = LAMB(model.named_parameters(), lr=0.02, weight_decay=0.01, foreach=mode == "foreach",
                   telemetry=True)
        oracle = Oracle(model)
        generator = torch.Generator().manual_seed(6)
        for step in range(STEPS):
            grads = _gradients(model, generator, step)
            _set_gradients(model, grads)
            oracle.reanchor(model, opt)
            opt.step()
            oracle.step(opt, grads)
            # one step from the run's own values: within bfloat16's rounding of the weights it writes
            oracle.check(model, rtol=2**-7, atol=1e-4, where=f"{mode}, step {step}")
        assert all(values.dtype == torch.float32 for values in opt.telemetry.device_values)
        assert opt.state[model.fc1.weight]["exp_avg"].dtype == torch.bfloat16
        runs[mode] = model
    for (name, a), b in zip(runs["foreach"].named_parameters(), runs["reference"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


# -- the property test: foreach against the per-tensor reference ---------------------------------------------


@dataclass(frozen=True)
class Scenario:
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    filtered: tuple[bool, ...]
    hyper: dict[str, Any]
    trust_clip: float | None
    has_grad: tuple[tuple[bool, ...], ...]  # per step, per parameter
    seed: int


@st.composite
def scenarios(draw: Any) -> Scenario:
    n = draw(st.integers(1, 4))
    shapes = tuple(tuple(draw(st.lists(st.integers(0, 4), max_size=3))) for _ in range(n))
    dtypes = tuple(draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])) for _ in range(n))
    filtered = tuple(draw(st.booleans()) for _ in range(n))
    hyper = dict(
        lr=draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0])),
        betas=(draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.0, 0.9, 0.999]))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-2])),
        weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])),
        maximize=draw(st.booleans()),
    )
    trust_clip = draw(st.sampled_from([None, 0.5, 1.0]))
    has_grad = tuple(draw(st.lists(st.tuples(*[st.booleans()] * n), min_size=1, max_size=4)))
    return Scenario(shapes, dtypes, filtered, hyper, trust_clip, has_grad, draw(st.integers(0, 2**16)))


TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@settings(max_examples=100, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_property_foreach_equals_reference(scenario):
    generator = torch.Generator().manual_seed(scenario.seed)
    initial = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in scenario.shapes]
    runs = []
    for foreach in (True, False):
        params = [(f"p{k}", nn.Parameter(w.to(dtype)))
                  for k, (w, dtype) in enumerate(zip(initial, scenario.dtypes, strict=True))]
        filtered = dict(zip((name for name, _ in params), scenario.filtered, strict=True))
        opt = LAMB(params, **scenario.hyper, trust_clip=scenario.trust_clip, foreach=foreach,
                   lamb_filter=lambda p, filtered=filtered: filtered[p.name])
        runs.append((params, opt))
    for has_grad in scenario.has_grad:
        grads = [torch.randn(w.shape, generator=generator, dtype=torch.float64) if present else None
                 for w, present in zip(initial, has_grad, strict=True)]
        for params, opt in runs:
            for (_, p), g in zip(params, grads, strict=True):
                p.grad = None if g is None else g.to(p.dtype)
            opt.step()
    (fast, fast_opt), (reference, reference_opt) = runs
    for (name, a), (_, b) in zip(fast, reference, strict=True):
        tol = TOLERANCE[a.dtype]
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
        assert (a in fast_opt.state) == (b in reference_opt.state)
        if a in fast_opt.state:
            assert torch.equal(fast_opt.state[a]["step"], reference_opt.state[b]["step"])


def test_trust_ratio_at_zero_norms_overflow_and_clip():
    w = torch.tensor([3.0, 0.0, 2.0, 0.0, math.inf, 4.0])
    r = torch.tensor([1.5, 1.0, 0.0, 0.0, 1.0, 2.0])
    ratio = F.lamb_trust_ratio(w, r)
    assert ratio[:4].tolist() == [2.0, 1.0, 1.0, 1.0] and ratio[4].isnan() and ratio[5] == 2.0
    clipped = F.lamb_trust_ratio(w, r, trust_clip=1.0)
    assert clipped[:4].tolist() == [1.0, 1.0, 1.0, 1.0] and clipped[4].isnan()


# -- torch.optim's habits -----------------------------------------------------------------------------------


def _one_cycle(opt: LAMB) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS + 1, pct_start=0.4,
                                               base_momentum=0.8, max_momentum=0.95)


def _exponential(opt: LAMB) -> Any:
    return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)


@pytest.mark.parametrize(
    "mode,lr,scheduler",
    [("foreach", 0.02, _one_cycle), ("reference", 0.02, _one_cycle),
     ("foreach", torch.tensor(0.05), _exponential), ("reference", torch.tensor(0.05), _exponential)],
    ids=["foreach-float_lr-onecycle", "reference-float_lr-onecycle", "foreach-tensor_lr-exponential",
         "reference-tensor_lr-exponential"],
)
def test_schedulers_and_options_changed_mid_run(mode, lr, scheduler):
    """OneCycleLR cycles lr and beta1; a tensor lr is scheduled in place. At step 5 the trust clip and the
    filter change: both take effect at the next step."""
    model = _net(7)
    opt = LAMB(model.named_parameters(), lr=lr, weight_decay=0.01, foreach=mode == "foreach")
    schedule = scheduler(opt)
    oracle = Oracle(model)
    generator = torch.Generator().manual_seed(8)
    seen: dict[str, set[float]] = {"lr": set(), "beta1": set()}
    first_mask = opt.lamb_mask(0)
    for step in range(STEPS):
        if step == 5:
            opt.trust_clip = 0.2
            opt.lamb_filter = lambda p: "fc2" not in p.name
            assert opt.lamb_mask(0) != first_mask
        group = opt.param_groups[0]
        seen["lr"].add(float(group["lr"]))
        seen["beta1"].add(float(group["betas"][0]))
        grads = _gradients(model, generator, step)
        _set_gradients(model, grads)
        opt.step()
        oracle.step(opt, grads)
        oracle.check(model, rtol=1e-5, atol=1e-6, where=f"step {step}")
        schedule.step()
    assert isinstance(opt.param_groups[0]["lr"], Tensor) == isinstance(lr, Tensor)
    assert len(seen["lr"]) > 5 and (scheduler is _exponential or len(seen["beta1"]) > 5)


def _step_both(runs: list[tuple[nn.Module, Any]], generator: torch.Generator, step: int) -> None:
    """The same fresh gradients for every (model, optimizer) run, then a step of each."""
    grads = _gradients(runs[0][0], generator, step)
    for model, opt in runs:
        _set_gradients(model, grads)
        opt.step()


def test_state_dict_round_trip_into_a_fresh_lamb():
    model = _net(9)
    opt = LAMB(model.named_parameters(), lr=0.02, weight_decay=0.01, trust_clip=1.0)
    generator = torch.Generator().manual_seed(10)
    for step in range(4):
        _step_both([(model, opt)], generator, step)
    copy_model = _net(11)
    copy_model.load_state_dict(model.state_dict())
    # Other names, which the default filter accepts all: the loaded state dict's names decide the filter.
    renamed = [(f"p{k}", p) for k, p in enumerate(copy_model.parameters())]
    restored = LAMB(renamed, lr=0.5, weight_decay=0.0, trust_clip=1.0)
    assert all(restored.lamb_mask(0))
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert restored.param_groups[0]["lr"] == 0.02 and restored.lamb_mask(0) == opt.lamb_mask(0)
    for step in range(4, 8):
        _step_both([(model, opt), (copy_model, restored)], generator, step)
    for a, b in zip(model.parameters(), copy_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_moves_between_lamb_and_adam():
    """Every parameter rejected and no weight decay: LAMB is Adam, each continues from the other's state."""
    model, adam_model = _net(12), _net(12)
    lamb = LAMB(model.named_parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6, lamb_filter=lambda p: False)
    adam = torch.optim.Adam(adam_model.named_parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    generator = torch.Generator().manual_seed(13)
    for step in range(3):
        _step_both([(model, lamb)], generator, step)
    adam_model.load_state_dict(model.state_dict())
    adam.load_state_dict(copy.deepcopy(lamb.state_dict()))
    assert set(adam.state[adam_model.fc1.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    for step in range(3, 6):
        _step_both([(model, lamb), (adam_model, adam)], generator, step)
    for a, b in zip(model.parameters(), adam_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    lamb.load_state_dict(copy.deepcopy(adam.state_dict()))  # and back, from Adam's own state dict
    model.load_state_dict(adam_model.state_dict())
    for step in range(6, 9):
        _step_both([(model, lamb), (adam_model, adam)], generator, step)
    for a, b in zip(model.parameters(), adam_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_deepcopy_mid_run_continues_identically():
    model = _net(14)
    opt = LAMB(model.named_parameters(), lr=0.02, weight_decay=0.01, trust_clip=0.5, foreach=False,
               telemetry=True)
    generator = torch.Generator().manual_seed(15)
    for step in range(3):
        _step_both([(model, opt)], generator, step)
    copy_model, copy_opt = copy.deepcopy((model, opt))
    assert copy_opt.trust_clip == 0.5 and copy_opt.foreach is False
    assert copy_opt.lamb_mask(0) == opt.lamb_mask(0)
    for step in range(3, 7):
        _step_both([(model, opt), (copy_model, copy_opt)], generator, step)
    for a, b in zip(model.parameters(), copy_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(copy_opt.telemetry) == len(opt.telemetry) == 7


def test_two_optimizers_in_one_process():
    runs = []
    settings_by_seed = {16: dict(foreach=True, trust_clip=0.4), 17: dict(foreach=False, weight_decay=0.05)}
    for seed, options in settings_by_seed.items():
        model = _net(seed)
        runs.append((model, LAMB(model.named_parameters(), lr=0.03, **options), Oracle(model)))
    generator = torch.Generator().manual_seed(18)
    for step in range(6):
        for model, opt, oracle in runs:
            grads = _gradients(model, generator, step)
            _set_gradients(model, grads)
            opt.step()
            oracle.step(opt, grads)
            oracle.check(model, rtol=1e-5, atol=1e-6, where=f"step {step}")


@pytest.fixture
def fresh_compile_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_with_a_tensor_lr(fresh_compile_caches):
    model = _net(19)
    lr = torch.tensor(0.03)
    opt = LAMB(model.named_parameters(), lr=lr, weight_decay=0.01, trust_clip=0.5)
    counter = CompileCounterWithBackend("inductor")
    step_fn = torch.compile(opt.step, backend=counter)
    oracle = Oracle(model)
    generator = torch.Generator().manual_seed(20)
    frames = []
    for step in range(10):
        lr.fill_(0.03 * 0.8**step)
        grads = _gradients(model, generator, step)
        grads.pop("sometimes", None)  # the same parameters every step: no recompile for a new set
        _set_gradients(model, grads)
        step_fn()
        frames.append(counter.frame_count)
        oracle.step(opt, grads)
        oracle.check(model, rtol=1e-5, atol=1e-6, where=f"step {step}")
    # One graph for the first step, which makes the state (as torch.optim.Adam's compiled step does), and one
    # for every later step: no graph break, and the changing tensor lr recompiles nothing.
    assert frames == [1] + [2] * 9, f"graphs compiled after each step: {frames}"


def test_compiled_step_with_a_scheduled_float_lr_and_an_option_changed_mid_run(fresh_compile_caches):
    """A float lr moved by a scheduler at every step and trust_clip changed at step 5 under
    torch.compile(opt.step): every step equals the float64 reference (recompiles allowed, wrong numbers
    not)."""
    model = _net(23)
    opt = LAMB(model.named_parameters(), lr=0.03, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    step_fn = torch.compile(opt.step)
    oracle = Oracle(model)
    generator = torch.Generator().manual_seed(24)
    for step in range(10):
        if step == 5:
            opt.trust_clip = 0.5
        grads = _gradients(model, generator, step)
        grads.pop("sometimes", None)
        _set_gradients(model, grads)
        step_fn()
        oracle.step(opt, grads)
        oracle.check(model, rtol=1e-5, atol=1e-6, where=f"step {step}")
        scheduler.step()


# -- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(betas=(0.9, 1.0)), r"betas\[1\] must be a number in \[0, 1\), got 1.0"),
        (dict(betas=(-0.1, 0.99)), r"betas\[0\] must be a number in \[0, 1\)"),
        (dict(betas=0.9), r"betas must be a pair"),
        (dict(eps=-1e-6), r"eps must be a finite number >= 0"),
        (dict(lr=-0.1), r"lr must be a finite number >= 0"),
        (dict(lr=math.nan), r"lr must be a finite number >= 0, got nan"),
        (dict(lr=torch.tensor([0.1, 0.2])), r"lr must be a number or a one-element tensor"),
        (dict(weight_decay=math.inf), r"weight_decay must be a finite number >= 0"),
        (dict(trust_clip=0.0), r"trust_clip must be a finite number > 0.0, got 0.0 \(timm's LAMBC uses 1.0"),
    ],
)
def test_bad_hyperparameters_name_themselves(options, match):
    with pytest.raises(ValueError, match=match):
        LAMB(_net(0).named_parameters(), **options)


def test_bad_values_set_later_raise_before_anything_moves():
    model = _net(21)
    opt = LAMB(model.named_parameters())
    with pytest.raises(ValueError, match="trust_clip"):
        opt.trust_clip = -1.0
    assert opt.trust_clip is None
    with pytest.raises(TypeError, match="lamb_filter must be callable"):
        opt.lamb_filter = "bias"
    with pytest.raises(TypeError, match="foreach must be True or False"):
        opt.foreach = 1
    _set_gradients(model, _gradients(model, torch.Generator().manual_seed(22), 0))
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['betas'\]\[1\] must be a number in \[0, 1\)"):
        opt.step()
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    opt.param_groups[0]["eps"] = math.nan
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['eps'\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)) and not opt.state


def test_sparse_gradient_is_refused_naming_the_parameter():
    embedding = nn.Embedding(5, 3, sparse=True)
    dense = nn.Linear(3, 2)
    params = [("dense.weight", dense.weight), ("embedding.weight", embedding.weight)]
    opt = LAMB(params)
    dense.weight.grad = torch.ones_like(dense.weight)
    embedding(torch.tensor([1, 2])).sum().backward()
    before = dense.weight.detach().clone()
    with pytest.raises(ValueError, match=r"sparse gradient for 'embedding.weight'.*dense"):
        opt.step()
    assert torch.equal(dense.weight, before) and not opt.state


@pytest.mark.parametrize("mode", MODES)
def test_maximize_is_a_step_on_the_negated_gradient(mode):
    models = [_net(23), _net(23)]
    opts = [LAMB(m.named_parameters(), lr=0.02, weight_decay=0.01, maximize=maximize,
                 foreach=mode == "foreach") for m, maximize in zip(models, (True, False), strict=True)]
    generator = torch.Generator().manual_seed(24)
    for step in range(4):
        grads = _gradients(models[0], generator, step)
        _set_gradients(models[0], grads)
        _set_gradients(models[1], {name: -g for name, g in grads.items()})
        for opt in opts:
            opt.step()
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(a, b)
