"""Trust-ratio telemetry: recorded values, names, no host reads while recording, exports and the plot."""

import math

import pytest
import torch
from torch import nn

from lars_fx import LARS
from lars_fx.telemetry import FIELDS, Telemetry, read_records

COEFFICIENT, EPSILON = 0.02, 1e-5
DECAYS = (1e-3, 1e-2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.LayerNorm = nn.LayerNorm(12)  # MindSpore's default filter leaves it out
        self.fc2 = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.tanh(self.LayerNorm(self.fc1(x))))))


def _optimizer(model: nn.Module, **lars_options) -> LARS:
    named = list(model.named_parameters())
    head = [(n, p) for n, p in named if n.startswith("head")]
    rest = [(n, p) for n, p in named if not n.startswith("head")]
    sgd = torch.optim.SGD(
        [{"params": rest, "weight_decay": DECAYS[0]}, {"params": head, "weight_decay": DECAYS[1]}],
        lr=0.3,
        momentum=0.9,
    )
    return LARS(sgd, epsilon=EPSILON, coefficient=COEFFICIENT, **lars_options)


def _backward(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=generator)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _expected(model: nn.Module, decay_of) -> dict[str, tuple[float, float, float]]:
    """||w||, ||g|| and MindSpore's coefficient for each LARS parameter, by hand in float64."""
    expected = {}
    for name, p in model.named_parameters():
        if "bias" in name or "LayerNorm" in name or p.grad is None:
            continue
        w = math.sqrt(sum(v * v for v in p.detach().flatten().tolist()))
        g = math.sqrt(sum(v * v for v in p.grad.flatten().tolist()))
        wd = decay_of(name)
        expected[name] = (w, g, COEFFICIENT * w / (g + wd * w + EPSILON))
    return expected


def test_records_match_norms_and_trust_ratios_computed_by_hand():
    torch.manual_seed(0)
    model = Net().double()
    opt = _optimizer(model, telemetry=True)
    decay_of = lambda name: DECAYS[1] if name.startswith("head") else DECAYS[0]  # noqa: E731
    expected_by_step = []
    for step in range(4):
        _backward(model, seed=step)
        if step == 2:
            model.fc2.weight.grad = None  # a parameter without a gradient is not recorded that step
        expected_by_step.append(_expected(model, decay_of))
        opt.step()

    records = opt.telemetry.to_records()
    got = {(r["step"], r["param"]): (r["w_norm"], r["g_norm"], r["trust_ratio"]) for r in records}
    want = {(step, name): v for step, layer in enumerate(expected_by_step) for name, v in layer.items()}
    assert got.keys() == want.keys()
    assert {r["group"] for r in records if r["param"] == "head.weight"} == {1}
    for key, values in want.items():
        assert got[key] == pytest.approx(values, rel=1e-12), key
    assert [r["param"] for r in records if r["step"] == 0] == ["fc1.weight", "fc2.weight", "head.weight"]
    assert "fc2.weight" not in {r["param"] for r in records if r["step"] == 2}


def test_history_is_per_layer_over_steps():
    torch.manual_seed(1)
    model = Net().double()
    opt = _optimizer(model, telemetry=True)
    for step in range(5):
        _backward(model, seed=step)
        opt.step()
    history = opt.telemetry.history()
    assert list(history) == ["fc1.weight", "fc2.weight", "head.weight"]
    records = opt.telemetry.to_records()
    for name, layer in history.items():
        assert layer.step.tolist() == [0, 1, 2, 3, 4]
        assert layer.trust_ratio.tolist() == [r["trust_ratio"] for r in records if r["param"] == name]
        assert layer.w_norm.dtype == torch.float64


def test_recording_never_reads_values_on_the_host():
    # Meta tensors have no data: any .item()/.tolist()/.cpu() during the step would raise.
    model = Net().to("meta")
    opt = _optimizer(model, telemetry=True)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        opt.step()
    held = opt.telemetry.device_values
    assert len(held) == 6  # 3 steps x 2 param groups
    assert all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in held)
    assert [tuple(t.shape) for t in held[:2]] == [(3, 2), (3, 1)]
    with pytest.raises(NotImplementedError):
        opt.telemetry.to_records()  # reading is what copies to the host


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recording_on_cuda_does_not_synchronize():
    model = Net().cuda()
    opt = _optimizer(model, telemetry=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # warm-up: first-step allocations may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(opt.telemetry.to_records()) == 4 * 3


def test_off_by_default():
    opt = _optimizer(Net())
    assert opt.telemetry is None


def test_every_records_one_step_in_n_and_skipped_steps_count():
    torch.manual_seed(2)
    model = Net().double()
    opt = _optimizer(model, skip_nonfinite=True)
    opt.telemetry = Telemetry(every=2)
    for step in range(7):
        _backward(model, seed=step)
        if step == 3:
            model.fc1.weight.grad[0, 0] = float("nan")  # skipped by skip_nonfinite, still a step
        opt.step()
    assert opt.skipped_steps == 1
    assert sorted({r["step"] for r in opt.telemetry.to_records()}) == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="every"):
        Telemetry(every=0)


def test_names_without_param_names():
    model = nn.Linear(3, 2)
    opt = LARS(torch.optim.SGD(model.parameters(), lr=0.1), lars_filter=lambda p: True, telemetry=True)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert [r["param"] for r in opt.telemetry.to_records()] == ["param_groups[0][0]", "param_groups[0][1]"]


@pytest.fixture
def recorded() -> Telemetry:
    torch.manual_seed(3)
    model = Net()
    opt = _optimizer(model, telemetry=True)
    for _ in range(6):
        model.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
    return opt.telemetry


@pytest.mark.parametrize("suffix", ["csv", "json"])
def test_export_round_trips(recorded, tmp_path, suffix):
    path = getattr(recorded, f"to_{suffix}")(tmp_path / f"telemetry.{suffix}")
    records = recorded.to_records()
    assert len(records) == 6 * 3
    assert read_records(path) == records  # floats exactly, ints as ints
    if suffix == "csv":
        assert path.read_text().splitlines()[0] == ",".join(FIELDS)


def test_plot_writes_a_png(recorded, tmp_path):
    path = recorded.plot(tmp_path / "trust.png", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_plot_with_nothing_recorded_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no telemetry recorded"):
        Telemetry().plot(tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_fused_path_records_the_same_values():
    torch.manual_seed(4)
    eager_model, fused_model = Net(), Net()
    fused_model.load_state_dict(eager_model.state_dict())
    eager, fused = (
        _optimizer(eager_model, telemetry=True),
        _optimizer(fused_model, telemetry=True, fused=True),
    )
    for step in range(3):
        for model, opt in ((eager_model, eager), (fused_model, fused)):
            torch.manual_seed(100 + step)
            model.zero_grad()
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.step()
    got, want = fused.telemetry.to_records(), eager.telemetry.to_records()
    assert [(r["step"], r["param"]) for r in got] == [(r["step"], r["param"]) for r in want]
    for g, w in zip(got, want, strict=True):
        assert (g["w_norm"], g["g_norm"], g["trust_ratio"]) == pytest.approx(
            (w["w_norm"], w["g_norm"], w["trust_ratio"]), rel=1e-5
        )


def test_compiled_step_records_without_recompiling(tmp_path, monkeypatch):
    import copy

    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    eager_model = copy.deepcopy(model)
    opts = [
        LARS(torch.optim.SGD(m.named_parameters(), lr=torch.tensor(0.1), momentum=0.9), telemetry=True)
        for m in (model, eager_model)
    ]
    counter = CompileCounterWithBackend("inductor")
    compiled_step = torch.compile(opts[0].step, backend=counter)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        for p, q in zip(model.parameters(), eager_model.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        compiled_step()
        opts[1].step()
    torch._dynamo.reset()
    assert counter.frame_count <= 2  # the record call is a graph break, not a recompile per step
    compiled, eager = (opt.telemetry.to_records() for opt in opts)
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] and len(compiled) == 5 * 2
    for c, e in zip(compiled, eager, strict=True):
        assert c["param"] == e["param"] and c["trust_ratio"] == pytest.approx(e["trust_ratio"], rel=1e-5)
