"""What ONNX Runtime cannot run exactly is refused at export time, with the option and the fix named."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F

import lars_fx
from lars_fx.onnx import LarsSpec, ParamSpec, convert_artifacts, generate_artifacts
from lars_fx.passes.onnx_embedding_padding import EmbeddingPaddingPass


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


def export(tmp_path: Path, model: torch.nn.Module, optimizer, **kwargs) -> None:
    generate_artifacts(
        model, (torch.randn(3, 4),), optimizer=optimizer, artifact_directory=tmp_path, **kwargs
    )


def lars(model: torch.nn.Module, lars_options: dict | None = None, **sgd) -> lars_fx.LARS:
    sgd = {"lr": 0.1, "momentum": 0.9} | sgd
    return lars_fx.LARS(torch.optim.SGD(model.named_parameters(), **sgd), **(lars_options or {}))


@pytest.mark.parametrize(
    ("sgd", "lars_options", "message"),
    [
        ({"nesterov": True}, {}, "nesterov=True cannot be exported"),
        ({"dampening": 0.1}, {}, "dampening=0.1 can be exported only with momentum buffers"),
        ({}, {"use_clip": True}, "use_clip=True cannot be exported"),
        ({}, {"lr_inside_momentum": True}, "lr_inside_momentum=True cannot be exported"),
        ({}, {"skip_nonfinite": True}, "skip_nonfinite=True cannot be exported"),
    ],
)
def test_inexpressible_options(tmp_path: Path, sgd: dict, lars_options: dict, message: str) -> None:
    model = net()
    with pytest.raises(ValueError, match=message):
        export(tmp_path, model, lars(model, lars_options, **sgd))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_optimizer_types(tmp_path: Path) -> None:
    model = net()
    with pytest.raises(TypeError, match=r"optimizer must be a lars_fx\.LARS"):
        export(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    adam = lars_fx.LARS(torch.optim.Adam(model.named_parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"LARS over torch\.optim\.SGD only, got Adam"):
        export(tmp_path, model, adam)


def test_group_settings(tmp_path: Path) -> None:
    model = net()
    params = list(model.named_parameters())
    mixed = torch.optim.SGD(
        [{"params": params[:2]}, {"params": params[2:], "momentum": 0.5}], lr=0.1, momentum=0.9
    )
    with pytest.raises(ValueError, match="different momentum values"):
        export(tmp_path, model, lars_fx.LARS(mixed))
    zero_base = torch.optim.SGD([{"params": params[:2], "lr": 0.0}, {"params": params[2:]}], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has lr=0"):
        export(tmp_path, model, lars_fx.LARS(zero_base))
    with pytest.raises(ValueError, match="momentum must be in"):
        LarsSpec(lr=0.1, momentum=1.0, params={"w": ParamSpec(lars=True)})


def test_parameters_that_the_export_cannot_place(tmp_path: Path) -> None:
    model = net()
    other = net()
    with pytest.raises(ValueError, match="not a parameter of the model being exported"):
        export(tmp_path, model, lars(other))

    class Unused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    unused = Unused()
    with pytest.raises(ValueError, match=r"\['unused.bias', 'unused.weight'\] are trained by the optimizer"):
        export(tmp_path, unused, lars(unused))


def test_unsupported_ops(tmp_path: Path) -> None:
    class CumSum(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(self.linear(x), dim=1)

    model = CumSum()
    with pytest.raises(ValueError, match=r"unsupported op CumSum .* has no gradient"):
        export(tmp_path, model, lars(model))

    class ErfInv(CumSum):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.erfinv(torch.tanh(self.linear(x)))

    model = ErfInv()
    with pytest.raises(ValueError, match=r"torch\.onnx\.export could not export the model"):
        export(tmp_path, model, lars(model))


class Wrapped(torch.nn.Module):
    """``body(self, x)`` around a Linear(4, 4), for the gradient rules below."""

    def __init__(self, body: Callable, **modules: torch.nn.Module) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.body = body
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self, x)


class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.round()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad


def no_grad_body(self: Wrapped, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        scale = self.fc(x)
    return self.fc(x) * scale


def ema_body(self: Wrapped, x: torch.Tensor) -> torch.Tensor:
    y = self.fc(x)
    self.ema.mul_(0.9).add_(0.1 * y.mean(0))  # state carried from step to step: lost in the export
    return y


def with_ema() -> Wrapped:
    model = Wrapped(ema_body)
    model.register_buffer("ema", torch.zeros(4))
    return model


def hooked_module() -> torch.nn.Module:
    model = net()
    model[0].register_full_backward_hook(lambda *args: None)
    return model


def hooked_parameter() -> torch.nn.Module:
    model = net()
    model[2].weight.register_hook(lambda grad: 2 * grad)
    return model


def embedding(**options) -> Wrapped:
    return Wrapped(
        lambda self, x: self.fc(self.emb((x.abs() * 3).long()).sum(1)),
        emb=torch.nn.Embedding(12, 4, **options),
    )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Wrapped(lambda self, x: x + (self.fc(x) - x).detach()),
         r"depends on Tensor.detach\(\) of a value"),
        (lambda: Wrapped(no_grad_body), r"depends on linear under torch.no_grad\(\)"),
        (lambda: Wrapped(lambda self, x: self.fc(x) * self.fc.weight.data.sum()), "depends on Tensor.data"),
        (lambda: Wrapped(lambda self, x: StraightThrough.apply(self.fc(x))),
         "custom autograd.Function .*StraightThrough"),
        (hooked_module, "a module has a backward hook"),
        (hooked_parameter, r"parameters \['2.weight'\] have gradient hooks"),
        (lambda: embedding(max_norm=1.0), "nn.Embedding 'emb' has max_norm=1.0: .* Use max_norm=None"),
        (lambda: embedding(scale_grad_by_freq=True), "nn.Embedding 'emb' has scale_grad_by_freq=True"),
        (lambda: embedding(sparse=True), "nn.Embedding 'emb' has sparse=True: .* Use sparse=False"),
        (
            lambda: Wrapped(lambda self, x: self.fc(self.bag((x.abs() * 3).long())),
                            bag=torch.nn.EmbeddingBag(12, 4)),
            "nn.EmbeddingBag 'bag' is exported as an ONNX Loop",
        ),
        (
            lambda: Wrapped(
                lambda self, x: self.fc(torch.embedding(self.emb.weight, (x.abs() * 3).long(), 0).sum(1)),
                emb=torch.nn.Embedding(12, 4),
            ),
            r"torch.embedding\(\.\.\., padding_idx=0\) is called directly",
        ),
        (with_ema, r"buffers \['ema'\] change in forward"),
        (
            lambda: Wrapped(
                lambda self, x: self.fc(F.batch_norm(x, torch.zeros(4), torch.ones(4), training=True))
            ),
            "F.batch_norm in training mode with running statistics",
        ),
    ],
    ids=[
        "detach", "no_grad", "data", "autograd-function", "module-hook", "parameter-hook",
        "max_norm", "scale_grad_by_freq", "sparse", "embedding-bag", "aten-embedding", "buffer-update",
        "functional-batch-norm",
    ],
)  # fmt: skip
def test_gradient_rules_the_export_would_lose(tmp_path: Path, build: Callable, message: str) -> None:
    """torch's autograd does something the exported forward ops cannot tell ONNX Runtime: refused, named."""
    model = build()
    with pytest.raises(ValueError, match=message):
        export(tmp_path, model, lars(model))
    assert not list(tmp_path.iterdir())


def test_convert_warns_that_it_cannot_see_padding_idx(tmp_path: Path) -> None:
    import io
    import warnings

    import onnx
    from onnxruntime.training import artifacts as ort_artifacts

    model = Wrapped(lambda self, x: self.fc(self.emb(x).sum(1)), emb=torch.nn.Embedding(12, 4, padding_idx=0))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randint(0, 12, (3, 5)),), buffer, dynamo=False, opset_version=14,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False, input_names=["input"], dynamic_axes={"input": {0: "n"}},
        )
    ort_artifacts.generate_artifacts(
        onnx.load_from_string(buffer.getvalue()), requires_grad=[n for n, _ in model.named_parameters()],
        loss=ort_artifacts.LossType.MSELoss, optimizer=ort_artifacts.OptimType.SGD,
        artifact_directory=tmp_path,
    )
    training = ir.load(tmp_path / "training_model.onnx")  # before convert_artifacts rewrites it
    with pytest.warns(UserWarning, match=r"\['emb.weight'\] are looked up by Gather .*generate_artifacts"):
        convert_artifacts(tmp_path, lars(model))
    # Told the padding row, the pass still refuses: this exporter did not mark which lookup has it.
    with pytest.raises(ir.passes.PreconditionError, match=r"no marked embedding lookup of 'emb\.weight'"):
        EmbeddingPaddingPass({"emb.weight": {0}})(training)


def test_batch_norm(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"batch norm layers \['1'\] cannot be exported .* Use LayerNorm"):
        export(tmp_path, model, lars(model))


def test_losses_and_inputs(tmp_path: Path) -> None:
    model = net()
    optimizer = lars(model)
    with pytest.raises(ValueError, match="loss must be one of"):
        export(tmp_path, model, optimizer, loss="hinge")
    with pytest.raises(TypeError, match="loss must be a string"):
        export(tmp_path, model, optimizer, loss=3)
    with pytest.raises(ValueError, match="needs example_target"):
        export(tmp_path, model, optimizer, loss=torch.nn.functional.l1_loss)
    with pytest.raises(TypeError, match="example_inputs must be"):
        generate_artifacts(model, [[1.0]], optimizer=optimizer, artifact_directory=tmp_path)


def test_convert_needs_unconverted_artifacts(tmp_path: Path) -> None:
    model = net()
    with pytest.raises(ValueError, match="lacks"):
        convert_artifacts(tmp_path, lars(model))
    export(tmp_path / "lars", model, lars(model))
    before = {p.name: p.read_bytes() for p in (tmp_path / "lars").iterdir()}
    with pytest.raises(ValueError, match="already goes through LARS"):
        convert_artifacts(tmp_path / "lars", lars(model))
    assert {p.name: p.read_bytes() for p in (tmp_path / "lars").iterdir()} == before
