"""``LARS(..., fused=True)`` (captured, rewritten by the FX passes, compiled by Inductor) against the
float64 reference ``lars_fx.functional.lars_sgd_reference``, over >= 10 steps with fresh gradients."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from torch import nn

import lars_fx
from lars_fx.functional import lars_sgd_reference
from lars_fx.fused import inspect_step
from lars_fx.passes.fx_pipeline import pipeline_names
from lars_fx.passes.pipelines import LARS_SGD
from mindspore_replay import SCENARIOS, replay_lars

STEPS = 10


class Recorder:
    """A stand-in telemetry sink: keeps what the optimizer hands it."""

    def __init__(self):
        self.calls = []

    def record(self, optimizer, group_index, params, w_norm, g_norm, trust_ratio):
        self.calls.append((group_index, list(params), w_norm.clone(), g_norm.clone(), trust_ratio.clone()))


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


class Oracle:
    """The reference, in float64, over copies of an optimizer's parameters."""

    def __init__(self, opt: lars_fx.LARS):
        self.opt = opt
        self.copies = {p: p.detach().to(torch.float64).clone() for g in opt.param_groups for p in g["params"]}
        self.buffers = {}
        self.grads = {}

    def read_grads(self):
        """Call before opt.step(): torch's foreach nesterov writes into .grad (of non-LARS params here)."""
        self.grads = {p: p.grad.to(torch.float64) for p in self.copies if p.grad is not None}

    def step(self):
        opt = self.opt
        for group_index, group in enumerate(opt.param_groups):
            mask = opt.lars_mask(group_index)
            chosen = [(p, m) for p, m in zip(group["params"], mask, strict=True) if p in self.grads]
            if not chosen:
                continue
            params = [self.copies[p] for p, _ in chosen]
            momentum = group["momentum"]
            new = lars_sgd_reference(
                params, [self.grads[p] for p, _ in chosen],
                [self.buffers.get(p) if momentum != 0 else None for p, _ in chosen], [m for _, m in chosen],
                lr=float(group["lr"]), weight_decay=group["weight_decay"], momentum=momentum,
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                coefficient=opt.coefficient, epsilon=opt.epsilon, use_clip=opt.use_clip,
                unit_trust_on_zero_norm=opt.unit_trust_on_zero_norm,
                lr_inside_momentum=opt.lr_inside_momentum,
            )
            for (p, _), buf in zip(chosen, new, strict=True):
                if buf is not None:
                    self.buffers[p] = buf

    def check(self, rtol=2e-5, atol=1e-6):
        for p, want in self.copies.items():
            torch.testing.assert_close(p.detach().to(torch.float64), want, rtol=rtol, atol=atol)
        for p, want in self.buffers.items():
            torch.testing.assert_close(
                self.opt.state[p]["momentum_buffer"].to(torch.float64), want, rtol=rtol, atol=atol
            )


def set_grads(model, seed, skip=()):
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.grad = None if name in skip else torch.randn(p.shape, generator=gen).to(p.dtype)


def run(opt, model, steps=STEPS, before_step=None, skip=(), tolerance=None, oracle=None):
    oracle = oracle or Oracle(opt)
    for step in range(steps):
        set_grads(model, 1000 + step, skip)
        if before_step is not None:
            before_step(step)
        oracle.read_grads()
        opt.step()
        oracle.step()
        oracle.check(**(tolerance or {}))
    return oracle


SGD_OPTIONS = {
    "momentum": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "no_momentum": dict(lr=0.1, momentum=0.0, weight_decay=5e-3),
    "dampening_maximize": dict(lr=0.05, momentum=0.8, dampening=0.2, weight_decay=1e-3, maximize=True),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "no_weight_decay": dict(lr=0.2, momentum=0.5),
}


@pytest.mark.parametrize("name", SGD_OPTIONS)
def test_sgd_options(name):
    model = tiny_model()
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), **SGD_OPTIONS[name]), coefficient=0.02, fused=True
    )
    run(opt, model)
    fused = opt.fused_step
    assert fused.fallback is None
    assert fused.compile_count == 1  # a first step that creates momentum buffers runs eagerly


@pytest.mark.parametrize("lars_option", ["use_clip", "lr_inside_momentum"])
def test_scheduler_does_not_recompile(lars_option):
    model = tiny_model(1)
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    opt = lars_fx.LARS(sgd, coefficient=0.05, fused=True, **{lars_option: True})
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    run(opt, model, before_step=lambda step: scheduler.step() if step else None)
    assert opt.param_groups[0]["lr"] < 0.5 * 0.7**8
    assert opt.fused_step.compile_count == 1


def test_momentum_schedule_does_not_recompile():
    model = tiny_model(2)
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), coefficient=0.02, fused=True
    )

    def change_momentum(step):
        opt.param_groups[0]["momentum"] = 0.5 + 0.04 * step

    run(opt, model, before_step=change_momentum)
    assert opt.fused_step.compile_count == 1


@pytest.mark.parametrize("unit", [False, True])
def test_zero_norms_and_unit_trust(unit):
    model = tiny_model(3)
    with torch.no_grad():
        model[0].weight.zero_()  # stays zero under MindSpore's rule, moves with unit trust
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
        coefficient=0.02, unit_trust_on_zero_norm=unit, fused=True,
    )

    def zero_gradient(step):
        if step in (2, 5):
            model[2].weight.grad.zero_()

    run(opt, model, before_step=zero_gradient)
    assert opt.fused_step.compile_count == 1
    assert (torch.count_nonzero(model[0].weight) == 0) != unit


def test_params_without_grad_and_a_new_group():
    model = tiny_model(4)
    named = list(model.named_parameters())
    sgd = torch.optim.SGD(named[:2], lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt = lars_fx.LARS(sgd, coefficient=0.02, lars_filter=lambda p: True, fused=True)
    oracle = run(opt, model, steps=3, skip={"0.bias"})
    assert opt.state[model[0].bias] == {}
    run(opt, model, steps=3, oracle=oracle)  # 0.bias gets gradients now: its buffer is created
    count = opt.fused_step.compile_count
    opt.add_param_group({"params": named[2:], "lr": 0.3, "weight_decay": 0.0, "momentum": 0.5})
    oracle.copies.update({p: p.detach().double().clone() for _, p in named[2:]})
    run(opt, model, steps=3, oracle=oracle)
    assert opt.fused_step.compile_count == count + 1


def test_mixed_dtypes():
    model = tiny_model(5)
    model[2].to(torch.float64)
    model[0].bias.data = model[0].bias.data.to(torch.bfloat16)
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
        coefficient=0.02, lars_filter=lambda p: True, fused=True,
    )
    run(opt, model, tolerance=dict(rtol=2e-2, atol=2e-3))  # bf16 rounding of the bias


def test_non_contiguous_gradients_compile_their_own_graph():
    model = tiny_model(11)
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), coefficient=0.02, fused=True
    )

    def transpose_gradient(step):
        if step >= 5:  # same values, other strides: Inductor's kernel must not be reused
            weight = model[0].weight
            weight.grad = weight.grad.t().contiguous().t()

    run(opt, model, before_step=transpose_gradient)
    assert opt.fused_step.compile_count == 2


def test_inside_a_compiled_training_step():
    model = tiny_model(12)
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), coefficient=0.02, fused=True
    )
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))

    @torch.compile
    def train_step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    oracle = Oracle(opt)
    for _ in range(4):
        train_step()
        # replay the step's gradient (recomputed from the weights before the step) on the oracle
        with torch.no_grad():
            before = {p: oracle.copies[p].to(p.dtype) for p in oracle.copies}
        probe = tiny_model(12)
        probe.load_state_dict(
            {n: before[p] for (n, _), p in zip(probe.named_parameters(), model.parameters(), strict=True)}
        )
        probe(x).square().mean().backward()
        oracle.grads = {
            p: q.grad.double() for p, q in zip(model.parameters(), probe.parameters(), strict=True)
        }
        oracle.step()
        oracle.check(rtol=1e-4, atol=1e-6)
    assert opt.fused_step.compile_count == 1


def test_state_dict_load_into_fused():
    model = tiny_model(6)
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), **options), coefficient=0.02, fused=True)
    run(opt, model, steps=4)
    state = copy.deepcopy(opt.state_dict())  # a live state dict shares its buffers with `opt`
    restored_model = tiny_model(99)
    restored_model.load_state_dict(model.state_dict())
    restored = lars_fx.LARS(
        torch.optim.SGD(restored_model.named_parameters(), **options), coefficient=0.02, fused=True
    )
    restored.load_state_dict(state)
    for step in range(6):
        set_grads(model, step)
        set_grads(restored_model, step)
        opt.step()
        restored.step()
    for a, b in zip(model.parameters(), restored_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert restored.fused_step.compile_count == 1  # buffers came with the state: compiled from step 1


def test_telemetry_matches_eager():
    recorders = []
    for fused in (True, False):
        model = tiny_model(7)
        opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), fused=fused)
        opt.telemetry = Recorder()
        for step in range(3):
            set_grads(model, step)
            opt.step()
        recorders.append(opt.telemetry)
    fused_calls, eager_calls = (r.calls for r in recorders)
    assert len(fused_calls) == len(eager_calls) == 3
    for (gi, params, *values), (gi_e, params_e, *values_e) in zip(fused_calls, eager_calls, strict=True):
        assert gi == gi_e and [p.shape for p in params] == [p.shape for p in params_e]
        for got, want in zip(values, values_e, strict=True):
            torch.testing.assert_close(got, want)


def test_unknown_graph_falls_back_to_eager(monkeypatch, caplog):
    monkeypatch.setenv("LARS_FX_DISABLE", "insert_lars_norms")
    model = tiny_model(8)
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), coefficient=0.02, fused=True
    )
    with caplog.at_level(logging.WARNING, logger="lars_fx.fused"):
        run(opt, model, steps=3)
    assert "falls back to the eager LARS step" in caplog.text
    assert "insert_lars_norms must run before insert_trust_ratio" in opt.fused_step.fallback


def test_inspect_step_reports_every_stage():
    model = tiny_model(9)
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), fused=True)
    with pytest.raises(ValueError, match="gradients"):
        inspect_step(opt)
    set_grads(model, 0)
    before = [p.clone() for p in model.parameters()]
    report = inspect_step(opt)
    assert [name for name, _ in report.stages] == ["captured", *pipeline_names(LARS_SGD)]
    assert "trust_ratio" in report.stages[-1][1] and "trust_ratio" not in report.stages[0][1]
    assert report.node_counts[-1][1] > report.node_counts[0][1]
    assert report.kernel_count is not None and report.kernel_count > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # nothing stepped


def test_weights_written_between_steps_refresh_the_carried_norms():
    model = tiny_model(11)
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
        coefficient=0.02,
        fused=True,
    )
    oracle = Oracle(opt)
    checkpoint = copy.deepcopy(model.state_dict())

    def write_weights(step):
        with torch.no_grad():
            if step == 3:
                model[0].weight.mul_(3.0)
            if step == 5:
                model.load_state_dict(checkpoint)
            if step == 7:
                model[2].weight.copy_(torch.randn(model[2].weight.shape))
        oracle.copies.update({p: p.detach().double().clone() for p in model.parameters()})

    run(opt, model, before_step=write_weights, oracle=oracle)
    assert opt.fused_step.compile_count == 1


def test_compiled_step_bumps_the_weights_version():
    """What CarriedNorms relies on: every write of a weight, the compiled step's too, bumps its version."""
    model = tiny_model(15)
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), fused=True)
    for step in range(3):
        set_grads(model, step)
        versions = [p._version for p in model.parameters()]
        opt.step()
        assert all(p._version > v for p, v in zip(model.parameters(), versions, strict=True))
    assert opt.fused_step.compile_count == 1


def test_alternating_graphs_do_not_share_carried_norms():
    model = tiny_model(12)
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), coefficient=0.02, fused=True
    )
    oracle = Oracle(opt)
    for step, skip in enumerate([(), (), ("2.bias",), (), ("2.bias",), ("2.bias",), (), ()]):
        set_grads(model, step, skip)
        oracle.read_grads()
        opt.step()
        oracle.step()
        oracle.check()
    assert opt.fused_step.compile_count == 2


def test_without_carried_norms():
    model = tiny_model(13)
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
        coefficient=0.02, fused=True, carry_weight_norms=False,
    )
    run(opt, model)
    assert all(compiled.carry is None for compiled in opt.fused_step.cache.graphs())


def test_carried_norms_are_computed_in_the_update_loop():
    """Inductor writes the new weights straight into the parameters: no parameter-sized temporary.
    A post-grad pass the user configured runs too, before ours."""
    from torch._inductor import config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass
    from torch._inductor.utils import run_and_get_code

    class UsersPass(CustomGraphPass):
        calls = 0

        def __call__(self, graph):
            UsersPass.calls += 1

        def uuid(self):
            return "users-pass"

    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8))
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4), fused=True
    )
    set_grads(model, 0)
    opt.step()  # eager: creates the momentum buffers
    with inductor_config.patch(fx_graph_cache=False, post_grad_custom_post_pass=UsersPass()):
        _, (code,) = run_and_get_code(opt.step)
    allocated = re.findall(r"empty_strided_\w+\(\(([^)]*)\)", code)
    assert allocated and all(shape.replace(" ", "") in ("", "1,") for shape in allocated), allocated
    assert UsersPass.calls == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_on_gpu(dtype):
    model = tiny_model(10).to("cuda", dtype)
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
        coefficient=0.02, use_clip=True, fused=True,
    )
    tolerance = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else None
    oracle = Oracle(opt)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to("cuda", dtype)
        oracle.read_grads()
        opt.step()
        oracle.step()
        if dtype == torch.bfloat16:  # the oracle tracks bf16 rounding only approximately: re-anchor it
            oracle.check(**tolerance)
            oracle.copies = {p: p.detach().double().clone() for p in oracle.copies}
            oracle.buffers = {p: opt.state[p]["momentum_buffer"].double().clone() for p in oracle.buffers}
        else:
            oracle.check()
    assert opt.fused_step.fallback is None


@pytest.mark.parametrize("name", SCENARIOS)
def test_mindspore_replay_through_fused(name):
    """The MindSpore 2.10 trajectories of the foundation issue, through LARS(..., fused=True)."""
    replay_lars(name, fused=True)


def test_changed_options_compile_once_each():
    """Every option the graph bakes in is part of its cache key: a change compiles once; going back reuses."""
    model = tiny_model(16)
    with torch.no_grad():
        model[0].weight.zero_()  # stays zero until unit_trust_on_zero_norm is switched on
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2)
    opt = lars_fx.LARS(sgd, coefficient=0.02, fused=True)
    oracle, recorder, telemetry_norms = Oracle(opt), Recorder(), []

    def change(step):
        sgd.param_groups[0]["lr"] = 0.3 - 0.02 * step  # lr_inside_momentum differs only when lr changes
        if step == 2:
            opt.coefficient = 0.05
        elif step == 3:
            opt.use_clip = True
        elif step == 4:
            opt.epsilon = 0.5
        elif step == 5:
            assert torch.count_nonzero(model[0].weight) == 0
            opt.unit_trust_on_zero_norm = True
        elif step == 6:
            opt.lr_inside_momentum = True
        elif step == 7:
            opt.carry_weight_norms = False
        elif step == 8:
            with torch.no_grad():  # bypasses the version counter: only a step without carried norms sees it
                model[2].weight.data.mul_(1.5)
            oracle.copies[model[2].weight] = model[2].weight.detach().double().clone()
        elif step == 9:
            opt.telemetry = recorder
            telemetry_norms.extend(p.detach().norm() for p in (model[0].weight, model[2].weight))
        elif step == 10:  # every option back as it was at step 1: that graph is reused
            opt.coefficient, opt.use_clip, opt.epsilon = 0.02, False, 1e-5
            opt.unit_trust_on_zero_norm = opt.lr_inside_momentum = False
            opt.carry_weight_norms, opt.telemetry = True, None

    run(opt, model, steps=12, before_step=change, oracle=oracle)
    assert torch.count_nonzero(model[0].weight) > 0
    assert opt.fused_step.compile_count == 8  # steps 1-7 and 9; step 0 creates the momentum buffers eagerly
    ((group_index, params, w_norm, _, _),) = recorder.calls
    assert group_index == 0 and [id(p) for p in params] == [id(model[0].weight), id(model[2].weight)]
    torch.testing.assert_close(w_norm, torch.stack(telemetry_norms))


def test_parameters_taking_turns_stop_compiling_at_the_limit(monkeypatch):
    """A mixture of experts: each new set of parameters with gradients is a new graph, up to MAX_GRAPHS;
    later sets run the eager step (one warning), and parameters without a gradient never move."""
    monkeypatch.setattr(lars_fx.fused, "MAX_GRAPHS", 2)
    torch.manual_seed(17)
    model = nn.ModuleDict({"shared": nn.Linear(5, 4), **{f"expert{e}": nn.Linear(4, 3) for e in range(4)}})
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt = lars_fx.LARS(sgd, coefficient=0.02, fused=True)
    experts = [name for name in model if name.startswith("expert")]
    oracle = Oracle(opt)
    with pytest.warns(UserWarning, match="MAX_GRAPHS") as caught:
        for step in range(9):  # step 0: every expert (creates the buffers); then one expert per step, in turn
            idle = [] if step == 0 else [e for e in experts if e != experts[(step - 1) % 4]]
            set_grads(model, step, skip={f"{e}.{kind}" for e in idle for kind in ("weight", "bias")})
            idle_params = [p for e in idle for p in model[e].parameters()]
            idle_before = {p: (p.clone(), opt.state[p]["momentum_buffer"].clone()) for p in idle_params}
            oracle.read_grads()
            opt.step()
            oracle.step()
            oracle.check()
            for p, (value, buffer) in idle_before.items():
                assert torch.equal(p, value) and torch.equal(opt.state[p]["momentum_buffer"], buffer)
    assert len([w for w in caught if "MAX_GRAPHS" in str(w.message)]) == 1
    assert opt.fused_step.compile_count == 2  # experts 0 and 1; 2 and 3 ran eagerly, twice each


def test_parameters_without_data_are_refused():
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = nn.Linear(5, 4)
    meta = nn.Linear(4, 3, device="meta")
    params = [*real.named_parameters(prefix="real"), *meta.named_parameters(prefix="meta")]
    opt = lars_fx.LARS(torch.optim.SGD(params, lr=0.1, momentum=0.9), fused=True)
    for _, p in params:
        p.grad = torch.ones_like(p)
    before = [p.clone() for p in real.parameters()]
    where = r"'meta.weight' \(param_groups\[0\]\['params'\]\[2\]\)"
    with pytest.raises(ValueError, match=where + r": the parameter is on the meta device.*fused=False"):
        opt.step()
    # not even the eager first step ran
    assert all(torch.equal(a, b) for a, b in zip(before, real.parameters(), strict=True))
    with FakeTensorMode():
        fake = nn.Linear(5, 4)
        opt = lars_fx.LARS(torch.optim.SGD(fake.named_parameters(), lr=0.1), fused=True)
        for p in fake.parameters():
            p.grad = torch.ones_like(p)
        with pytest.raises(ValueError, match=r"'weight' .*FakeTensor.*outside FakeTensorMode"):
            opt.step()


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_one_element_lr_tensor(shape):
    """torch.optim.SGD takes an lr tensor of any one-element shape; a scheduler updates it in place."""
    model = tiny_model(18)
    sgd = torch.optim.SGD(
        model.named_parameters(), lr=torch.full(shape, 0.2), momentum=0.9, weight_decay=1e-2
    )
    opt = lars_fx.LARS(sgd, coefficient=0.02, use_clip=True, fused=True)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    run(opt, model, steps=6, before_step=lambda step: scheduler.step() if step else None)
    assert opt.param_groups[0]["lr"].shape == shape and opt.fused_step.compile_count == 1


@pytest.mark.parametrize("use_clip", [False, True])
def test_weights_past_the_float32_norm_limit_are_never_finite_and_wrong(use_clip):
    """||w||^2 is summed in float32 (as MindSpore): past ~1.8e19 it overflows. The step then writes inf/NaN,
    never a finite number that differs from the float64 reference; the other parameters step as usual."""
    gen = torch.Generator().manual_seed(19)
    huge = [nn.Parameter(torch.randn(4, 8, generator=gen) * 1e20) for _ in range(2)]
    normal = [nn.Parameter(torch.randn(4, 8, generator=gen)) for _ in range(2)]
    groups = [
        {"params": [("huge0", huge[0]), ("normal0", normal[0])], "weight_decay": 0.0},
        {"params": [("huge1", huge[1]), ("normal1", normal[1])], "weight_decay": 1e-2},
    ]
    opt = lars_fx.LARS(torch.optim.SGD(groups, lr=0.1), coefficient=0.02, use_clip=use_clip,
                       lars_filter=lambda p: True, fused=True)
    oracle = Oracle(opt)
    for p in huge + normal:
        p.grad = torch.randn(p.shape, generator=gen)
    oracle.read_grads()
    opt.step()
    oracle.step()
    assert opt.fused_step.compile_count == 1
    for p in huge:
        want = oracle.copies[p]
        assert torch.isfinite(want).all()
        got = p.detach().double()
        finite = torch.isfinite(got)
        assert not finite.all()
        torch.testing.assert_close(got[finite], want[finite], rtol=2e-5, atol=0)
    for p in normal:
        torch.testing.assert_close(p.detach().double(), oracle.copies[p], rtol=2e-5, atol=1e-6)
