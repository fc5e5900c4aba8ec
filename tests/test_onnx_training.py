"""The stock ONNX Runtime training API trains lars_fx's artifacts as lars_fx.LARS trains in PyTorch.

Each test exports a fresh random model, trains it ``STEPS`` steps with onnxruntime-training (in a
subprocess that does not import torch, where said) and the same steps with ``lars_fx.LARS``, and compares
the parameters: max |ort - torch| <= 1e-5 * max |torch| per tensor.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnxruntime.training import artifacts as ort_artifacts
from onnxruntime.training import onnxblock

import lars_fx
from lars_fx.onnx import convert_artifacts, generate_artifacts

STEPS = 10
RTOL = 1e-5

# The on-device side: onnxruntime-training's API and numpy only, no lars_fx. lr comes from the checkpoint's
# property, changes where the schedule says, and the run saves (with optimizer state) and reloads at
# resume_at.
ORT_TRAIN = r"""
import json, sys
import numpy as np
from onnxruntime.training.api import CheckpointState, Module, Optimizer

directory, data_path, out_path = sys.argv[1:4]
data = np.load(data_path)
lrs, resume_at = data["lr"], int(data["resume_at"])

def open_state(checkpoint):
    state = CheckpointState.load_checkpoint(checkpoint)
    module = Module(f"{directory}/training_model.onnx", state, f"{directory}/eval_model.onnx")
    optimizer = Optimizer(f"{directory}/optimizer_model.onnx", module)
    return state, module, optimizer

state, module, optimizer = open_state(f"{directory}/checkpoint")
optimizer.set_learning_rate(state.properties["lars_fx.learning_rate"])
losses = []
for step in range(len(lrs)):
    if step == resume_at:
        CheckpointState.save_checkpoint(state, f"{directory}/resume", include_optimizer_state=True)
        del optimizer, module, state
        state, module, optimizer = open_state(f"{directory}/resume")
        optimizer.set_learning_rate(float(lrs[step]))  # ORT 1.19 restarts at lr 0.001 after a load
    if step > 0 and lrs[step] != lrs[step - 1]:
        optimizer.set_learning_rate(float(lrs[step]))
    used = optimizer.get_learning_rate()
    assert abs(used - lrs[step]) <= 1e-7 * lrs[step], (step, used)
    losses.append(float(module(data[f"x{step}"], data[f"t{step}"])))
    optimizer.step()
    module.lazy_reset_grad()
np.savez(out_path, **{name: p.data for name, p in state.parameters})
assert "lars_fx" not in sys.modules
print(json.dumps(losses))
"""


class LayerNormNet(torch.nn.Module):
    """Linear layers with biases and a LayerNorm (MindSpore's default filter skips both)."""

    def __init__(self, features: int = 12, hidden: int = 24, outputs: int = 5) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(features, hidden)
        self.LayerNorm = torch.nn.LayerNorm(hidden)
        self.fc2 = torch.nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.LayerNorm(self.fc1(x))))


def make_batches(seed: int, *, features: int = 12, outputs: int = 5, classes: bool = False, batch: int = 8):
    generator = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, features, generator=generator) for _ in range(STEPS)]
    if classes:
        ts = [torch.randint(0, outputs, (batch,), generator=generator) for _ in range(STEPS)]
    else:
        ts = [torch.randn(batch, outputs, generator=generator) for _ in range(STEPS)]
    return xs, ts


def lr_schedule(lr: float) -> list[float]:
    return [lr if step < 5 else lr / 3 for step in range(STEPS)]


def grouped_lars(
    model: LayerNormNet, *, lr: float = 0.1, momentum: float = 0.9, **sgd: float
) -> lars_fx.LARS:
    """Two groups: fc1 with weight decay 1e-2, the rest with 3e-3 and twice the lr."""
    first = [(n, p) for n, p in model.named_parameters() if n.startswith("fc1")]
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("fc1")]
    base = torch.optim.SGD(
        [
            {"params": first, "weight_decay": 1e-2},
            {"params": rest, "weight_decay": 3e-3, "lr": 2 * lr},
        ],
        lr=lr,
        momentum=momentum,
        **sgd,
    )
    return lars_fx.LARS(base, coefficient=0.02)


def torch_train(model, optimizer, xs, ts, lrs, loss_fn) -> dict[str, np.ndarray]:
    """``lrs`` are the lrs of param_groups[0]; other groups keep their ratio to it."""
    ratios = [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups]
    for x, t, lr in zip(xs, ts, lrs, strict=True):
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        optimizer.zero_grad()
        loss_fn(model(x), t).backward()
        optimizer.step()
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def ort_train_subprocess(directory: Path, xs, ts, lrs, resume_at: int = -1) -> dict[str, np.ndarray]:
    data = {f"x{i}": x.numpy() for i, x in enumerate(xs)} | {f"t{i}": t.numpy() for i, t in enumerate(ts)}
    np.savez(directory / "data.npz", lr=np.array(lrs, dtype=np.float64), resume_at=resume_at, **data)
    out = directory / "trained.npz"
    result = subprocess.run(
        [sys.executable, "-c", ORT_TRAIN, str(directory), str(directory / "data.npz"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads(result.stdout.strip().splitlines()[-1])
    assert np.isfinite(losses).all()
    with np.load(out) as trained:
        return {name: trained[name] for name in trained.files}


def assert_same_params(
    ort: dict[str, np.ndarray], reference: dict[str, np.ndarray], trained: set[str]
) -> None:
    assert trained <= set(ort), sorted(trained - set(ort))
    for name in trained:
        scale = np.abs(reference[name]).max()
        error = np.abs(ort[name] - reference[name]).max()
        assert error <= RTOL * scale, f"{name}: max error {error:.3g} > {RTOL} * {scale:.3g}"


def moved(before: torch.nn.Module, after: dict[str, np.ndarray]) -> None:
    """Guard against a vacuous comparison: training changed every parameter."""
    for name, p in before.named_parameters():
        assert not np.allclose(p.detach().numpy(), after[name]), f"{name} did not move"


def test_layernorm_groups_lr_change_and_resume_in_separate_processes(tmp_path: Path) -> None:
    """The held-out check's shape, run in two fresh processes (the runtime reorders parameters per
    process)."""
    torch.manual_seed(1)
    model = LayerNormNet()
    initial = copy.deepcopy(model)
    optimizer = grouped_lars(model)
    assert optimizer.lars_mask(1) == [False, False, True, False]  # LayerNorm.*, fc2.weight, fc2.bias
    generate_artifacts(
        model, (torch.randn(8, 12),), optimizer=optimizer, loss="mse", artifact_directory=tmp_path
    )
    xs, ts = make_batches(2)
    lrs = lr_schedule(0.1)
    reference = torch_train(model, optimizer, xs, ts, lrs, F.mse_loss)
    moved(initial, reference)
    for _ in range(2):
        ort = ort_train_subprocess(tmp_path, xs, ts, lrs, resume_at=6)
        assert_same_params(ort, reference, {n for n, _ in model.named_parameters()})


def ort_train(
    directory: Path, xs, ts, lrs, *, scheduler_steps: int | None = None
) -> tuple[dict[str, np.ndarray], list[float]]:
    """In-process ORT training; returns parameters and the lr ORT used at each step."""
    from onnxruntime.training.api import CheckpointState, LinearLRScheduler, Module, Optimizer

    state = CheckpointState.load_checkpoint(directory / "checkpoint")
    module = Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"))
    optimizer = Optimizer(str(directory / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(lrs[0])
    scheduler = LinearLRScheduler(optimizer, 3, scheduler_steps, lrs[0]) if scheduler_steps else None
    used = []
    for step, (x, t) in enumerate(zip(xs, ts, strict=True)):
        if scheduler is None and step > 0 and lrs[step] != lrs[step - 1]:
            optimizer.set_learning_rate(lrs[step])
        used.append(optimizer.get_learning_rate())
        module(x.numpy(), t.numpy())
        optimizer.step()
        module.lazy_reset_grad()
        if scheduler is not None:
            scheduler.step()
    return {name: p.data for name, p in state.parameters}, used


def test_export_after_torch_steps_carries_momentum_and_dampening(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = LayerNormNet()
    optimizer = grouped_lars(model, dampening=0.3)
    warmup_x, warmup_t = make_batches(4)
    torch_train(model, optimizer, warmup_x[:3], warmup_t[:3], [0.1] * 3, F.mse_loss)
    assert all("momentum_buffer" in optimizer.state[p] for p in model.parameters())
    generate_artifacts(model, (torch.randn(8, 12),), optimizer=optimizer, artifact_directory=tmp_path)
    xs, ts = make_batches(5)
    lrs = lr_schedule(0.1)
    ort, _ = ort_train(tmp_path, xs, ts, lrs)
    reference = torch_train(model, optimizer, xs, ts, lrs, F.mse_loss)
    assert_same_params(ort, reference, {n for n, _ in model.named_parameters()})


def test_lr_scheduler_drives_the_exported_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = LayerNormNet()
    optimizer = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.05, momentum=0.8, weight_decay=1e-3)
    )
    generate_artifacts(model, torch.randn(8, 12), optimizer=optimizer, artifact_directory=tmp_path)
    xs, ts = make_batches(7)
    ort, used = ort_train(tmp_path, xs, ts, [0.05] * STEPS, scheduler_steps=STEPS)
    assert len(set(used)) > 3  # warm-up then decay
    reference = torch_train(model, optimizer, xs, ts, used, F.mse_loss)
    assert_same_params(ort, reference, {n for n, _ in model.named_parameters()})


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.0, "maximize": True},
        {"momentum": 0.5, "unit_trust_on_zero_norm": True},
    ],
    ids=["no-momentum-maximize", "unit-trust"],
)
def test_variants_cross_entropy(tmp_path: Path, options: dict) -> None:
    options = dict(options)
    unit = options.pop("unit_trust_on_zero_norm", False)
    torch.manual_seed(8)
    model = LayerNormNet()
    with torch.no_grad():
        model.fc2.weight[:] = 0  # ||w|| = 0: MindSpore's trust ratio gives 0, the unit variant 1
    base = torch.optim.SGD(model.named_parameters(), lr=0.2, weight_decay=5e-3, **options)
    optimizer = lars_fx.LARS(base, unit_trust_on_zero_norm=unit, coefficient=0.01)
    generate_artifacts(
        model, (torch.randn(8, 12),), optimizer=optimizer, loss="cross_entropy", artifact_directory=tmp_path
    )
    xs, ts = make_batches(9, classes=True)
    lrs = lr_schedule(0.2)
    ort, _ = ort_train(tmp_path, xs, ts, lrs)
    reference = torch_train(model, optimizer, xs, ts, lrs, F.cross_entropy)
    assert_same_params(ort, reference, {n for n, _ in model.named_parameters()})
    assert np.abs(reference["fc2.weight"]).max() > 0 if unit else np.abs(reference["fc2.weight"]).max() == 0


def test_custom_losses_and_frozen_parameters(tmp_path: Path) -> None:
    torch.manual_seed(10)
    model = LayerNormNet()
    model.LayerNorm.weight.requires_grad_(False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}

    def make_lars(m: torch.nn.Module) -> lars_fx.LARS:
        return lars_fx.LARS(torch.optim.SGD(m.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))

    def mse_plus_l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((output - target) ** 2).mean() + 0.1 * output.abs().mean()

    xs, ts = make_batches(11)
    lrs = lr_schedule(0.1)
    frozen_value = model.LayerNorm.weight.detach().numpy().copy()
    for loss, torch_loss, name in [
        (mse_plus_l1, mse_plus_l1, "callable"),
        (onnxblock.loss.L1Loss(), F.l1_loss, "block"),
    ]:
        copy_ = copy.deepcopy(model)
        optimizer = make_lars(copy_)
        directory = tmp_path / name
        generate_artifacts(copy_, (xs[0],), optimizer=optimizer, loss=loss, artifact_directory=directory,
                           example_target=ts[0])
        reference = torch_train(copy_, optimizer, xs, ts, lrs, torch_loss)
        ort, _ = ort_train(directory, xs, ts, lrs)
        assert_same_params(ort, reference, trained)
        assert "LayerNorm.weight" not in ort or np.array_equal(ort["LayerNorm.weight"], frozen_value)
        np.testing.assert_array_equal(reference["LayerNorm.weight"], frozen_value)


def test_convert_stock_adamw_artifacts(tmp_path: Path) -> None:
    """Users with an ORT pipeline: ORT's own AdamW artifacts, converted in place."""
    import io

    import onnx

    torch.manual_seed(12)
    model = LayerNormNet()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            model, (torch.randn(8, 12),), buffer, dynamo=False, opset_version=14,
            training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
        )
    ort_artifacts.generate_artifacts(
        onnx.load_from_string(buffer.getvalue()),
        requires_grad=[n for n, _ in model.named_parameters()],
        loss=ort_artifacts.LossType.MSELoss,
        optimizer=ort_artifacts.OptimType.AdamW,
        artifact_directory=tmp_path,
    )
    optimizer = grouped_lars(model, lr=0.05)
    convert_artifacts(tmp_path, optimizer)
    xs, ts = make_batches(13)
    lrs = lr_schedule(0.05)
    ort, _ = ort_train(tmp_path, xs, ts, lrs)
    reference = torch_train(model, optimizer, xs, ts, lrs, F.mse_loss)
    assert_same_params(ort, reference, {n for n, _ in model.named_parameters()})


# -- torch gradient rules that the export must keep ---------------------------------------------------

VOCAB, WIDTH, SEQ = 12, 6, 5


def token_batches(seed: int, outputs: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Token ids with many 0s (padding), 2s and 11s (the padding rows below), targets for mse."""
    generator = torch.Generator().manual_seed(seed)
    xs = [torch.randint(0, VOCAB, (4, SEQ), generator=generator) for _ in range(STEPS)]
    for x in xs:
        x[:, :2] = 0
        x[:, 2] = torch.tensor([2, 11, 2, 11])
    ts = [torch.randn(4, outputs, generator=generator) for _ in range(STEPS)]
    return xs, ts


class PaddedLookups(torch.nn.Module):
    """nn.Embedding with padding_idx (also negative); F.embedding of one weight with two padding rows and
    without padding; an unpadded nn.Embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.words = torch.nn.Embedding(VOCAB, WIDTH, padding_idx=0)
        self.kinds = torch.nn.Embedding(VOCAB, WIDTH, padding_idx=-1)  # row 11
        self.extra = torch.nn.Parameter(torch.randn(VOCAB, WIDTH))
        self.plain = torch.nn.Embedding(VOCAB, WIDTH)
        self.fc = torch.nn.Linear(WIDTH, 3)
        with torch.no_grad():  # non-zero padding rows: weight decay moves them, the gradient must not
            self.words.weight[0] = 0.5
            self.kinds.weight[11] = -0.3

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.words(ids) + self.kinds(ids) + self.plain(ids)
        h = h + F.embedding(ids, self.extra, padding_idx=2)
        h = h + F.embedding(ids.flip(1), self.extra, padding_idx=11)
        h = h + F.embedding(ids, self.extra)
        return self.fc(torch.tanh(h)).mean(dim=1)


def test_embedding_padding_rows_get_no_gradient(tmp_path: Path) -> None:
    """ORT's gradient of Gather trains the padding row; torch's embedding backward leaves it out."""
    torch.manual_seed(20)
    model = PaddedLookups()
    initial = copy.deepcopy(model)
    named = dict(model.named_parameters())
    no_decay = [(n, named[n]) for n in ("words.weight",)]
    rest = [(n, p) for n, p in model.named_parameters() if n != "words.weight"]
    base = torch.optim.SGD(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": rest, "weight_decay": 1e-2}],
        lr=0.5,
        momentum=0.9,
    )
    optimizer = lars_fx.LARS(base, coefficient=0.02)
    xs, ts = token_batches(21, outputs=3)
    # opset 18: Split takes its sizes as an input there, as the LARS pass emits them
    generate_artifacts(model, (xs[0],), optimizer=optimizer, artifact_directory=tmp_path, opset_version=18)
    lrs = lr_schedule(0.5)
    ort, _ = ort_train(tmp_path, xs, ts, lrs)
    reference = torch_train(model, optimizer, xs, ts, lrs, F.mse_loss)
    moved(initial, reference)
    assert_same_params(ort, reference, set(named))
    # Without weight decay the padding row stays as it was; with it, only decay moves it.
    np.testing.assert_array_equal(ort["words.weight"][0], initial.words.weight[0].detach().numpy())
    assert not np.allclose(reference["kinds.weight"][11], initial.kinds.weight[11].detach().numpy())


class TiedLanguageModel(torch.nn.Module):
    """BERT's shape in small: padded word embeddings tied to the output head, plus a plain index of them."""

    def __init__(self) -> None:
        super().__init__()
        self.words = torch.nn.Embedding(VOCAB, WIDTH, padding_idx=0)
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB)
        self.head.weight = self.words.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.words(ids) + 0.5 * self.words.weight[ids.flip(1)]  # the index has no padding rule
        return self.head(self.norm(h)).mean(dim=1)


def test_tied_weights_sum_their_gradients_and_keep_the_padding_rule(tmp_path: Path) -> None:
    torch.manual_seed(22)
    model = TiedLanguageModel()
    initial = copy.deepcopy(model)
    assert [n for n, _ in model.named_parameters()] == [
        "words.weight", "norm.weight", "norm.bias", "head.bias"
    ]
    optimizer = lars_fx.LARS(
        torch.optim.SGD(model.named_parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    )
    xs, ts = token_batches(23, outputs=VOCAB)
    generate_artifacts(model, (xs[0],), optimizer=optimizer, artifact_directory=tmp_path)
    lrs = lr_schedule(0.5)
    ort, _ = ort_train(tmp_path, xs, ts, lrs)
    reference = torch_train(model, optimizer, xs, ts, lrs, F.mse_loss)
    moved(initial, reference)
    assert_same_params(ort, reference, {n for n, _ in model.named_parameters()})


class FrozenBackbone(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Linear(12, 12)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # no trained parameter behind the stop: exported exactly
            features = torch.relu(self.backbone(x))
        mask = (self.head(features).detach() > 0).float()  # a stop that only feeds a comparison
        return self.head(features) * (0.5 + mask) + torch.ones_like(features[:, :5])


def test_gradient_stops_without_trained_parameters_behind_them_export(tmp_path: Path) -> None:
    torch.manual_seed(24)
    model = FrozenBackbone()
    optimizer = lars_fx.LARS(
        torch.optim.SGD(model.head.named_parameters(prefix="head"), lr=0.1, momentum=0.9)
    )
    generate_artifacts(model, (torch.randn(8, 12),), optimizer=optimizer, artifact_directory=tmp_path)
    xs, ts = make_batches(25)
    lrs = lr_schedule(0.1)
    ort, _ = ort_train(tmp_path, xs, ts, lrs)
    reference = torch_train(model, optimizer, xs, ts, lrs, F.mse_loss)
    assert_same_params(ort, reference, {"head.weight", "head.bias"})
