"""lars_fx.LARS against the per-tensor reference, and as a torch.optim citizen."""

import copy
import itertools
import re
import warnings

import pytest
import torch
from torch import nn

import lars_fx
from lars_fx import functional as F


class Block(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(6, 8, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(8, dtype=dtype)
        self.fc2 = nn.Linear(8, 3, dtype=dtype)

    def forward(self, x):
        return self.fc2(torch.relu(self.LayerNorm(self.fc1(x))))


def _random_grads(model, gen):
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1


def _reference_run(model, grads_per_step, lrs, mask, hp, lars_options):
    """Replays a run with lars_fx.functional.lars_sgd_reference on float64 copies."""
    params = [p.detach().double().clone() for p in model.parameters()]
    buffers = [None] * len(params)
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        buffers = F.lars_sgd_reference(
            params, [g.double() for g in grads], buffers, mask, lr=lr, **hp, **lars_options
        )
    return params


SGD_OPTIONS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, maximize=False, weight_decay=1e-3),
    dict(momentum=0.9, dampening=0.0, nesterov=False, maximize=False, weight_decay=1e-4),
    dict(momentum=0.9, dampening=0.2, nesterov=False, maximize=False, weight_decay=0.0),
    dict(momentum=0.9, dampening=0.0, nesterov=True, maximize=False, weight_decay=1e-2),
    dict(momentum=0.8, dampening=0.0, nesterov=False, maximize=True, weight_decay=1e-2),
]
LARS_OPTIONS = [
    dict(coefficient=0.001, epsilon=1e-5, use_clip=False),
    dict(coefficient=0.5, epsilon=1e-5, use_clip=True),
    dict(coefficient=0.02, epsilon=1e-8, use_clip=False, unit_trust_on_zero_norm=True),
    dict(coefficient=0.02, epsilon=1e-5, use_clip=False, lr_inside_momentum=True),
]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("sgd_options,lars_options", list(itertools.product(SGD_OPTIONS, LARS_OPTIONS)))
def test_matches_reference_over_steps(sgd_options, lars_options, dtype, foreach):
    gen = torch.Generator().manual_seed(hash((str(sgd_options), str(lars_options))) % 2**31)
    model = Block(dtype)
    with torch.no_grad():
        model.fc2.bias.zero_()  # a zero-norm parameter (filtered out by the default filter)
    start = copy.deepcopy(model)
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, **sgd_options)
    opt = lars_fx.LARS(sgd, foreach=foreach, **lars_options)
    lrs = [0.1, 0.1, 0.05, 0.2, 0.08, 0.01]
    grads_per_step = []
    for lr in lrs:
        sgd.param_groups[0]["lr"] = lr
        _random_grads(model, gen)
        grads_per_step.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    hp = {k: v for k, v in sgd_options.items()}
    expected = _reference_run(start, grads_per_step, lrs, opt.lars_mask(0), hp, lars_options)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.double(), e, rtol=tol, atol=tol, msg=name)


def test_default_filter_skips_layernorm_and_bias():
    model = Block()
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1))
    names = [n for n, _ in model.named_parameters()]
    assert dict(zip(names, opt.lars_mask(0), strict=True)) == {
        "fc1.weight": True,
        "fc1.bias": False,
        "LayerNorm.weight": False,
        "LayerNorm.bias": False,
        "fc2.weight": True,
        "fc2.bias": False,
    }


def test_filter_receives_name_and_param():
    model = Block()
    seen = []

    def lars_filter(p):
        seen.append((p.name, p.param))
        return p.param.ndim > 1

    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1), lars_filter=lars_filter)
    assert [n for n, _ in seen] == [n for n, _ in model.named_parameters()]
    assert all(a is b for (_, a), b in zip(seen, model.parameters(), strict=True))
    assert opt.lars_mask(0) == [p.ndim > 1 for p in model.parameters()]


def test_non_lars_parameter_gets_plain_sgd_without_weight_decay():
    model = Block()
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.0, weight_decay=0.5)
    opt = lars_fx.LARS(sgd)
    before = model.fc1.bias.detach().clone()
    _random_grads(model, torch.Generator().manual_seed(0))
    grad = model.fc1.bias.grad.clone()
    opt.step()
    torch.testing.assert_close(model.fc1.bias.detach(), before - 0.1 * grad)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("sgd_options", SGD_OPTIONS)
def test_user_gradients_are_left_untouched(sgd_options, foreach):
    model = Block()
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, **sgd_options), foreach=foreach)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        _random_grads(model, gen)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), grads, strict=True):
            assert torch.equal(p.grad, g)


def test_grouped_weight_decay_and_lr():
    gen = torch.Generator().manual_seed(2)
    model = Block(torch.float64)
    start = copy.deepcopy(model)
    named = dict(model.named_parameters())
    groups = [
        {"params": [(n, named[n]) for n in ("fc1.weight", "fc1.bias")], "weight_decay": 1e-2, "lr": 0.2},
        {"params": [(n, named[n]) for n in ("LayerNorm.weight", "LayerNorm.bias", "fc2.weight", "fc2.bias")]},
    ]
    sgd = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.0)
    opt = lars_fx.LARS(sgd, coefficient=0.02)
    grads = []
    for _ in range(4):
        _random_grads(model, gen)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    for group, mask in zip(sgd.param_groups, [opt.lars_mask(0), opt.lars_mask(1)], strict=True):
        names = group["param_names"]
        ref_params = [dict(start.named_parameters())[n].detach().clone() for n in names]
        bufs = [None] * len(names)
        for step_grads in grads:
            bufs = F.lars_sgd_reference(
                ref_params, [step_grads[n] for n in names], bufs, mask,
                lr=group["lr"], weight_decay=group["weight_decay"], momentum=0.9, coefficient=0.02,
            )
        for n, e in zip(names, ref_params, strict=True):
            torch.testing.assert_close(named[n].detach(), e, rtol=1e-12, atol=1e-14)
    assert sgd.param_groups[0]["weight_decay"] == 1e-2  # the user's setting is kept


def test_clip_follows_a_scheduler_moving_lr():
    gen = torch.Generator().manual_seed(4)
    model = Block(torch.float64)
    start = copy.deepcopy(model)
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    opt = lars_fx.LARS(sgd, coefficient=0.3, use_clip=True)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=8, power=2)
    lrs, grads = [], []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        _random_grads(model, gen)
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5 * (1 - t / 8) ** 2 for t in range(6)])
    hp = dict(momentum=0.9, weight_decay=1e-3)
    expected = _reference_run(start, grads, lrs, opt.lars_mask(0), hp, dict(coefficient=0.3, use_clip=True))
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


def test_state_dict_resume_gives_identical_trajectory():
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen) for p in Block().parameters()] for _ in range(6)]

    def make(model):
        sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        opt = lars_fx.LARS(sgd, coefficient=0.02, use_clip=True)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def run(model, opt, sched, steps):
        for step in steps:
            for p, g in zip(model.parameters(), grads[step], strict=True):
                p.grad = g.clone()
            opt.step()
            sched.step()

    torch.manual_seed(0)
    straight = Block()
    first = copy.deepcopy(straight)
    opt, sched = make(straight)
    run(straight, opt, sched, range(6))

    opt1, sched1 = make(first)
    run(first, opt1, sched1, range(3))
    saved = copy.deepcopy((first.state_dict(), opt1.state_dict(), sched1.state_dict()))
    resumed = Block()
    resumed.load_state_dict(saved[0])
    opt2, sched2 = make(resumed)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert opt2.optimizer.state is opt2.state and opt2.optimizer.param_groups is opt2.param_groups
    run(resumed, opt2, sched2, range(3, 6))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_zero_grad_closure_hooks_and_add_param_group():
    model = Block()
    extra = nn.Linear(2, 2)
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x = torch.randn(4, 6)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]

    opt.add_param_group({"params": list(extra.named_parameters()), "lr": 0.3})
    assert opt.optimizer.param_groups[1]["lr"] == 0.3 and opt.lars_mask(1) == [True, False]
    before = extra.weight.detach().clone()
    extra.weight.grad = torch.ones_like(extra.weight)
    opt.step()
    assert not torch.equal(before, extra.weight)

    opt.zero_grad(set_to_none=False)
    assert torch.count_nonzero(model.fc1.weight.grad) == 0
    opt.zero_grad()
    assert model.fc1.weight.grad is None


def test_params_without_grad_and_frozen_params_are_untouched():
    model = Block()
    model.fc2.weight.requires_grad_(False)
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.fc1.weight.grad = torch.randn_like(model.fc1.weight)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n != "fc1.weight"), n
    assert set(opt.state) == {model.fc1.weight}


def test_bf16_parameters_match_reference_computed_in_float32():
    gen = torch.Generator().manual_seed(6)
    model = Block(torch.bfloat16)
    start = copy.deepcopy(model)
    opt = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3), coefficient=0.02
    )
    ref = lars_fx.LARS(torch.optim.SGD(start.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
                       coefficient=0.02, foreach=False)
    for _ in range(4):
        _random_grads(model, gen)
        for p, q in zip(model.parameters(), start.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), start.parameters(), strict=True):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)
    assert opt.state[model.fc1.weight]["momentum_buffer"].dtype == torch.bfloat16


def test_inner_adam_steps_with_scaled_gradients_and_no_weight_decay():
    gen = torch.Generator().manual_seed(8)
    model = Block(torch.float64)
    twin = copy.deepcopy(model)
    opt = lars_fx.LARS(
        torch.optim.Adam(model.named_parameters(), lr=1e-2, weight_decay=0.1), coefficient=0.05
    )
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2, weight_decay=0.0)
    mask = opt.lars_mask(0)
    for _ in range(3):
        _random_grads(model, gen)
        for p, q, use_lars in zip(model.parameters(), twin.parameters(), mask, strict=True):
            g = p.grad
            if use_lars:
                q.grad = F.lars_gradient(q, g, weight_decay=0.1, coefficient=0.05, epsilon=1e-5)
            else:
                q.grad = g.clone()
        opt.step()
        adam.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert opt.param_groups[0]["weight_decay"] == 0.1


def test_nonfinite_gradients_propagate_by_default_and_can_skip_the_step():
    model = Block()
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9))
    _random_grads(model, torch.Generator().manual_seed(0))
    model.fc1.weight.grad[0, 0] = float("nan")
    opt.step()
    assert model.fc1.weight.isnan().any()

    model = Block()
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), skip_nonfinite=True)
    before = [p.detach().clone() for p in model.parameters()]
    _random_grads(model, torch.Generator().manual_seed(0))
    model.fc2.bias.grad[0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1 and len(opt.state) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model.fc2.bias.grad[0] = 0.0
    opt.step()
    assert opt.skipped_steps == 1 and not torch.equal(before[0], model.fc1.weight)


def test_compiled_step_has_no_graph_break_and_matches_eager():
    torch._dynamo.reset()
    model = Block()
    twin = copy.deepcopy(model)
    opts = [
        lars_fx.LARS(
            torch.optim.SGD(m.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4), coefficient=0.02
        )
        for m in (model, twin)
    ]
    gen = torch.Generator().manual_seed(9)
    _random_grads(model, gen)
    explanation = torch._dynamo.explain(opts[0].step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled_step = torch.compile(opts[1].step)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = p.grad.clone()
    compiled_step()
    for _ in range(3):
        _random_grads(model, gen)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            q.grad = p.grad.clone()
        opts[0].step()
        compiled_step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- bad input ---------------------------------------------------------------------------------


def _sgd(**kwargs):
    return torch.optim.SGD(Block().named_parameters(), **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(epsilon=float("nan")), ValueError, "epsilon"),
        (dict(coefficient=-1.0), ValueError, "coefficient"),
        (dict(coefficient="big"), TypeError, "coefficient"),
        (dict(lars_filter="bias"), TypeError, "lars_filter"),
        (dict(use_clip=1), TypeError, "use_clip"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, words):
    with pytest.raises(error, match=words):
        lars_fx.LARS(_sgd(), **kwargs)


def test_bad_wrapped_object_and_group_values():
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        lars_fx.LARS([p for p in Block().parameters()])
    with pytest.raises(TypeError, match="only once"):
        lars_fx.LARS(lars_fx.LARS(_sgd()))
    with pytest.raises(ValueError, match=r"weight_decay"):
        sgd = _sgd()
        sgd.param_groups[0]["weight_decay"] = float("inf")
        lars_fx.LARS(sgd)
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        sgd = _sgd()
        sgd.param_groups[0]["lr"] = float("nan")
        lars_fx.LARS(sgd)
    adam = torch.optim.Adam(Block().named_parameters())
    with pytest.raises(ValueError, match="lr_inside_momentum"):
        lars_fx.LARS(adam, lr_inside_momentum=True)


def test_missing_names_error_says_how_to_fix():
    with pytest.raises(ValueError, match="named_parameters"):
        lars_fx.LARS(torch.optim.SGD(Block().parameters(), lr=0.1))
    # A filter that does not read names needs none.
    opt = lars_fx.LARS(torch.optim.SGD(Block().parameters(), lr=0.1), lars_filter=lambda p: p.param.ndim > 1)
    assert opt.lars_mask(0) == [True, False, False, False, True, False]


def test_sparse_and_complex_gradients_are_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = lars_fx.LARS(torch.optim.SGD(emb.named_parameters(), lr=0.1))
    emb(torch.tensor([1, 2])).sum().backward()
    where = r"'weight' \(param_groups\[0\]\['params'\]\[0\]\)"
    with pytest.raises(ValueError, match=r"LARS got a sparse gradient for " + where):
        opt.step()

    w = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = lars_fx.LARS(torch.optim.SGD([("w", w)], lr=0.1))
    w.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"LARS got a complex gradient for 'w' \(param_groups"):
        opt.step()


def _reference_steps(model, grads_per_step, settings, sgd_options):
    """float64 replay where every step has its own LARS options, lr and mask:
    ``settings[k] = (lr, mask, lars)``."""
    params = [p.detach().double().clone() for p in model.parameters()]
    buffers = [None] * len(params)
    for grads, (lr, mask, lars_options) in zip(grads_per_step, settings, strict=True):
        buffers = F.lars_sgd_reference(
            params, [g.double() for g in grads], buffers, mask, lr=lr, **sgd_options, **lars_options
        )
    return params


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per_tensor"])
def test_options_changed_mid_run_take_effect_at_the_next_step(foreach):
    gen = torch.Generator().manual_seed(7)
    model = Block(torch.float64)
    start = copy.deepcopy(model)
    sgd_options = dict(momentum=0.9, dampening=0.0, nesterov=False, maximize=False, weight_decay=1e-3)
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, **sgd_options), foreach=foreach)
    lars = dict(coefficient=0.001, epsilon=1e-5, use_clip=False, unit_trust_on_zero_norm=False,
                lr_inside_momentum=False)
    changes = {
        2: dict(coefficient=0.05), 3: dict(use_clip=True), 4: dict(epsilon=1e-3),
        5: dict(unit_trust_on_zero_norm=True),
        6: dict(lr_inside_momentum=True), 7: dict(lars_filter=lambda p: "fc1" in p.name),
    }
    grads_per_step, settings = [], []
    for step in range(9):
        for name, value in changes.get(step, {}).items():
            setattr(opt, name, value)
            if name != "lars_filter":
                lars[name] = value
        lr = 0.1 / (step + 1)
        opt.param_groups[0]["lr"] = lr
        _random_grads(model, gen)
        grads_per_step.append([p.grad.clone() for p in model.parameters()])
        settings.append((lr, opt.lars_mask(0), dict(lars)))
        opt.step()
    assert settings[-1][1] == ["fc1" in name for name, _ in model.named_parameters()]
    expected = _reference_steps(start, grads_per_step, settings, sgd_options)
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-10, atol=1e-10, msg=name)


def test_options_are_checked_when_set():
    model = Block()
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1))
    with pytest.raises(ValueError, match="coefficient"):
        opt.coefficient = -1.0
    with pytest.raises(ValueError, match="epsilon"):
        opt.epsilon = 0.0
    with pytest.raises(TypeError, match="use_clip must be True or False"):
        opt.use_clip = 1
    with pytest.raises(TypeError, match="lars_filter must be callable"):
        opt.lars_filter = "bias"
    assert opt.coefficient == 0.001 and opt.epsilon == 1e-5 and opt.use_clip is False
    adam = lars_fx.LARS(torch.optim.Adam(model.named_parameters(), lr=0.1))
    for name in ("lr_inside_momentum", "fused"):
        with pytest.raises(ValueError, match=f"{name}=True needs torch.optim.SGD"):
            setattr(adam, name, True)


def test_parameter_appended_to_a_group_is_stepped():
    model = Block(torch.float64)
    named = list(model.named_parameters())
    sgd = torch.optim.SGD(named[:2], lr=0.1, momentum=0.9)
    opt = lars_fx.LARS(sgd)
    extra_name, extra = named[-2]  # fc2.weight: gets LARS
    sgd.param_groups[0]["params"].append(extra)
    sgd.param_groups[0]["param_names"].append(extra_name)
    start = extra.detach().clone()
    extra.grad = torch.randn_like(extra)
    for p, _ in [(p, n) for n, p in named[:2]]:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.lars_mask(0) == [True, False, True]
    expected = [start.clone()]
    F.lars_sgd_reference(expected, [extra.grad], [None], [True], lr=0.1, weight_decay=0.0, momentum=0.9)
    torch.testing.assert_close(extra, expected[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per_tensor"])
@pytest.mark.parametrize(
    "key,value,words",
    [
        ("lr", float("nan"), "'lr'] must be a finite number >= 0, got nan"),
        ("lr", -0.1, "'lr'] must be a finite number >= 0, got -0.1"),
        ("lr", torch.tensor(float("inf")), "'lr'] must be a finite number >= 0, got inf"),
        ("weight_decay", -1e-4, "'weight_decay'] must be a finite number >= 0"),
        ("momentum", float("nan"), "'momentum'] must be a finite number >= 0"),
        ("momentum", -0.9, "'momentum'] must be a finite number >= 0"),
        ("dampening", float("inf"), "'dampening'] must be a finite number >= 0"),
    ],
)
def test_group_hyperparameters_set_after_construction_are_checked(key, value, words, foreach):
    model = Block()
    opt = lars_fx.LARS(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), foreach=foreach)
    _random_grads(model, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=re.escape(words)):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_skip_nonfinite_keeps_finite_half_precision_gradients():
    # Their sum of magnitudes overflows fp16 (> 65504) although every element is finite: not a reason to skip.
    w = nn.Parameter(torch.ones(4096, dtype=torch.float16))
    opt = lars_fx.LARS(torch.optim.SGD([("w", w)], lr=0.1), skip_nonfinite=True, lars_filter=lambda p: False)
    w.grad = torch.full_like(w, 60.0)
    opt.step()
    assert opt.skipped_steps == 0 and not torch.equal(w, torch.ones_like(w))
    w.grad[0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1


def test_compiled_step_over_adam_with_a_float_lr_says_to_use_a_tensor_lr(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    model = nn.Linear(4, 2)
    for lr, warns in ((0.01, True), (torch.tensor(0.01), False)):
        opt = lars_fx.LARS(torch.optim.Adam(model.named_parameters(), lr=lr))
        model(torch.randn(3, 4)).sum().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.compile(opt.step, backend="eager")()
        said = [str(w.message) for w in caught if "tensor lr" in str(w.message)]
        assert bool(said) == warns, said
    torch._dynamo.reset()
