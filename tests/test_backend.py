"""``torch.compile(sgd.step, backend="lars_fx", options=...)``: plain SGD compiled into LARS, against the
float64 reference over >= 10 steps with fresh gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lars_fx
from lars_fx.backend import lars_fx_backend
from lars_fx.functional import lars_sgd_reference

import mindspore_replay

STEPS = 10


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(seed=0, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(device, dtype)


def run_against_reference(
    model, sgd, step, lars_options, steps=STEPS, before_step=None, rtol=2e-5, atol=1e-6, before_step_writes_weights=False
):
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    filt = lars_options.get("lars_filter", lars_fx.default_lars_filter)
    mask = [bool(filt(lars_fx.ParamInfo(n, p, 0, i))) for i, (n, p) in enumerate(zip(names, params))]
    ref = [p.detach().double().clone() for p in params]
    buffers = [None] * len(params)
    group = sgd.param_groups[0]
    lars_kwargs = {k: v for k, v in lars_options.items() if k not in ("lars_filter", "carry_weight_norms")}
    for i in range(steps):
        gen = torch.Generator().manual_seed(500 + i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
        if before_step is not None:
            before_step(i)
            if before_step_writes_weights:
                ref = [p.detach().double().clone() for p in params]
        step()
        buffers = lars_sgd_reference(
            ref, [p.grad.double() for p in params], buffers, mask, lr=float(group["lr"]),
            weight_decay=group["weight_decay"], momentum=group["momentum"], dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=group["maximize"], **lars_kwargs,
        )
        for got, want in zip(params, ref):
            torch.testing.assert_close(got.detach().double(), want, rtol=rtol, atol=atol)
        if group["momentum"] != 0:
            for p, want in zip(params, buffers):
                torch.testing.assert_close(sgd.state[p]["momentum_buffer"].double(), want, rtol=rtol, atol=atol)


def test_backend_resolves_by_name():
    from torch._dynamo.backends.registry import lookup_backend

    assert "lars_fx" in torch._dynamo.list_backends(exclude_tags=())
    assert lookup_backend("lars_fx") is lars_fx_backend


CASES = {
    "foreach-tensor-lr": (dict(foreach=True, momentum=0.9, weight_decay=1e-2), True),
    "for-loop-tensor-lr-nesterov": (dict(foreach=False, momentum=0.9, nesterov=True, weight_decay=1e-2), True),
    "for-loop-float-lr-dampening-maximize": (
        dict(foreach=False, momentum=0.8, dampening=0.3, maximize=True, weight_decay=1e-3), False),
    "foreach-no-momentum": (dict(foreach=True, momentum=0.0, weight_decay=1e-2), True),
}


@pytest.mark.parametrize("case", CASES)
def test_sgd_forms_become_lars(case):
    sgd_options, tensor_lr = CASES[case]
    model = tiny_model(1)
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    sgd = torch.optim.SGD(model.named_parameters(), lr=lr, **sgd_options)
    options = {"coefficient": 0.02, "epsilon": 1e-5}
    step = torch.compile(sgd.step, backend="lars_fx", options=options)
    run_against_reference(model, sgd, step, options)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # Dynamo-run step
def test_options_and_scheduler_without_recompiles():
    model = tiny_model(2)
    sgd = torch.optim.SGD(model.named_parameters(), lr=torch.tensor(0.5), momentum=0.9, weight_decay=1e-2)
    options = {
        "coefficient": 0.05, "use_clip": True, "lr_inside_momentum": True,
        "lars_filter": lambda p: p.name != "0.weight",  # by name: only 0.weight keeps its plain gradient
    }
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return lars_fx_backend(gm, example_inputs, options=options)

    step = torch.compile(sgd.step, backend=counting_backend)
    scheduler = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.8)
    run_against_reference(model, sgd, step, options, before_step=lambda i: scheduler.step() if i else None)
    assert float(sgd.param_groups[0]["lr"]) < 0.5 * 0.8**8
    assert len(compiles) == 2  # the first step (creates the buffers), then every later step


@pytest.mark.parametrize("carry", [True, False])
def test_weights_written_between_steps(carry):
    model = tiny_model(7)
    sgd = torch.optim.SGD(model.named_parameters(), lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-2)
    options = {"coefficient": 0.02, "carry_weight_norms": carry}
    step = torch.compile(sgd.step, backend="lars_fx", options=options)
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}

    def write_weights(i):
        with torch.no_grad():
            if i == 4:
                model[0].weight.mul_(2.0)
            if i == 7:
                model.load_state_dict(checkpoint)

    run_against_reference(model, sgd, step, options, before_step=write_weights, before_step_writes_weights=True)


def test_unknown_option_is_a_clear_error():
    model = tiny_model(3)
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    step = torch.compile(sgd.step, backend="lars_fx", options={"coefficent": 0.01})
    with pytest.raises(Exception, match=r"unknown option\(s\) \['coefficent'\]; valid options are"):
        step()
    with pytest.raises(Exception, match="epsilon must be a finite number > 0"):
        torch.compile(sgd.step, backend="lars_fx", options={"epsilon": 0.0})()


def test_other_optimizers_are_refused():
    model = tiny_model(4)
    adam = torch.optim.Adam(model.named_parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with pytest.raises(Exception, match="compiles the step of a torch.optim.SGD"):
        torch.compile(adam.step, backend="lars_fx")()


def test_graphs_without_the_update():
    model = tiny_model(6)
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    def reads_a_parameter(self):
        return self.param_groups[0]["params"][0] * 2

    def reads_gradients_only(self):  # what a graph break before `param.add_` would leave in a graph
        return [p.grad * 0.9 for p in self.param_groups[0]["params"]]

    doubled = torch.compile(reads_a_parameter, backend="lars_fx")(sgd)
    torch.testing.assert_close(doubled, model[0].weight * 2)
    with pytest.raises(Exception, match="reads gradients but writes no parameter"):
        torch.compile(reads_gradients_only, backend="lars_fx")(sgd)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_on_gpu(dtype):
    model = tiny_model(5, device="cuda", dtype=dtype)
    sgd = torch.optim.SGD(model.named_parameters(), lr=torch.tensor(0.1, device="cuda"), momentum=0.9,
                          weight_decay=1e-2, foreach=True)
    options = {"coefficient": 0.02}
    step = torch.compile(sgd.step, backend="lars_fx", options=options)
    tolerance = dict(rtol=3e-2, atol=3e-3) if dtype == torch.bfloat16 else {}
    run_against_reference(model, sgd, step, options, steps=STEPS if dtype == torch.float32 else 3, **tolerance)


@pytest.mark.parametrize("name", mindspore_replay.SCENARIOS)
def test_mindspore_replay_through_backend(name):
    """The MindSpore 2.10 trajectories of the foundation issue, through backend="lars_fx" on plain SGD."""
    scenario, model = mindspore_replay.load(name)
    hp = scenario["hyperparameters"]
    lrs = hp["lr_per_step"]
    groups = mindspore_replay.param_groups(model, scenario)
    sgd = torch.optim.SGD(groups, lr=torch.tensor(lrs[0]), momentum=hp["momentum"])
    options = {"epsilon": hp["epsilon"], "coefficient": hp["coefficient"], "use_clip": hp["use_clip"]}
    if name in mindspore_replay.CUSTOM_FILTERS:
        options["lars_filter"] = mindspore_replay.CUSTOM_FILTERS[name]
    step = torch.compile(sgd.step, backend="lars_fx", options=options)

    def set_lr(index):
        for group in sgd.param_groups:
            group["lr"].fill_(lrs[index])

    mindspore_replay.run(name, scenario, model, step, set_lr)
