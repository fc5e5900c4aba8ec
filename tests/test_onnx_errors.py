"""What ONNX Runtime cannot run exactly is refused at export time, with the option and the fix named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lars_fx
from lars_fx.onnx import LarsSpec, ParamSpec, convert_artifacts, generate_artifacts


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


def export(tmp_path: Path, model: torch.nn.Module, optimizer, **kwargs) -> None:
    generate_artifacts(model, (torch.randn(3, 4),), optimizer=optimizer, artifact_directory=tmp_path, **kwargs)


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
    with pytest.raises(TypeError, match="optimizer must be a lars_fx.LARS"):
        export(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    adam = lars_fx.LARS(torch.optim.Adam(model.named_parameters(), lr=0.1))
    with pytest.raises(ValueError, match="LARS over torch.optim.SGD only, got Adam"):
        export(tmp_path, model, adam)


def test_group_settings(tmp_path: Path) -> None:
    model = net()
    params = list(model.named_parameters())
    mixed = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "momentum": 0.5}], lr=0.1, momentum=0.9)
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
    tied = net()
    tied.add_module("again", tied[0])
    with pytest.raises(ValueError, match="tied weights"):
        export(tmp_path, tied, lars(tied))

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
    with pytest.raises(ValueError, match="unsupported op CumSum .* has no gradient"):
        export(tmp_path, model, lars(model))

    class ErfInv(CumSum):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.erfinv(torch.tanh(self.linear(x)))

    model = ErfInv()
    with pytest.raises(ValueError, match="torch.onnx.export could not export the model"):
        export(tmp_path, model, lars(model))


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
