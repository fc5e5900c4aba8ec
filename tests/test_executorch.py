"""ExecuTorch training programs train as lars_fx.LARS trains in PyTorch.

Each test exports a fresh random model with ``lars_fx.executorch.export_program``, trains it with ExecuTorch's
runtime (``executorch.runtime``; in a fresh process with no lars_fx where said) and the same steps with
``lars_fx.LARS`` in PyTorch, and compares the parameters and momentum buffers after every step:
|program - torch| <= ATOL + RTOL * |torch|. The captured step graph (the same graph the program holds) also
runs in eager PyTorch, which the option matrix and the property test use to cover more cases than lowering
allows.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from collections.abc import Callable

import executorch.runtime as executorch_runtime
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lars_fx
from lars_fx.executorch import capture_step, export_program
from lars_fx.executorch.program import program_modules
from lars_fx.executorch.spec import ProgramSpec
from lars_fx.functional import lars_sgd_reference
from lars_fx.passes.fx_pipeline import pipeline_names
from lars_fx.passes.fx_spec import PatternMismatch
from lars_fx.passes.pipelines import LARS_JOINT

STEPS = 10
RTOL, ATOL = 1e-5, 1e-7


def lars_filter(p) -> bool:
    return "norm" not in p.name and "bias" not in p.name


class Mlp(torch.nn.Module):
    def __init__(self, inputs: int = 8, hidden: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(inputs, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.fc2 = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class Cnn(torch.nn.Module):
    """A small CNN for 8x8 digits: conv, GroupNorm, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


def make_lars(model: torch.nn.Module, groups: list[dict] | None = None, **options) -> lars_fx.LARS:
    sgd_options = {
        k: options.pop(k)
        for k in ("lr", "momentum", "weight_decay", "dampening", "nesterov", "maximize")
        if k in options
    }
    sgd_options.setdefault("lr", 0.5)
    sgd_options.setdefault("momentum", 0.9)
    sgd_options.setdefault("weight_decay", 1e-4)
    params = groups if groups is not None else model.named_parameters()
    return lars_fx.LARS(torch.optim.SGD(params, **sgd_options), lars_filter=lars_filter, **options)


def batch(model: torch.nn.Module, generator: torch.Generator, size: int = 6):
    if isinstance(model, Cnn):
        return torch.randn(size, 1, 8, 8, generator=generator), torch.randint(
            0, 10, (size,), generator=generator
        )
    inputs = model.fc1.in_features
    return torch.randn(size, inputs, generator=generator), torch.randint(0, 4, (size,), generator=generator)


def torch_step(
    model, optimizer, x, target, factor: float, base_lrs: list[float], loss=F.cross_entropy
) -> float:
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor
    optimizer.zero_grad()
    value = loss(model(x), target)
    value.backward()
    optimizer.step()
    return float(value)


def torch_state(model, optimizer, names, momentum_names) -> list[torch.Tensor]:
    params = dict(model.named_parameters())
    buffers = []
    for name in momentum_names:
        buffer = optimizer.state.get(params[name], {}).get("momentum_buffer")
        buffers.append(torch.zeros_like(params[name]) if buffer is None else buffer)
    return [params[name].detach() for name in names] + [b.detach() for b in buffers]


def assert_close_states(program_state, expected, where: str) -> None:
    assert len(program_state) == len(expected), where
    for index, (got, want) in enumerate(zip(program_state, expected, strict=True)):
        torch.testing.assert_close(
            got, want, rtol=RTOL, atol=ATOL, msg=lambda m, index=index: f"{where}, tensor {index}: {m}"
        )


def load_methods(path):
    program = executorch_runtime.Runtime.get().load_program(path)
    return {name: program.load_method(name) for name in ("train_step", "predict", "get_state", "set_state")}


def lr_factor(step: int) -> float:
    return 1.0 if step < 5 else 0.3  # the lr changes at step 5


# -- the done-when: ten steps, lr changed at step 5, state through a fresh process at step 6 --------

DEVICE_RESUME = r"""
import sys
import torch
from executorch.runtime import Runtime

pte, data_path, out_path = sys.argv[1:4]
data = torch.load(data_path)
program = Runtime.get().load_program(pte)
train, get_state, set_state = (program.load_method(m) for m in ("train_step", "get_state", "set_state"))
set_state.execute(list(data["state"]))
states = []
for x, target, lr in zip(data["xs"], data["targets"], data["lrs"]):
    train.execute([x, target, lr])
    states.append(get_state.execute([]))
assert "lars_fx" not in sys.modules
torch.save(states, out_path)
"""


@pytest.mark.parametrize("make_model", [Mlp, Cnn], ids=["mlp", "cnn"])
def test_program_trains_as_lars_with_lr_change_and_fresh_process_resume(make_model, tmp_path):
    torch.manual_seed(0)
    model = make_model()
    optimizer = make_lars(model)
    generator = torch.Generator().manual_seed(1)
    data = [batch(model, generator) for _ in range(STEPS)]
    # One torch step first: the program must start from the optimizer's momentum buffers, not zeros.
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    torch_step(model, optimizer, *batch(model, generator), 1.0, base_lrs)
    program = export_program(
        model,
        [data[0][0]],
        data[0][1],
        optimizer=optimizer,
        loss="cross_entropy",
        path=tmp_path / "model.pte",
    )
    names, momentum_names = program.parameter_names, program.momentum_names
    assert list(names) == [n for n, _ in model.named_parameters()]
    assert list(momentum_names) == list(names)

    methods = load_methods(program.path)  # a load from disk, at step 0
    assert_close_states(
        methods["get_state"].execute([]), torch_state(model, optimizer, names, momentum_names), "step 0"
    )
    first_weight = next(model.parameters()).detach()
    assert torch.equal(methods["get_state"].execute([])[0], first_weight)  # copied, not recomputed
    torch.testing.assert_close(
        methods["predict"].execute([data[0][0]])[0], model(data[0][0]).detach(), rtol=1e-6, atol=1e-6
    )

    resume_at = 6
    saved = None
    for step, (x, target) in enumerate(data):
        if step == resume_at:
            saved = methods["get_state"].execute([])
        lr = torch.tensor(base_lrs[0] * lr_factor(step))
        (loss,) = methods["train_step"].execute([x, target, lr])
        expected_loss = torch_step(model, optimizer, x, target, lr_factor(step), base_lrs)
        assert abs(float(loss) - expected_loss) <= 1e-5 * max(1.0, abs(expected_loss)), step
        assert_close_states(
            methods["get_state"].execute([]),
            torch_state(model, optimizer, names, momentum_names),
            f"step {step}",
        )
    final = methods["get_state"].execute([])
    torch.testing.assert_close(
        methods["predict"].execute([data[0][0]])[0], model(data[0][0]).detach(), rtol=1e-5, atol=1e-6
    )

    # The same last four steps in a fresh process that imports only ExecuTorch's runtime and torch.
    rest = data[resume_at:]
    torch.save(
        {
            "state": saved,
            "xs": [x for x, _ in rest],
            "targets": [t for _, t in rest],
            "lrs": [torch.tensor(base_lrs[0] * lr_factor(s)) for s in range(resume_at, STEPS)],
        },
        tmp_path / "resume.pt",
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            DEVICE_RESUME,
            str(program.path),
            str(tmp_path / "resume.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    resumed = torch.load(tmp_path / "out.pt")
    assert len(resumed) == STEPS - resume_at
    for got, want in zip(resumed[-1], final, strict=True):
        assert torch.equal(got, want)  # the same program from the same state: bitwise


class PooledCnn(Cnn):
    """Max pooling with overlapping windows: ExecuTorch's own backward kernel for it adds into its output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        pooled = F.max_pool2d(torch.relu(self.norm(self.conv(x))), kernel_size=3, stride=2, padding=1)
        return self.fc(pooled.flatten(1))


def test_max_pooling_trains_as_torch(tmp_path):
    torch.manual_seed(36)
    model = PooledCnn()
    optimizer = make_lars(model)
    generator = torch.Generator().manual_seed(37)
    data = [(torch.randn(6, 1, 8, 8, generator=generator), torch.randint(0, 10, (6,), generator=generator))
            for _ in range(5)]
    run_captured(model, optimizer, data, lowered_path=tmp_path / "pool.pte")


def test_program_starts_from_zero_momentum_before_the_first_step_and_get_set_state_round_trip(tmp_path):
    torch.manual_seed(2)
    model = Mlp()
    optimizer = make_lars(model)
    x, target = batch(model, torch.Generator().manual_seed(3))
    program = export_program(
        model, [x], target, optimizer=optimizer, loss="cross_entropy", path=tmp_path / "fresh.pte"
    )
    methods = load_methods(program.path)
    state = methods["get_state"].execute([])
    weights = len(program.parameter_names)
    assert all(torch.count_nonzero(b) == 0 for b in state[weights:])
    methods["train_step"].execute([x, target, torch.tensor(0.5)])
    torch_step(model, optimizer, x, target, 1.0, [0.5])
    assert_close_states(
        methods["get_state"].execute([]),
        torch_state(model, optimizer, program.parameter_names, program.momentum_names),
        "step 1",
    )
    # set_state replaces the whole state; predict and get_state read what it wrote.
    methods["set_state"].execute(list(state))
    after = methods["get_state"].execute([])
    assert all(torch.equal(a, b) for a, b in zip(after, state, strict=True))
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p, value in zip(fresh.parameters(), state[:weights], strict=True):
            p.copy_(value)
    torch.testing.assert_close(methods["predict"].execute([x])[0], fresh(x), rtol=1e-6, atol=1e-6)


def test_state_survives_methods_loaded_late_in_any_order(tmp_path):
    """A method's first load must not reset the shared state (the C++ Module loads a method at its first
    call): predict and get_state loaded after training, train_step loaded after set_state."""
    torch.manual_seed(28)
    model = Mlp()
    optimizer = make_lars(model)
    x, target = batch(model, torch.Generator().manual_seed(29))
    program = export_program(
        model, [x], target, optimizer=optimizer, loss="cross_entropy", path=tmp_path / "late.pte"
    )
    runtime = executorch_runtime.Runtime.get()

    trained = runtime.load_program(program.path)
    train = trained.load_method("train_step")
    for _ in range(3):
        train.execute([x, target, torch.tensor(0.5)])
        torch_step(model, optimizer, x, target, 1.0, [0.5])
    expected = torch_state(model, optimizer, program.parameter_names, program.momentum_names)
    state = trained.load_method("get_state").execute([])  # loaded after training
    assert_close_states(state, expected, "get_state loaded late")
    output = trained.load_method("predict").execute([x])[0]
    torch.testing.assert_close(output, model(x).detach(), rtol=1e-5, atol=1e-6)
    assert_close_states(trained.load_method("get_state").execute([]), expected, "after predict's load")

    resumed = runtime.load_program(program.path)  # a fresh program: starts from the exported state
    resumed.load_method("set_state").execute(list(state))
    train_late = resumed.load_method("train_step")  # loaded after set_state
    train_late.execute([x, target, torch.tensor(0.5)])
    train.execute([x, target, torch.tensor(0.5)])
    after = resumed.load_method("get_state").execute([])
    continued = trained.load_method("get_state").execute([])
    assert all(torch.equal(a, b) for a, b in zip(after, continued, strict=True))


def test_max_batch_lets_the_batch_size_change_between_steps(tmp_path):
    torch.manual_seed(30)
    model = Mlp()
    optimizer = make_lars(model)
    generator = torch.Generator().manual_seed(31)
    x, target = batch(model, generator)
    program = export_program(
        model, [x], target, optimizer=optimizer, loss="cross_entropy", path=tmp_path / "b.pte", max_batch=16
    )
    methods = load_methods(program.path)
    for size in (6, 4, 16, 1, 9):  # the last batch of an epoch is smaller
        x, target = batch(model, generator, size)
        (loss,) = methods["train_step"].execute([x, target, torch.tensor(0.5)])
        expected = torch_step(model, optimizer, x, target, 1.0, [0.5])
        assert abs(float(loss) - expected) <= 1e-5 * max(1.0, abs(expected)), size
        assert_close_states(
            methods["get_state"].execute([]),
            torch_state(model, optimizer, program.parameter_names, program.momentum_names),
            f"batch {size}",
        )
        assert methods["predict"].execute([x])[0].shape == (size, 4)
    with pytest.raises(RuntimeError):  # beyond the planned memory: the runtime refuses the inputs
        methods["train_step"].execute([*batch(model, generator, 17), torch.tensor(0.5)])
    with pytest.raises(ValueError, match=r"max_batch=4 must be an int >= the examples' batch size 6"):
        export_program(
            model, [x[:6]], target[:6], optimizer=optimizer, loss="cross_entropy", path=tmp_path / "c.pte",
            max_batch=4,
        )


def test_mse_with_a_changing_batch_and_a_loss_it_cannot_lower(tmp_path):
    torch.manual_seed(38)
    model = Mlp()
    optimizer = make_lars(model)
    generator = torch.Generator().manual_seed(39)
    x, target = torch.randn(6, 8, generator=generator), torch.randn(6, 4, generator=generator)
    program = export_program(
        model, [x], target, optimizer=optimizer, loss="mse", path=tmp_path / "mse.pte", max_batch=8
    )
    methods = load_methods(program.path)
    for size in (6, 3, 8):
        x, target = torch.randn(size, 8, generator=generator), torch.randn(size, 4, generator=generator)
        (loss,) = methods["train_step"].execute([x, target, torch.tensor(0.5)])
        expected = torch_step(model, optimizer, x, target, 1.0, [0.5], loss=F.mse_loss)
        assert abs(float(loss) - expected) <= 1e-5 * max(1.0, abs(expected)), size
        assert_close_states(
            methods["get_state"].execute([]),
            torch_state(model, optimizer, program.parameter_names, program.momentum_names),
            f"batch {size}",
        )
    with pytest.raises(ValueError, match=r"torch.sym_float; F.mse_loss's backward.*max_batch=None"):
        export_program(
            model, [x], target, optimizer=optimizer, loss=F.mse_loss, path=tmp_path / "no.pte", max_batch=8
        )


# -- options: the program holds each of LARS's and SGD's options as torch runs them --------------------------

OPTION_CASES: dict[str, dict] = {
    "defaults": {},
    "use_clip": {"use_clip": True, "lr": 0.05},
    "unit_trust": {"unit_trust_on_zero_norm": True},
    "lr_inside_momentum": {"lr_inside_momentum": True},
    "nesterov": {"nesterov": True},
    "no_momentum": {"momentum": 0.0},
    "maximize": {"maximize": True, "lr": 0.05},
    "no_weight_decay": {"weight_decay": 0.0, "coefficient": 0.02, "epsilon": 1e-3},
}


def run_captured(
    model, optimizer, data, *, lowered_path=None, loss=F.cross_entropy, loss_name="cross_entropy"
):
    """Train ``model`` with the program (lowered to a .pte at ``lowered_path``, or its eager modules) and a
    twin with ``optimizer`` in PyTorch; compare after every step."""
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    x0, t0 = data[0]
    if lowered_path is not None:
        program = export_program(model, [x0], t0, optimizer=optimizer, loss=loss_name, path=lowered_path)
        names, momentum_names = program.parameter_names, program.momentum_names
        methods = load_methods(program.path)
        train = lambda *args: methods["train_step"].execute(list(args))[0]  # noqa: E731
        get_state = lambda: methods["get_state"].execute([])  # noqa: E731
    else:
        spec = ProgramSpec.from_optimizer(optimizer, model)
        step = capture_step(model, [x0], t0, spec, loss=loss_name)
        modules, state = program_modules(copy.deepcopy(model), step)
        names, momentum_names = tuple(spec.names()), tuple(p.name for p in spec.with_momentum())
        train = lambda *args: modules["train_step"](*args)  # noqa: E731
        get_state = lambda: [b.clone() for b in state.weights() + state.momenta()]  # noqa: E731
    for index, (x, target) in enumerate(data):
        lr = torch.tensor(base_lrs[0] * lr_factor(index))
        with torch.no_grad():
            train(x, target, lr)
        torch_step(model, optimizer, x, target, lr_factor(index), base_lrs, loss=loss)
        assert_close_states(
            get_state(), torch_state(model, optimizer, names, momentum_names), f"step {index}"
        )


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_option_matrix_in_the_captured_step(case):
    torch.manual_seed(4)
    model = Mlp()
    optimizer = make_lars(model, **dict(OPTION_CASES[case]))
    generator = torch.Generator().manual_seed(5)
    run_captured(model, optimizer, [batch(model, generator) for _ in range(STEPS)])


@pytest.mark.parametrize("case", ["use_clip", "nesterov", "lr_inside_momentum"])
def test_option_matrix_lowered(case, tmp_path):
    torch.manual_seed(6)
    model = Mlp()
    optimizer = make_lars(model, **dict(OPTION_CASES[case]))
    generator = torch.Generator().manual_seed(7)
    run_captured(
        model, optimizer, [batch(model, generator) for _ in range(6)], lowered_path=tmp_path / "p.pte"
    )


def test_groups_with_their_own_lr_weight_decay_momentum_and_dampening(tmp_path):
    torch.manual_seed(8)
    model = Mlp()
    groups = [
        {"params": list(model.fc1.named_parameters()), "lr": 0.4, "weight_decay": 1e-3},
        {"params": list(model.norm.named_parameters()), "lr": 0.1, "momentum": 0.5, "dampening": 0.1},
        {"params": list(model.fc2.named_parameters()), "lr": 0.2, "momentum": 0.0, "weight_decay": 0.0},
    ]
    optimizer = make_lars(model, groups)
    generator = torch.Generator().manual_seed(9)
    # dampening needs torch's momentum buffers to exist: one step before the export
    torch_step(model, optimizer, *batch(model, generator), 1.0, [g["lr"] for g in optimizer.param_groups])
    run_captured(
        model, optimizer, [batch(model, generator) for _ in range(6)], lowered_path=tmp_path / "g.pte"
    )


def test_frozen_and_unoptimized_parameters_stay_constants(tmp_path):
    torch.manual_seed(10)
    model = Mlp()
    model.norm.weight.requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if not n.startswith("fc2.")]  # fc2 not optimized
    optimizer = make_lars(model, [{"params": params}])
    generator = torch.Generator().manual_seed(11)
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.startswith("fc2.") or n == "norm.weight"
    }
    run_captured(
        model, optimizer, [batch(model, generator) for _ in range(4)], lowered_path=tmp_path / "f.pte"
    )
    for name, value in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name].detach(), value)
    program = export_program(
        model,
        [torch.randn(2, 8)],
        torch.tensor([0, 1]),
        optimizer=optimizer,
        loss="cross_entropy",
        path=tmp_path / "f2.pte",
    )
    assert program.parameter_names == ("fc1.weight", "fc1.bias", "norm.bias")


class WithBuffers(Mlp):
    """A persistent and a non-persistent buffer, read by the forward (constants of the program)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))
        self.register_buffer("shift", torch.linspace(-0.1, 0.1, 16), persistent=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x * self.scale) + self.shift)))


def test_buffers_the_forward_reads_are_constants(tmp_path):
    torch.manual_seed(40)
    model = WithBuffers()
    optimizer = make_lars(model)
    generator = torch.Generator().manual_seed(41)
    data = [batch(model, generator) for _ in range(3)]
    run_captured(model, optimizer, data, lowered_path=tmp_path / "b.pte")


def test_mse_and_a_callable_loss_and_two_inputs(tmp_path):
    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(5, 3)
            self.b = torch.nn.Linear(4, 3)

        def forward(self, x, y):
            return self.a(x) * torch.tanh(self.b(y))

    torch.manual_seed(12)
    model = TwoInputs()
    optimizer = make_lars(model)
    generator = torch.Generator().manual_seed(13)
    data = [
        (
            (torch.randn(4, 5, generator=generator), torch.randn(4, 4, generator=generator)),
            torch.randn(4, 3, generator=generator),
        )
        for _ in range(4)
    ]
    program = export_program(
        model, list(data[0][0]), data[0][1], optimizer=optimizer, loss="mse", path=tmp_path / "two.pte"
    )
    methods = load_methods(program.path)
    base = optimizer.param_groups[0]["lr"]
    for (x, y), target in data:
        methods["train_step"].execute([x, y, target, torch.tensor(base)])
        optimizer.zero_grad()
        F.mse_loss(model(x, y), target).backward()
        optimizer.step()
        assert_close_states(
            methods["get_state"].execute([]),
            torch_state(model, optimizer, program.parameter_names, program.momentum_names),
            "mse",
        )

    def huber(output, target):
        return F.smooth_l1_loss(output, target, beta=0.5)

    torch.manual_seed(14)
    mlp = Mlp()
    generator = torch.Generator().manual_seed(15)
    data = [
        (torch.randn(6, 8, generator=generator), torch.randn(6, 4, generator=generator)) for _ in range(4)
    ]
    spec = ProgramSpec.from_optimizer(make_lars(mlp), mlp)
    run_captured(mlp, make_lars(mlp), data, loss=huber, loss_name=huber)  # type: ignore[arg-type]
    assert spec.names() == [n for n, _ in mlp.named_parameters()]


@pytest.mark.parametrize("make_model", [lambda: Mlp(16, 32, 4), Cnn], ids=["mlp", "cnn"])
def test_xnnpack_program_trains_as_lars(make_model, tmp_path):
    """XNNPACK runs the matmuls on weights that change every step (the program's state); the CNN's
    convolutions stay on the portable kernels."""
    torch.manual_seed(16)
    model = make_model()
    optimizer = make_lars(model)
    generator = torch.Generator().manual_seed(17)
    data = [batch(model, generator, 8) for _ in range(5)]
    program = export_program(
        model,
        [data[0][0]],
        data[0][1],
        optimizer=optimizer,
        loss="cross_entropy",
        path=tmp_path / "x.pte",
        partitioner="xnnpack",
    )
    methods = load_methods(program.path)
    for x, target in data:
        methods["train_step"].execute([x, target, torch.tensor(0.5)])
        torch_step(model, optimizer, x, target, 1.0, [0.5])
        state = methods["get_state"].execute([])
        expected = torch_state(model, optimizer, program.parameter_names, program.momentum_names)
        for got, want in zip(state, expected, strict=True):
            # XNNPACK's matmuls add in another order than torch's: float32 rounding, not a different step
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(methods["predict"].execute([x])[0], model(x).detach(), rtol=1e-4, atol=1e-5)


def test_two_programs_in_one_process_keep_their_own_state(tmp_path):
    torch.manual_seed(18)
    first, second = Mlp(), Mlp()
    opt_first, opt_second = make_lars(first), make_lars(second, momentum=0.5)
    x, target = batch(first, torch.Generator().manual_seed(19))
    p1 = export_program(
        first, [x], target, optimizer=opt_first, loss="cross_entropy", path=tmp_path / "a.pte"
    )
    p2 = export_program(
        second, [x], target, optimizer=opt_second, loss="cross_entropy", path=tmp_path / "b.pte"
    )
    m1, m2 = load_methods(p1.path), load_methods(p2.path)
    for _ in range(3):
        m1["train_step"].execute([x, target, torch.tensor(0.5)])
        m2["train_step"].execute([x, target, torch.tensor(0.5)])
        torch_step(first, opt_first, x, target, 1.0, [0.5])
        torch_step(second, opt_second, x, target, 1.0, [0.5])
    assert_close_states(
        m1["get_state"].execute([]),
        torch_state(first, opt_first, p1.parameter_names, p1.momentum_names),
        "first",
    )
    assert_close_states(
        m2["get_state"].execute([]),
        torch_state(second, opt_second, p2.parameter_names, p2.momentum_names),
        "second",
    )


def test_zero_weights_and_zero_gradients():
    """A layer of zeros (||w|| = 0) and a gradient of zeros (an input of zeros), both trust-ratio rules."""
    for unit in (False, True):
        torch.manual_seed(20)
        model = Mlp()
        with torch.no_grad():
            model.fc1.weight.zero_()
        optimizer = make_lars(model, unit_trust_on_zero_norm=unit)
        data = [
            (torch.zeros(6, 8), torch.randint(0, 4, (6,))),
            *[batch(model, torch.Generator().manual_seed(21))],
        ]
        run_captured(model, optimizer, data * 2)


def test_a_flat_optimizer_exports_its_state():
    """LARS(flat=True) keeps its momentum buffers as views of flat buffers: the export reads them as
    tensors."""
    torch.manual_seed(32)
    model = Mlp()
    optimizer = make_lars(model, flat=True)
    generator = torch.Generator().manual_seed(33)
    torch_step(model, optimizer, *batch(model, generator), 1.0, [0.5])
    run_captured(model, optimizer, [batch(model, generator) for _ in range(3)])


class Tied(torch.nn.Module):
    def __init__(self, register_twice: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 4, bias=False)
        self.unused = torch.nn.Linear(4, 6)
        if register_twice:
            self.out = torch.nn.Linear(4, 4, bias=False)
            self.out.weight = self.embed.weight

    def forward(self, x):
        return F.linear(torch.tanh(self.embed(x)), self.embed.weight)


def test_one_weight_used_twice_steps_with_its_summed_gradient_and_tied_registrations_are_refused(tmp_path):
    torch.manual_seed(34)
    model = Tied(register_twice=False)
    model.unused.requires_grad_(False)  # no gradient ever: frozen, as torch would never step it
    optimizer = make_lars(model, [{"params": [("embed.weight", model.embed.weight)]}])
    generator = torch.Generator().manual_seed(35)
    data = [(torch.randn(5, 4, generator=generator), torch.randint(0, 4, (5,), generator=generator))]
    run_captured(model, optimizer, data * 3)
    tied = Tied(register_twice=True)
    tied.unused.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'embed.weight' and 'out.weight' are one tensor \(tied weights\)"):
        _export(tied, make_lars(tied, [{"params": [("embed.weight", tied.embed.weight)]}]), tmp_path,
                x=torch.randn(4, 4))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-4, 5e-2]),
    nesterov=st.booleans(),
    use_clip=st.booleans(),
    lr_inside=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_captured_step_matches_the_float64_reference(
    momentum, weight_decay, nesterov, use_clip, lr_inside, seed
):
    """The captured step against ``lars_sgd_reference`` in float64 on the program's own gradients' model."""
    nesterov = nesterov and momentum > 0
    torch.manual_seed(seed)
    model = Mlp()
    reference = copy.deepcopy(model).double()
    optimizer = make_lars(
        model,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        use_clip=use_clip,
        lr_inside_momentum=lr_inside,
        lr=0.05 if use_clip else 0.5,
    )
    generator = torch.Generator().manual_seed(seed + 1)
    data = [batch(model, generator) for _ in range(4)]
    spec = ProgramSpec.from_optimizer(optimizer, model)
    step = capture_step(model, [data[0][0]], data[0][1], spec, loss="cross_entropy")
    modules, state = program_modules(copy.deepcopy(model), step)
    buffers: list[torch.Tensor | None] = [None] * len(spec.params)
    mask = [lars_filter(type("P", (), {"name": name})) for name in spec.names()]
    lr0 = optimizer.param_groups[0]["lr"]
    for index, (x, target) in enumerate(data):
        lr = lr0 * lr_factor(index)
        with torch.no_grad():
            modules["train_step"](x, target, torch.tensor(lr))
        reference.zero_grad()
        F.cross_entropy(reference(x.double()), target).backward()
        params = list(reference.parameters())
        with torch.no_grad():
            buffers = lars_sgd_reference(
                params,
                [p.grad for p in params],
                buffers,
                mask,
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=nesterov,
                use_clip=use_clip,
                lr_inside_momentum=lr_inside,
            )
        for got, want in zip(state.weights(), params, strict=True):
            torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-6)


# -- the pipeline: stages, dumps, a pass switched off --------------------------------------------------------


def test_pipeline_stages_and_dumps(tmp_path, monkeypatch):
    torch.manual_seed(22)
    model = Mlp()
    optimizer = make_lars(model)
    x, target = batch(model, torch.Generator().manual_seed(23))
    spec = ProgramSpec.from_optimizer(optimizer, model)
    monkeypatch.setenv("LARS_FX_DUMP", str(tmp_path / "dump"))
    step = capture_step(model, [x], target, spec, loss="cross_entropy")
    assert [s.name for s in step.stages] == ["captured", *pipeline_names(LARS_JOINT)]
    assert pipeline_names(LARS_JOINT) == [
        "match_joint_gradients",
        "insert_lars_norms",
        "insert_trust_ratio",
        "append_momentum_step",
    ]
    dumped = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumped == [f"executorch_train_step.{i:02d}.{s.name}.txt" for i, s in enumerate(step.stages)]
    trust = (tmp_path / "dump" / dumped[3]).read_text()
    assert "trust_ratio" in trust and "scaled_gradient" not in trust
    final = (tmp_path / "dump" / dumped[4]).read_text()
    assert final.count("momentum_step(") == len(spec.params)
    # LARS parameters (fc1.weight, fc2.weight) get a norm each; the others none
    assert step.stages[2].text.count("squared_norms(") == 2 * 2


def test_a_pass_switched_off_stops_the_pipeline(monkeypatch):
    torch.manual_seed(24)
    model = Mlp()
    optimizer = make_lars(model)
    x, target = batch(model, torch.Generator().manual_seed(25))
    spec = ProgramSpec.from_optimizer(optimizer, model)
    monkeypatch.setenv("LARS_FX_DISABLE", "insert_trust_ratio")
    with pytest.raises(PatternMismatch, match="insert_trust_ratio must run before append_momentum_step"):
        capture_step(model, [x], target, spec, loss="cross_entropy")


# -- refusals: each names what to change, before anything is written -----------------------------------------


def _export(model, optimizer, tmp_path, x=None, target=None, **kwargs):
    x = torch.randn(4, 8) if x is None else x
    target = torch.tensor([0, 1, 2, 3]) if target is None else target
    return export_program(
        model,
        [x],
        target,
        optimizer=optimizer,
        loss=kwargs.pop("loss", "cross_entropy"),
        path=tmp_path / "refused.pte",
        **kwargs,
    )


class WithBatchNorm(Mlp):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(16)  # type: ignore[assignment]


class WithDropout(Mlp):
    def forward(self, x):
        return self.fc2(F.dropout(torch.relu(self.norm(self.fc1(x))), 0.1, self.training))


class WithDropoutModule(Mlp):
    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


class WithAvgPool(Cnn):
    """Average pooling: executorch 1.5.1's runtime has no kernel for its backward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.avg_pool2d(torch.relu(self.norm(self.conv(x))), 2).flatten(1))


class WithErfinv(Mlp):
    def forward(self, x):
        return self.fc2(torch.erfinv(0.5 * torch.tanh(self.norm(self.fc1(x)))))


def _refusals() -> list[tuple[str, Callable[[], tuple], str]]:
    def mlp_with(**options):
        model = Mlp()
        return model, make_lars(model, **options)

    def with_lars(model_class):
        def build():
            model = model_class()
            return model, make_lars(model)

        return build

    batchnorm, dropout, dropout_module, no_kernel, no_runtime_kernel = map(
        with_lars, (WithBatchNorm, WithDropout, WithDropoutModule, WithErfinv, WithAvgPool)
    )

    def adam():
        model = Mlp()
        return model, lars_fx.LARS(
            torch.optim.Adam(model.named_parameters(), lr=0.1), lars_filter=lars_filter
        )

    def plain_sgd():
        model = Mlp()
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def float64():
        model = Mlp().double()
        return model, make_lars(model)

    def dampening_before_first_step():
        return mlp_with(dampening=0.1)

    def foreign_parameter():
        model = Mlp()
        other = torch.nn.Linear(2, 2)
        return model, make_lars(model, [{"params": [*model.named_parameters(), *other.named_parameters()]}])

    def unused_parameter():
        model = Mlp()
        model.unused = torch.nn.Linear(3, 3)
        return model, make_lars(model)

    def zero_base_lr():
        model = Mlp()
        groups = [
            {"params": list(model.fc1.named_parameters()), "lr": 0.0},
            {"params": list(model.fc2.named_parameters()) + list(model.norm.named_parameters()), "lr": 0.1},
        ]
        return model, make_lars(model, groups)

    return [
        (
            "batchnorm",
            batchnorm,
            r"writes its buffer 'norm.running_mean' \(BatchNorm1d.*LayerNorm, GroupNorm",
        ),
        ("dropout", dropout, r"random numbers \(aten.dropout.default in the model's forward\).*eval mode"),
        ("dropout_module", dropout_module, r"random numbers \(aten.dropout.default in drop\)"),
        ("no_kernel", no_kernel, r"uses aten.erfinv.default, which is not in the Core ATen opset"),
        ("no_runtime_kernel", no_runtime_kernel, r"runtime cannot load the program's 'train_step' method"),
        ("adam", adam, r"torch.optim.SGD only, got Adam"),
        ("plain_sgd", plain_sgd, r"must be a lars_fx.LARS, got SGD"),
        ("skip_nonfinite", lambda: mlp_with(skip_nonfinite=True), r"skip_nonfinite=True cannot be exported"),
        ("float64", float64, r"parameter 'fc1.weight' is torch.float64.*model.float\(\)"),
        (
            "dampening",
            dampening_before_first_step,
            r"parameter 'fc1.weight' has no momentum buffer yet .*dampening=0.1.*Export after the first",
        ),
        ("foreign", foreign_parameter, r"param_groups\[0\]\['params'\]\[6\] is not a parameter of the model"),
        ("unused", unused_parameter, r"parameter 'unused.weight' gets no gradient.*requires_grad=False"),
        ("zero_base_lr", zero_base_lr, r"param_groups\[0\] has lr=0 but param_groups\[1\] has lr=0.1"),
    ]


@pytest.mark.parametrize("case", _refusals(), ids=lambda case: case[0])
def test_refusals_name_the_parameter_and_the_fix(case, tmp_path):
    _, build, message = case
    model, optimizer = build()
    x = torch.randn(4, 1, 8, 8) if isinstance(model, Cnn) else None
    with pytest.raises((ValueError, TypeError), match=message):
        _export(model, optimizer, tmp_path, x=x)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the unloadable program


def test_dropout_in_eval_mode_is_exported(tmp_path):
    torch.manual_seed(26)
    model = WithDropoutModule()
    model.drop.eval()
    optimizer = make_lars(model)
    generator = torch.Generator().manual_seed(27)
    run_captured(model, optimizer, [batch(model, generator) for _ in range(3)])


def test_bad_loss_and_partitioner_are_refused(tmp_path):
    model = Mlp()
    with pytest.raises(ValueError, match=r"loss must be one of \['cross_entropy', 'mse'\]"):
        _export(model, make_lars(model), tmp_path, loss="hinge")
    with pytest.raises(ValueError, match=r"partitioner must be None or 'xnnpack'"):
        _export(model, make_lars(model), tmp_path, partitioner="coreml")


def test_lars_fx_never_imports_executorch():
    probe = (
        "import sys, lars_fx, lars_fx.optimizer, lars_fx.backend, lars_fx.fused, lars_fx.onnx, lars_fx.cli;"
        "import lars_fx.passes.pipelines;"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'executorch'], 'executorch imported'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)


def test_missing_executorch_is_a_clear_import_error():
    probe = textwrap.dedent("""
        import sys
        sys.modules['executorch'] = None
        try:
            import lars_fx.executorch
        except ImportError as error:
            assert "pip install 'lars-fx[executorch]'" in str(error), error
        else:
            raise AssertionError('imported without executorch')
    """)
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)
