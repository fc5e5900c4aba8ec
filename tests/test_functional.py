"""The LARS math in lars_fx.functional: the formula itself, and foreach == per-tensor reference."""

import math

import pytest
import torch

from lars_fx import functional as F

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (32, 9)]


def _norm(t: torch.Tensor) -> float:
    return math.sqrt(sum(float(x) ** 2 for x in t.double().flatten()))


def test_trust_ratio_is_mindspores_formula():
    torch.manual_seed(0)
    w, g = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    wd, coefficient, epsilon = 1e-2, 0.02, 1e-5
    expected = coefficient * _norm(w) / (_norm(g) + wd * _norm(w) + epsilon)
    update = F.lars_gradient(w, g, weight_decay=wd, coefficient=coefficient, epsilon=epsilon)
    expected_update = expected * (g + wd * w)
    torch.testing.assert_close(update, expected_update, rtol=1e-12, atol=0)


@pytest.mark.parametrize("lr", [0.5, 0.01])
def test_clip_divides_by_lr_and_clamps_to_unit_interval(lr):
    w_norm = torch.tensor([3.0, 0.0, 0.2], dtype=torch.float64)
    g_norm = torch.tensor([0.1, 1.0, 50.0], dtype=torch.float64)
    raw = F.trust_ratio(w_norm, g_norm, weight_decay=0.0, coefficient=0.5, epsilon=1e-5)
    clipped = F.trust_ratio(
        w_norm, g_norm, weight_decay=0.0, coefficient=0.5, epsilon=1e-5, use_clip=True, lr=lr
    )
    torch.testing.assert_close(clipped, torch.clamp(raw / lr, 0, 1))
    assert clipped[0] == 1.0 and clipped[1] == 0.0


def test_clip_at_zero_lr_keeps_a_zero_coefficient_finite():
    w_norm = torch.tensor([0.0, 2.0])
    g_norm = torch.tensor([1.0, 1.0])
    clipped = F.trust_ratio(
        w_norm, g_norm, weight_decay=0.0, coefficient=0.5, epsilon=1e-5, use_clip=True, lr=0.0
    )
    assert clipped.tolist() == [0.0, 1.0]
    nan_grad = F.trust_ratio(w_norm, torch.tensor([float("nan")] * 2), weight_decay=0.0, coefficient=0.5,
                             epsilon=1e-5, use_clip=True, lr=0.1)
    assert nan_grad.isnan().all()  # non-finite gradients still propagate


def test_use_clip_without_lr_is_an_error():
    with pytest.raises(ValueError, match="lr"):
        F.trust_ratio(torch.tensor(1.0), torch.tensor(1.0), weight_decay=0.0, coefficient=0.1, epsilon=1e-5,
                      use_clip=True)


def test_zero_norms_mindspore_versus_unit_convention():
    zeros, ones = torch.zeros(4), torch.ones(4)
    options = dict(weight_decay=1e-4, coefficient=0.001, epsilon=1e-5)
    # MindSpore: coeff = 0 when ||w|| = 0, so the update vanishes.
    assert torch.count_nonzero(F.lars_gradient(zeros, ones, **options)) == 0
    # timm/apex: trust ratio 1 when either norm is 0.
    torch.testing.assert_close(F.lars_gradient(zeros, ones, unit_trust_on_zero_norm=True, **options), ones)
    torch.testing.assert_close(
        F.lars_gradient(ones, zeros, unit_trust_on_zero_norm=True, **options), 1e-4 * ones
    )
    # MindSpore with g = 0: coeff = c||w|| / (wd||w|| + eps), finite.
    expected = 0.001 * 2.0 / (1e-4 * 2.0 + 1e-5) * 1e-4
    torch.testing.assert_close(F.lars_gradient(ones, zeros, **options), torch.full((4,), expected))


def _random_tensors(dtypes, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dt) for s, dt in zip(SHAPES, dtypes, strict=True)]
    grads = [torch.randn(s, generator=gen).to(dt) * 0.1 for s, dt in zip(SHAPES, dtypes, strict=True)]
    return params, grads


@pytest.fixture(params=[False, True], ids=["eager", "as_under_compile"])
def as_under_compile(request, monkeypatch):
    """Under torch.compile the foreach entry points hold lr, weight decay, momentum and dampening as
    0-d float64 tensors (``_graph_inputs``); this runs that arithmetic in eager, for every dtype."""
    if request.param:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert all(isinstance(h, torch.Tensor) and h.dtype == torch.float64 for h in F._graph_inputs(0.1, 0))
    return request.param


@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float64] * 5,
        [torch.float32] * 5,
        [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32],
    ],
    ids=["f64", "f32", "mixed"],
)
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("use_clip", [False, True])
def test_foreach_matches_per_tensor_reference(dtypes, maximize, use_clip, as_under_compile):
    params, grads = _random_tensors(dtypes, seed=len(dtypes) + maximize + 2 * use_clip)
    mask = [True, True, False, True, True]
    options = dict(
        weight_decay=1e-3, coefficient=0.5, epsilon=1e-5, use_clip=use_clip, lr=0.3, maximize=maximize
    )
    result = F.lars_gradients_foreach(params, grads, mask, **options)
    for p, g, use_lars, got in zip(params, grads, mask, result.updates, strict=True):
        expected = F.lars_gradient(p, g, **options) if use_lars else (-g if maximize else g)
        assert got.dtype == g.dtype
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(g.dtype, 1e-2)
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    lars_params = [p for p, m in zip(params, mask, strict=True) if m]
    w_norms = torch.tensor([_norm(p) for p in lars_params], dtype=result.norms.w_norm.dtype)
    torch.testing.assert_close(result.norms.w_norm, w_norms, rtol=1e-5, atol=0)
    assert result.norms.trust_ratio.shape == (4,)


def test_norms_of_half_precision_are_float32():
    params, grads = _random_tensors([torch.bfloat16] * 5, seed=3)
    result = F.lars_gradients_foreach(
        params, grads, [True] * 5, weight_decay=0.0, coefficient=1.0, epsilon=1e-5
    )
    assert result.norms.w_norm.dtype == torch.float32 and result.norms.trust_ratio.dtype == torch.float32


@pytest.mark.parametrize("lr_inside_momentum", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize(
    "momentum,dampening,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.8, 0.3, False), (0.9, 0.0, True)]
)
def test_lars_sgd_foreach_matches_reference(momentum, dampening, nesterov, maximize, lr_inside_momentum,
                                            as_under_compile):
    dtypes = [torch.float64, torch.float32, torch.float64, torch.bfloat16, torch.float64]
    params, _ = _random_tensors(dtypes, seed=11)
    reference = [p.clone() for p in params]
    mask = [True, False, True, True, False]
    fast_buffers, ref_buffers = [None] * 5, [None] * 5
    gen = torch.Generator().manual_seed(12)
    hp = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize, weight_decay=1e-2,
              coefficient=0.3, use_clip=True, lr_inside_momentum=lr_inside_momentum)
    for lr in [0.1, 0.05, 0.2, 0.0, 0.1]:
        grads = [torch.randn(s, generator=gen).to(dt) for s, dt in zip(SHAPES, dtypes, strict=True)]
        lars_params = [p.clone() for p, m in zip(params, mask, strict=True) if m]
        norms = F.lars_sgd_foreach(params, grads, fast_buffers, mask, lr=lr, **hp)
        ref_buffers = F.lars_sgd_reference(reference, grads, ref_buffers, mask, lr=lr, **hp)
        for got, expected in zip(params + fast_buffers, reference + ref_buffers, strict=True):
            if expected is None:
                assert got is None
                continue
            tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(got.dtype, 1e-2)
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(
        norms.w_norm, torch.tensor([_norm(p) for p in lars_params]), rtol=1e-5, atol=0, check_dtype=False
    )
    assert norms.trust_ratio.shape == (3,)


def test_lr_inside_momentum_differs_only_when_lr_changes():
    gen = torch.Generator().manual_seed(1)
    updates = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(4)]

    def run(lrs, lr_inside):
        w, buf = torch.zeros(5, dtype=torch.float64), None
        for u, lr in zip(updates, lrs, strict=True):
            buf = F.momentum_update(w, u, buf, lr=lr, momentum=0.9, lr_inside_momentum=lr_inside)
        return w

    torch.testing.assert_close(run([0.1] * 4, True), run([0.1] * 4, False))
    assert not torch.allclose(run([0.1, 0.2, 0.05, 0.1], True), run([0.1, 0.2, 0.05, 0.1], False))


@pytest.mark.parametrize("use_clip", [False, True])
@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_a_norm_past_float32_range_never_gives_a_finite_wrong_step(weight_decay, unit, use_clip):
    # ||g||^2 of gradients around 1e20 overflows float32: the ratio must not silently become 0 (no step).
    param = torch.randn(32, 64)
    grad = torch.full((32, 64), 1e20)
    options = dict(weight_decay=weight_decay, coefficient=0.001, epsilon=1e-5, use_clip=use_clip, lr=0.1,
                   unit_trust_on_zero_norm=unit)
    u = F.lars_gradient(param, grad, **options)
    assert not u.isfinite().any()
    foreach = F.lars_gradients_foreach([param], [grad], [True], **options)
    assert not foreach.updates[0].isfinite().any() and foreach.norms.trust_ratio.isnan().all()
    # The float64 reference stays finite: the limit is float32's, and documented.
    assert F.lars_gradient(param.double(), grad.double(), **options).isfinite().all()
