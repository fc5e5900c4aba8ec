"""``torch.compile(adamw.step, backend=LambBackend(adamw, ...))`` and ``backend="lars_fx"`` with
``options={"algorithm": "lamb", ...}``: a plain ``torch.optim.AdamW`` (or ``Adam`` without weight decay) step
compiled into LAMB, against the float64 LAMB reference (``lars_fx.LAMB(foreach=False)`` on float64 copies of
the parameters) over >= 10 steps with fresh gradients. Two tests compile with Inductor; the rest run the
rewritten graph without it (``graphs_run_eagerly``) or stop before any graph is compiled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lars_fx.backend
from lars_fx import LAMB
from lars_fx._compat import recompile_limit_patch
from lars_fx.backend import LAMB_BACKEND_OPTIONS, LambBackend

STEPS = 10


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def graphs_run_eagerly(monkeypatch):
    """The backend's rewritten graphs run as they are, without Inductor (Dynamo, the capture and the passes
    as in real use)."""
    built = []

    def run_eagerly(gm, inputs):
        built.append(gm)
        return gm

    monkeypatch.setattr(lars_fx.backend, "compile_with_inductor", run_eagerly)
    return built


class Net(nn.Module):
    """Weights, biases and LayerNorm parameters, named as the default filter reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(6, 5)
        self.LayerNorm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():  # LayerNorm starts at (1, 0): move it so its plain Adam step is visible
        for p in model.LayerNorm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def decay_groups(model: Net, weight_decay: float) -> list[dict]:
    """Two named param groups: the weights with ``weight_decay``, the rest without."""
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if n.endswith("weight") and "LayerNorm" not in n],
         "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in named if not (n.endswith("weight") and "LayerNorm" not in n)],
         "weight_decay": 0.0},
    ]


class Reference:
    """``lars_fx.LAMB(foreach=False)`` over float64 copies of an Adam's parameters, its groups mirrored."""

    def __init__(self, adam: torch.optim.Optimizer, **lamb_options) -> None:
        self.adam = adam
        self.params = [
            [p.detach().double().clone().requires_grad_() for p in g["params"]] for g in adam.param_groups
        ]
        hyper = ("betas", "eps", "weight_decay", "maximize")
        groups = [
            {"params": list(zip(g["param_names"], copies, strict=True)), "lr": float(g["lr"]),
             **{key: g[key] for key in hyper}}
            for g, copies in zip(adam.param_groups, self.params, strict=True)
        ]
        self.lamb = LAMB(groups, foreach=False, **lamb_options)

    def fresh_gradients(self, generator: torch.Generator) -> None:
        for group, copies in zip(self.adam.param_groups, self.params, strict=True):
            for p, copy in zip(group["params"], copies, strict=True):
                p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                copy.grad = p.grad.double()

    def step_and_compare(self, step) -> None:
        step()
        for group, mine in zip(self.adam.param_groups, self.lamb.param_groups, strict=True):
            mine["lr"] = float(group["lr"])  # the lr this step ran with
        self.lamb.step()
        for group, copies in zip(self.adam.param_groups, self.params, strict=True):
            for p, copy in zip(group["params"], copies, strict=True):
                torch.testing.assert_close(p.double(), copy.detach(), rtol=2e-5, atol=1e-6)
                assert bool(self.adam.state.get(p)) == bool(self.lamb.state.get(copy))  # stepped in both
                for key in ("exp_avg", "exp_avg_sq") if self.adam.state.get(p) else ():
                    torch.testing.assert_close(
                        self.adam.state[p][key].double(), self.lamb.state[copy][key], rtol=2e-5, atol=1e-7
                    )


def assert_refused_before_anything_moves(step, model, error, match):
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_adamw_with_a_scheduled_tensor_lr_becomes_lamb_in_one_compile():
    """AdamW, one group with weight decay and one without, the default filter (LayerNorm parameters and
    biases step as plain Adam), a tensor lr changed by a scheduler at every step: LAMB's numbers, one
    compile. The optimizer never steps as plain Adam outside the compiled graph."""
    model = net()
    adamw = torch.optim.AdamW(decay_groups(model, 0.05), lr=torch.tensor(0.02), foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lambda i: 1.0 / (1 + i))
    backend = LambBackend(adamw)
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return backend(gm, example_inputs)

    # Made for adamw: its eager step is refused from now on, before anything moves.
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert_refused_before_anything_moves(adamw.step, model, RuntimeError, "called without torch.compile")

    step = torch.compile(adamw.step, backend=counting)
    reference = Reference(adamw)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        reference.fresh_gradients(generator)
        reference.step_and_compare(step)
        scheduler.step()
    assert len(compiles) == 1
    assert float(adamw.param_groups[0]["lr"]) == pytest.approx(0.02 / (1 + STEPS))
    assert_refused_before_anything_moves(adamw.step, model, RuntimeError, "as plain AdamW")


def test_adamw_with_float_hyperparameters_maximize_and_trust_clip_by_name():
    """By the name, ``options={"algorithm": "lamb", "trust_clip": ...}``: float lr and weight decay (the
    graph holds them as constants), maximize, and a trust clip that binds (the result differs from LAMB
    without it)."""
    model = net(seed=1)
    adamw = torch.optim.AdamW(decay_groups(model, 0.1), lr=0.01, maximize=True, foreach=False)
    options = {"algorithm": "lamb", "trust_clip": 0.02}
    step = torch.compile(adamw.step, backend="lars_fx", options=options)
    reference = Reference(adamw, trust_clip=0.02)
    unclipped = Reference(adamw)
    generator = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        reference.fresh_gradients(generator)
        for copies, others in zip(reference.params, unclipped.params, strict=True):
            for copy, other in zip(copies, others, strict=True):
                other.grad = copy.grad.clone()
        unclipped.lamb.step()
        reference.step_and_compare(step)
    clipped = torch.cat([p.detach().flatten() for group in reference.params for p in group])
    free = torch.cat([p.detach().flatten() for group in unclipped.params for p in group])
    assert not torch.allclose(clipped, free, rtol=1e-4, atol=0)


def test_adam_without_weight_decay_and_a_custom_filter(graphs_run_eagerly):
    """torch.optim.Adam (coupled decay) with weight_decay=0 is LAMB without decay; ``lamb_filter`` over
    ``ParamInfo`` names decides which parameters get the trust ratio."""
    model = net(seed=2)
    adam = torch.optim.Adam(model.named_parameters(), lr=torch.tensor(0.01), foreach=False)
    only_head = lambda p: p.name.startswith("head.")  # noqa: E731
    step = torch.compile(adam.step, backend=LambBackend(adam, lamb_filter=only_head))
    reference = Reference(adam, lamb_filter=only_head)
    generator = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        reference.fresh_gradients(generator)
        reference.step_and_compare(step)
    assert len(graphs_run_eagerly) == 1


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, foreach=False), "decay is coupled"),
        (lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True, foreach=False), "amsgrad is not LAMB"),
        (lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True), "use foreach=False"),
    ],
    ids=["adam_with_weight_decay", "amsgrad", "foreach"],
)
@pytest.mark.parametrize("spelling", ["name", "object"])
def test_what_is_not_lamb_is_refused_and_never_runs_as_plain_adam(make, match, spelling):
    model = net()
    adam = make(model.named_parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    if spelling == "object":
        with pytest.raises(ValueError, match=match):
            LambBackend(adam)
        return
    step = torch.compile(adam.step, backend="lars_fx", options={"algorithm": "lamb"})
    assert_refused_before_anything_moves(step, model, Exception, match)
    # claimed while Dynamo traced it: the eager step is refused too
    assert_refused_before_anything_moves(adam.step, model, ValueError, match)


def test_options_are_checked():
    model = net()
    adamw = torch.optim.AdamW(model.named_parameters(), foreach=False)
    with pytest.raises(ValueError, match="unknown option"):
        LambBackend(adamw, coefficient=0.01)
    with pytest.raises(ValueError, match="trust_clip must be a finite number > 0"):
        LambBackend(adamw, trust_clip=0.0)
    with pytest.raises(TypeError, match=r"compiles the step of a torch\.optim\.AdamW"):
        LambBackend(torch.optim.SGD(model.parameters(), lr=0.1))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    step = torch.compile(adamw.step, backend="lars_fx", options={"algorithm": "lamb", "epsilon": 1e-5})
    assert_refused_before_anything_moves(step, model, Exception, "unknown option")
    step = torch.compile(adamw.step, backend="lars_fx", options={"algorithm": "lars"})
    assert_refused_before_anything_moves(step, model, Exception, r"compiles the step of a torch\.optim\.SGD")
    assert set(LAMB_BACKEND_OPTIONS) <= {"trust_clip", "lamb_filter", "carry_weight_norms"}


def test_a_parameter_whose_first_gradient_comes_later(graphs_run_eagerly):
    """Adam creates a parameter's state while Dynamo traces the step that first has its gradient; the graph
    reads it (it creates none), so the step of every later graph is LAMB's."""
    model = net(seed=3)
    adamw = torch.optim.AdamW(decay_groups(model, 0.05), lr=torch.tensor(0.01), foreach=False)
    step = torch.compile(adamw.step, backend="lars_fx", options={"algorithm": "lamb"})
    reference = Reference(adamw)
    late = model.head.weight
    generator = torch.Generator().manual_seed(4)
    for i in range(STEPS):
        reference.fresh_gradients(generator)
        if i < 3:
            late.grad = None
            copy = next(c for g, cs in zip(adamw.param_groups, reference.params, strict=True)
                        for p, c in zip(g["params"], cs, strict=True) if p is late)
            copy.grad = None
        reference.step_and_compare(step)
    assert len(graphs_run_eagerly) == 2


@pytest.mark.parametrize("spelling", ["name", "object"])
def test_steps_dynamo_stops_compiling_are_refused(spelling, graphs_run_eagerly):
    """Never plain Adam: past Dynamo's recompile limit (here a different parameter without a gradient at
    each step) Dynamo runs the step eagerly, and so does a call without torch.compile."""
    model = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(3)])
    adamw = torch.optim.AdamW(model.named_parameters(), lr=torch.tensor(0.1), foreach=False)
    backend = LambBackend(adamw) if spelling == "object" else "lars_fx"
    options = None if spelling == "object" else {"algorithm": "lamb"}
    params = list(model.parameters())
    with recompile_limit_patch(2):
        step = torch.compile(adamw.step, backend=backend, options=options)
        for i in range(3):
            for j, p in enumerate(params):
                p.grad = None if j == i else torch.randn_like(p)
            if i < 2:
                step()
        assert len(graphs_run_eagerly) == 2
        assert_refused_before_anything_moves(
            step, model, RuntimeError, r"hit torch._dynamo.config.recompile_limit \(2"
        )
    assert_refused_before_anything_moves(
        adamw.step, model, RuntimeError, "the step was called without torch.compile"
    )
