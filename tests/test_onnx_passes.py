"""The ONNX passes one at a time: the traced trust ratio, the optimizer rewrite, the IR cap, the dumps."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest
import torch
from onnxruntime.training import artifacts as ort_artifacts
from onnxruntime.training import onnxblock

import lars_fx
from lars_fx.functional import trust_ratio
from lars_fx.onnx import convert_artifacts
from lars_fx.passes.onnx_ir_version import IrVersionPass
from lars_fx.passes.onnx_lars_gradients import (
    GradientRule,
    LarsGradientsPass,
    _Constants,
    _Symbol,
    emit_trust_ratio,
)
from lars_fx.passes.onnx_momentum_optimizer import MomentumOptimizerPass


def trust_ratio_session(**options) -> onnxruntime.InferenceSession:
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 14}, name="trust_ratio")
    w_norm = ir.val("w_norm", ir.DataType.FLOAT, ir.Shape(["n"]))
    g_norm = ir.val("g_norm", ir.DataType.FLOAT, ir.Shape(["n"]))
    graph.inputs.extend([w_norm, g_norm])
    tape = ir.tape.Tape(graph)
    coeff = emit_trust_ratio(tape, _Constants(graph), w_norm, g_norm, **options)
    coeff.name, coeff.dtype = "coeff", ir.DataType.FLOAT
    graph.extend(tape.nodes)
    graph.outputs.append(coeff)
    return onnxruntime.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=8)).SerializeToString())


@pytest.mark.parametrize(
    "options",
    [
        {"weight_decay": 1e-4, "coefficient": 0.001, "epsilon": 1e-5},
        {"weight_decay": 0.05, "coefficient": 0.02, "epsilon": 1e-8, "unit_trust_on_zero_norm": True},
        {"weight_decay": 1e-3, "coefficient": 0.01, "epsilon": 1e-5, "use_clip": True, "lr": 0.3},
    ],
    ids=["mindspore", "unit-trust", "clip"],
)
def test_traced_trust_ratio_matches_functional(options: dict) -> None:
    generator = torch.Generator().manual_seed(0)
    w_norm = torch.rand(64, generator=generator) * 10
    g_norm = torch.rand(64, generator=generator) * torch.logspace(-6, 1, 64)
    w_norm[:3], g_norm[3:6] = 0, 0
    expected = trust_ratio(w_norm, g_norm, **options)
    (got,) = trust_ratio_session(**options).run(None, {"w_norm": w_norm.numpy(), "g_norm": g_norm.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=0)


def test_untranslatable_operation_raises() -> None:
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 14})
    symbol = _Symbol(ir.val("x", ir.DataType.FLOAT, ir.Shape([])), ir.tape.Tape(graph), _Constants(graph))
    with pytest.raises(TypeError, match="no ONNX translation for sqrt"):
        torch.sqrt(symbol)
    with pytest.raises(TypeError, match="cannot translate operand"):
        symbol * "2"


def stock_artifacts(directory: Path, optimizer, features: int = 6) -> list[str]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(features, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(4, features),), buffer, dynamo=False, opset_version=14,
            training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
        )
    names = [n for n, _ in model.named_parameters()]
    directory.mkdir(parents=True, exist_ok=True)
    ort_artifacts.generate_artifacts(
        onnx.load_from_string(buffer.getvalue()), requires_grad=names, loss=ort_artifacts.LossType.MSELoss,
        optimizer=optimizer, artifact_directory=directory,
    )
    return names


@pytest.mark.parametrize(
    "stock", [ort_artifacts.OptimType.SGD, ort_artifacts.OptimType.AdamW], ids=["sgd", "adamw"]
)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_momentum_optimizer_pass(tmp_path: Path, stock, momentum: float) -> None:
    stock_artifacts(tmp_path, stock)
    model = ir.load(tmp_path / "optimizer_model.onnx")
    MomentumOptimizerPass(momentum)(model)
    (node,) = list(model.graph)
    inputs = [v.name for v in model.graph.inputs]
    if momentum == 0:
        assert node.op_type == "SGDOptimizerV2"
        assert [v.name for v in node.inputs] == ["learning_rate", "params", "gradients"]
        assert "second_order_moments" not in inputs
    else:
        assert node.op_type == "AdamWOptimizer"
        assert [v.name for v in node.inputs] == inputs
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        assert attributes == {
            "alpha": pytest.approx(momentum), "beta": 1.0, "epsilon": 1.0,
            "weight_decay": 0.0, "correct_bias": 0, "adam_mode": 1,
        }
    assert [v.name for v in model.graph.outputs] == [node.outputs[0].name]


def test_clip_grad_optimizer_is_refused(tmp_path: Path) -> None:
    names = stock_artifacts(tmp_path, onnxblock.optim.AdamW(clip_grad=onnxblock.optim.ClipGradNorm(1.0)))
    spec = lars_fx.onnx.LarsSpec(
        lr=0.1, momentum=0.9, params={n: lars_fx.onnx.ParamSpec(lars=True) for n in names}
    )
    with pytest.raises(ValueError, match=r"exactly one .* SGDOptimizerV2 or AdamWOptimizer"):
        convert_artifacts(tmp_path, spec, output_directory=tmp_path / "out")


def test_gradient_pass_rewrites_each_accumulator_and_checks_names(tmp_path: Path) -> None:
    names = stock_artifacts(tmp_path, ort_artifacts.OptimType.SGD)
    rules = {name: GradientRule(lars="weight" in name, weight_decay=1e-3, scale=10.0) for name in names}
    model = ir.load(tmp_path / "training_model.onnx")
    LarsGradientsPass(rules, coefficient=0.001, epsilon=1e-5)(model)
    accumulators = [n for n in model.graph if n.op_type == "InPlaceAccumulatorV2"]
    assert sorted(n.inputs[1].name for n in accumulators) == sorted(f"{n}_grad.lars" for n in names)
    assert sum(n.op_type == "ReduceL2" for n in model.graph) == 2 * 2  # ||w||, ||g|| of the two weights
    model = ir.load(tmp_path / "training_model.onnx")
    with pytest.raises(ir.passes.PreconditionError, match=r"trainable parameters \['0.bias'\]"):
        LarsGradientsPass({n: r for n, r in rules.items() if n != "0.bias"}, coefficient=0.001, epsilon=1e-5)(
            model
        )
    with pytest.raises(ir.passes.PreconditionError, match=r"\['extra'\] have LARS rules"):
        LarsGradientsPass(rules | {"extra": rules["0.bias"]}, coefficient=0.001, epsilon=1e-5)(model)


def test_ir_version_pass(tmp_path: Path) -> None:
    stock_artifacts(tmp_path, ort_artifacts.OptimType.SGD)
    model = ir.load(tmp_path / "optimizer_model.onnx")
    assert model.ir_version > 10  # what onnx >= 1.19 writes, and ORT 1.19 refuses
    assert IrVersionPass()(model).modified and model.ir_version == 10
    model.graph.opset_imports[""] = 22
    with pytest.raises(ir.passes.PreconditionError, match="opset 22"):
        IrVersionPass()(model)


def test_dumps_before_and_after_each_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = stock_artifacts(tmp_path / "stock", ort_artifacts.OptimType.AdamW)
    dump = tmp_path / "dump"
    monkeypatch.setenv("LARS_FX_DUMP", str(dump))
    spec = lars_fx.onnx.LarsSpec(
        lr=0.1, momentum=0.9, params={n: lars_fx.onnx.ParamSpec(lars=True) for n in names}
    )
    convert_artifacts(tmp_path / "stock", spec, output_directory=tmp_path / "lars")
    before = dump / "training_model.1.LarsGradientsPass.before.txt"
    after = dump / "training_model.1.LarsGradientsPass.after.txt"
    assert "ReduceL2" not in before.read_text() and "ReduceL2" in after.read_text()
    optimizer_after = (dump / "optimizer_model.0.MomentumOptimizerPass.after.txt").read_text()
    assert "beta=1.0" in optimizer_after and "correct_bias=0" in optimizer_after
    assert len(list(dump.glob("*.txt"))) == 2 * 6  # training 3 passes, eval 1, optimizer 2
