"""torch.optim's own test habits, applied to lars_fx.LARS in every mode that holds a LARS object: copies,
pickles, state dicts (old and new), hooks, tensor lrs of every shape SGD takes, steps without gradients or
with zero gradients, parameters added behind the wrapper's back, bad hyperparameters, and the inputs every
mode must refuse alike (complex, sparse) or handle without data (meta, fake)."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import lars_fx
from lars_fx import functional as F
from lars_modes import lars_step_in_mode

MODES = ("foreach", "per_tensor", "fused", "flat")


def mode_flags(mode: str) -> dict[str, bool]:
    return {"foreach": mode != "per_tensor", "fused": mode == "fused", "flat": mode == "flat"}
SGD_OPTIONS = dict(lr=0.2, momentum=0.9, weight_decay=1e-3)
LARS_OPTIONS = dict(coefficient=0.05, use_clip=True)


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(5, 6)
        self.LayerNorm = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)


def make(mode: str, optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, seed: int = 0,
         **lars_options: Any) -> tuple[Net, lars_fx.LARS]:
    model = Net(seed)
    inner_options = SGD_OPTIONS if optimizer is torch.optim.SGD else dict(lr=1e-2, weight_decay=1e-3)
    inner = optimizer(model.named_parameters(), **inner_options)
    options = {**LARS_OPTIONS, **lars_options}
    return model, lars_fx.LARS(inner, **mode_flags(mode), **options)


def set_grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def step_both(pairs: list[tuple[nn.Module, torch.optim.Optimizer]], steps: range) -> None:
    for step in steps:
        for model, opt in pairs:
            set_grads(model, step)
            opt.step()


def assert_same_run(
    a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]
) -> None:
    """Bitwise the same, but for a fused step starting afresh: it computes the weight norms that a running one
    carries from its last update loop (another summation order: float32 rounding apart)."""
    (model_a, opt_a), (model_b, opt_b) = a, b
    fused = getattr(opt_a, "fused", False) and opt_a.carry_weight_norms
    tolerance = dict(rtol=1e-6, atol=1e-7) if fused else dict(rtol=0, atol=0)
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tolerance, msg=name)
        buf_a = opt_a.state[p].get("momentum_buffer")
        buf_b = opt_b.state[q].get("momentum_buffer")
        assert (buf_a is None) == (buf_b is None), name
        if buf_a is not None:
            torch.testing.assert_close(buf_a, buf_b, **tolerance, msg=name)


def reference_after(model: nn.Module, grads_per_step: list[list[Tensor]], lrs: list[float], mask: list[bool],
                    **options: Any) -> list[Tensor]:
    """Float64 copies of ``model``'s parameters after replaying ``grads_per_step`` on the reference."""
    params = [p.detach().double().clone() for p in model.parameters()]
    buffers: list[Tensor | None] = [None] * len(params)
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        buffers = F.lars_sgd_reference(params, [g.double() for g in grads], buffers, mask, lr=lr, **options)
    return params


REFERENCE_OPTIONS = dict(momentum=0.9, weight_decay=1e-3, **LARS_OPTIONS)


def moved(before: list[Tensor], model: nn.Module) -> list[str]:
    pairs = zip(model.named_parameters(), before, strict=True)
    return [name for (name, p), b in pairs if not torch.equal(p, b)]


def causes(error: BaseException) -> list[BaseException]:
    """The error and what it wraps (Dynamo wraps a backend's error in BackendCompilerFailed)."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or getattr(error, "inner_exception", None) or error.__context__
    return chain


# -- copies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("mode", MODES)
def test_a_copy_steps_like_the_original(mode, copier):
    original = make(mode)
    step_both([original], range(2))
    if copier == "deepcopy":
        twin = copy.deepcopy(original)
    else:
        twin = pickle.loads(pickle.dumps(original))
    model, opt = twin
    assert opt.param_groups[0]["params"][0] is model.fc1.weight
    assert [opt.lars_mask(i) for i in range(len(opt.param_groups))] == [
        original[1].lars_mask(i) for i in range(len(original[1].param_groups))
    ]
    assert (opt.coefficient, opt.use_clip, opt.fused, opt.foreach) == (
        0.05, True, mode == "fused", mode != "per_tensor"
    )
    step_both([original, twin], range(2, 5))
    assert_same_run(original, twin)


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_a_copy_keeps_recording_telemetry(copier):
    original = make("foreach", telemetry=True)
    step_both([original], range(2))
    twin = copy.deepcopy(original) if copier == "deepcopy" else pickle.loads(pickle.dumps(original))
    step_both([original, twin], range(2, 4))
    assert twin[1].telemetry is not None
    assert twin[1].telemetry.to_records() == original[1].telemetry.to_records()


def test_a_copy_over_adam_steps_like_the_original():
    original = make("foreach", torch.optim.Adam)
    step_both([original], range(2))
    twin = pickle.loads(pickle.dumps(original))
    step_both([original, twin], range(2, 4))
    for p, q in zip(original[0].parameters(), twin[0].parameters(), strict=True):
        assert torch.equal(p, q)


# -- state dicts ----------------------------------------------------------------------------------------


def assert_same_structure(a: Any, b: Any, where: str = "state_dict") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_structure(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_structure(x, y, f"{where}[{k}]")
    elif isinstance(a, Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_is_deterministic_and_resumes_exactly(mode):
    original = make(mode)
    step_both([original], range(3))
    first, second = original[1].state_dict(), original[1].state_dict()
    assert_same_structure(first, second)
    saved = copy.deepcopy(first)

    resumed = make(mode, seed=7)
    resumed[0].load_state_dict(original[0].state_dict())
    resumed[1].load_state_dict(saved)
    assert_same_structure(resumed[1].state_dict(), first)
    step_both([original, resumed], range(3, 6))
    assert_same_run(original, resumed)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_loads_into_plain_sgd_and_back(mode):
    model, opt = make(mode)
    step_both([(model, opt)], range(3))
    sgd = torch.optim.SGD(copy.deepcopy(model).named_parameters(), **SGD_OPTIONS)
    sgd.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(model.parameters(), sgd.param_groups[0]["params"], strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])

    # A plain SGD state dict (what an older lars-fx, or a run without LARS, saved) loads into a LARS
    # and the LARS keeps its own options.
    plain = copy.deepcopy(sgd.state_dict())
    twin_model = copy.deepcopy(model)
    twin = lars_fx.LARS(torch.optim.SGD(twin_model.named_parameters(), **SGD_OPTIONS),
                        **mode_flags(mode), **LARS_OPTIONS)
    twin.load_state_dict(plain)
    assert (twin.coefficient, twin.use_clip) == (0.05, True)
    step_both([(model, opt), (twin_model, twin)], range(3, 6))
    assert_same_run((model, opt), (twin_model, twin))


@pytest.mark.parametrize("mode", MODES)
def test_older_state_dict_without_our_keys(mode):
    """Keys a newer lars-fx may add to the state dict (top level or per group) are optional when loading."""
    model, opt = make(mode)
    step_both([(model, opt)], range(3))
    sgd_keys = set(torch.optim.SGD(Net().named_parameters(), **SGD_OPTIONS).state_dict()["param_groups"][0])
    saved = copy.deepcopy(opt.state_dict())
    older = {"state": saved["state"], "param_groups": [{k: v for k, v in g.items() if k in sgd_keys}
                                                        for g in saved["param_groups"]]}
    twin_model = copy.deepcopy(model)
    twin = lars_fx.LARS(torch.optim.SGD(twin_model.named_parameters(), **SGD_OPTIONS),
                        **mode_flags(mode), **LARS_OPTIONS)
    twin.load_state_dict(older)
    step_both([(model, opt), (twin_model, twin)], range(3, 6))
    assert_same_run((model, opt), (twin_model, twin))


# -- hooks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer,mode", [(torch.optim.SGD, m) for m in MODES] + [
    (torch.optim.Adam, "foreach"), (torch.optim.Adam, "per_tensor"), (torch.optim.AdamW, "foreach")])
def test_step_hooks_fire_once_per_step(optimizer, mode):
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model, opt = make(mode, optimizer)
    calls: list[tuple[str, Any]] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global pre", o))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("global post", o))),
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o))),
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o))),
    ]
    try:
        step_both([(model, opt)], range(3))
    finally:
        for handle in handles:
            handle.remove()
    kinds = [kind for kind, _ in calls]
    assert sorted(kinds) == sorted(["global pre", "pre", "post", "global post"] * 3), kinds
    assert all(o is opt for _, o in calls), "a hook saw another optimizer than the one stepped"


# -- tensor lr of every shape torch.optim.SGD takes ----------------------------------------------------------


# where the lr meets the other options: the clip's coeff / lr, nesterov, lr inside momentum
TENSOR_LR_OPTIONS = {
    "clip-nesterov": (dict(nesterov=True), dict(use_clip=True)),
    "lr_inside_momentum-dampening": (dict(dampening=0.2), dict(lr_inside_momentum=True)),
}


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1", "1x1"])
@pytest.mark.parametrize("options", TENSOR_LR_OPTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_tensor_lr_of_every_shape(mode, options, shape):
    """torch.optim.SGD takes a one-element lr tensor of any shape; so must every mode."""
    sgd_options, lars_options = TENSOR_LR_OPTIONS[options]
    lr = torch.full(shape, 0.2)
    model = Net()
    sgd = torch.optim.SGD(model.named_parameters(), lr=lr, momentum=0.9, weight_decay=1e-3, **sgd_options)
    opt = lars_fx.LARS(sgd, coefficient=0.05, **mode_flags(mode),
                       **{"use_clip": False, **lars_options})
    start = copy.deepcopy(model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    grads, lrs = [], []
    for step in range(4):
        set_grads(model, step)
        grads.append([p.grad.clone() for p in model.parameters()])
        lrs.append(float(opt.param_groups[0]["lr"].reshape(())))
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"].shape == shape
    expected = reference_after(start, grads, lrs, opt.lars_mask(0), momentum=0.9, weight_decay=1e-3,
                               coefficient=0.05, **sgd_options, **{"use_clip": False, **lars_options})
    for (name, p), want in zip(model.named_parameters(), expected, strict=True):
        assert p.shape == want.shape, name
        torch.testing.assert_close(p.detach().double(), want, rtol=2e-5, atol=2e-6, msg=name)


# -- steps without gradients, and with zero gradients --------------------------------------------------------


@pytest.mark.parametrize("optimizer,mode", [(torch.optim.SGD, m) for m in MODES] + [
    (torch.optim.Adam, "foreach"), (torch.optim.Adam, "per_tensor")])
@pytest.mark.parametrize(
    "extra", [{}, dict(skip_nonfinite=True), dict(telemetry=True)], ids=["", "skip", "telemetry"]
)
def test_a_step_without_gradients_moves_nothing(optimizer, mode, extra):
    model, opt = make(mode, optimizer, **extra)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step(lambda: 1.5) == 1.5
    opt.step()
    assert moved(before, model) == []
    assert len(opt.state) == 0
    assert opt.skipped_steps == 0
    if opt.telemetry is not None:
        assert opt.telemetry.to_records() == []


@pytest.mark.parametrize("mode", ["compiled_step", "backend"])
def test_a_compiled_step_without_gradients_moves_nothing(mode):
    torch._dynamo.reset()
    model, step, opt = _stepper(mode)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    step()
    assert moved(before, model) == []
    assert len(opt.state) == 0


@pytest.mark.parametrize("unit", [False, True], ids=["mindspore", "unit_trust"])
@pytest.mark.parametrize("mode", MODES)
def test_zero_gradients_step_as_the_reference_says(mode, unit):
    model, opt = make(mode, unit_trust_on_zero_norm=unit)
    start = copy.deepcopy(model)
    grads = []
    for step in range(4):
        set_grads(model, step)
        if step in (1, 2):
            opt.zero_grad(set_to_none=False)
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    expected = reference_after(start, grads, [0.2] * 4, opt.lars_mask(0), unit_trust_on_zero_norm=unit,
                               **REFERENCE_OPTIONS)
    for (name, p), want in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach().double(), want, rtol=2e-5, atol=2e-6, msg=name)


# -- a parameter added to a group behind the wrapper's back --------------------------------------------------


@pytest.mark.parametrize("with_name", [True, False], ids=["named", "unnamed"])
@pytest.mark.parametrize("mode", MODES)
def test_a_parameter_appended_to_a_group_is_stepped_or_refused(mode, with_name):
    model, opt = make(mode)
    step_both([(model, opt)], range(2))
    extra = nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(9)))
    group = opt.param_groups[0]
    group["params"].append(extra)
    if with_name:
        group["param_names"].append("extra.weight")
    extra.grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(10))
    set_grads(model, 2)
    before = extra.detach().double().clone()
    others = [p.detach().clone() for p in model.parameters()]
    try:
        opt.step()
    except (ValueError, RuntimeError, KeyError, IndexError) as error:
        assert "param" in str(error), f"the refusal does not say what is wrong: {error}"
        assert torch.equal(extra.double(), before) and moved(others, model) == [], (
            "refused after moving numbers"
        )
        return
    use_lars = opt.lars_mask(0)[-1]
    assert use_lars or not with_name, "the default filter gives extra.weight LARS"
    want = [before]
    F.lars_sgd_reference(want, [extra.grad.double()], [None], [use_lars], lr=0.2, **REFERENCE_OPTIONS)
    torch.testing.assert_close(extra.detach().double(), want[0], rtol=2e-5, atol=2e-6)


# -- bad hyperparameters set after construction --------------------------------------------------------------

BAD_GROUP_VALUES = [
    ("lr", math.nan), ("lr", -0.1), ("lr", math.inf), ("weight_decay", math.nan), ("weight_decay", -1e-3),
    ("momentum", math.nan), ("momentum", -0.5), ("dampening", math.nan), ("dampening", math.inf),
]


def _stepper(mode: str) -> tuple[nn.Module, Callable[[], Any], torch.optim.Optimizer]:
    if mode == "backend":
        model = Net()
        sgd = torch.optim.SGD(model.named_parameters(), **SGD_OPTIONS)
        return model, torch.compile(sgd.step, backend="lars_fx", options={"coefficient": 0.05}), sgd
    model, opt = make(mode)
    return model, torch.compile(opt.step) if mode == "compiled_step" else opt.step, opt


@pytest.mark.parametrize("key,value", BAD_GROUP_VALUES, ids=[f"{k}={v}" for k, v in BAD_GROUP_VALUES])
@pytest.mark.parametrize("mode", MODES)
def test_bad_group_hyperparameters_are_refused_before_anything_moves(mode, key, value):
    model, step, opt = _stepper(mode)
    for warm_up in range(2):
        set_grads(model, warm_up)
        step()
    opt.param_groups[0][key] = value
    set_grads(model, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=key):
        step()
    assert moved(before, model) == []


@pytest.mark.parametrize("key,value", [("lr", math.nan), ("momentum", -0.5)])
@pytest.mark.parametrize("mode", ["compiled_step", "backend"])
def test_bad_group_hyperparameters_are_refused_under_compile(mode, key, value):
    torch._dynamo.reset()
    model, step, opt = _stepper(mode)
    opt.param_groups[0][key] = value
    set_grads(model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Exception) as caught:
        step()
    assert any(isinstance(e, ValueError) and key in str(e) for e in causes(caught.value)), caught.value
    assert moved(before, model) == []


# -- what every mode refuses alike: complex, sparse, meta ----------------------------------------------------

ALL_MODES = (*MODES, "compiled_step", "backend")


def _single(mode: str, param: nn.Parameter, **sgd_options: Any) -> Callable[[], Any]:
    return lars_step_in_mode(mode, [("w", param)], {"lr": 0.1, **sgd_options})


@pytest.mark.parametrize("mode", ALL_MODES)
def test_complex_parameters_are_refused_alike(mode):
    w = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    step = _single(mode, w, momentum=0.9)
    w.grad = torch.randn(3, dtype=torch.complex64)
    before = w.detach().clone()
    with pytest.raises(Exception) as caught:
        step()
    errors = [
        e for e in causes(caught.value) if isinstance(e, (ValueError, TypeError)) and "complex" in str(e)
    ]
    assert errors, f"no clear error about the complex parameter: {caught.value!r}"
    assert " w" in str(errors[0]) or "'w'" in str(errors[0]), (
        f"the error does not name the parameter: {errors[0]}"
    )
    assert "sparse" not in str(errors[0]) and "embedding" not in str(errors[0]), (
        f"a hint for sparse: {errors[0]}"
    )
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_sparse_gradients_are_refused_alike(mode):
    emb = nn.Embedding(10, 4, sparse=True)
    step = _single(mode, emb.weight)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(Exception) as caught:
        step()
    errors = [
        e for e in causes(caught.value) if isinstance(e, (ValueError, TypeError)) and "sparse" in str(e)
    ]
    assert errors, f"no clear error about the sparse gradient: {caught.value!r}"
    assert torch.equal(emb.weight.detach(), before)


def _step_without_data(step: Callable[[], Any], w: nn.Parameter, kind: str) -> None:
    for _ in range(2):  # the first step creates the momentum buffers; the second is the compiled one
        w.grad = torch.empty_like(w)
        try:
            step()
        except Exception as error:  # what it is decides the verdict
            clear = [e for e in causes(error) if isinstance(e, (ValueError, TypeError, NotImplementedError))
                     and kind in str(e).lower()]
            assert clear, f"the {kind} parameter crashed the step without a clear error: {error!r}"
            return


# torch.compile(sgd.step) itself crashes on meta tensors, hence no compiled_step here.
@pytest.mark.parametrize(
    "mode,kind", [(m, k) for m in MODES for k in ("meta", "fake")] + [("backend", "meta")]
)
def test_parameters_without_data_step_or_are_refused_clearly(mode, kind):
    """Parameters on the meta device or FakeTensors (no data): the step runs as a shape-only computation, or a
    clear error says what to do; never a crash deep inside Inductor."""
    if kind == "meta":
        w = nn.Parameter(torch.empty(4, 3, device="meta"))
        _step_without_data(_single(mode, w, momentum=0.9), w, kind)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = nn.Parameter(torch.empty(4, 3))
        _step_without_data(_single(mode, w, momentum=0.9), w, kind)
