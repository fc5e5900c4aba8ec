"""The lars-fx command: each subcommand, its help, and its one-line errors for user mistakes."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from lars_fx.cli import main

FACTORIES = '''
import torch
import lars_fx


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def tiny():
    model = _model()
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return model, lars_fx.LARS(sgd), torch.randn(3, 4)


def no_inputs():
    model, optimizer, _ = tiny()
    return model, optimizer


def only_model():
    return _model()


def plain_sgd():
    model = _model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def bad_inputs():
    model, optimizer, _ = tiny()
    return model, optimizer, [1, 2]


def clipped():
    model = _model()
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    return model, lars_fx.LARS(sgd, use_clip=True), torch.randn(3, 4)


def over_adam():
    model = _model()
    return model, lars_fx.LARS(torch.optim.Adam(model.named_parameters(), lr=0.1)), torch.randn(3, 4)


def frozen():
    model, optimizer, inputs = tiny()
    model.requires_grad_(False)
    return model, optimizer, inputs


def lamb():
    model = _model()
    return model, lars_fx.LAMB(model.named_parameters(), weight_decay=0.01), torch.randn(3, 4)


def broken():
    raise RuntimeError("the factory broke\\nsecond line")


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return path


def _error_line(capsys, command: str) -> str:
    """The run's stderr must end in exactly one error line, with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"lars-fx {command}: error: "), err
    assert sum(line.startswith("lars-fx") and "error" in line for line in err.splitlines()) == 1
    return last


# -- help ----------------------------------------------------------------------------------------


def test_help_lists_commands_and_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("inspect", "export", "bench", "examples:", "lars-fx inspect my_factories:tiny"):
        assert text in out


@pytest.mark.parametrize("command", ["inspect", "export", "bench"])
def test_command_help(capsys, command):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"lars-fx {command}" in out and "example" in out
    if command != "bench":
        assert "(model, optimizer, example_inputs)" in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("lars-fx 0.1.0")


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err


# -- MODULE:FACTORY mistakes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, message",
    [
        ("no_colon_here", "expected MODULE:FACTORY"),
        (":tiny", "expected MODULE:FACTORY"),
        ("surely_not_a_module_xyz:tiny", "no module named 'surely_not_a_module_xyz'"),
        ("does/not/exist.py:tiny", "does/not/exist.py: no such file"),
    ],
)
def test_bad_factory_reference(capsys, ref, message):
    assert main(["inspect", ref]) == 2
    assert message in _error_line(capsys, "inspect")


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", "has no attribute 'missing'"),
        ("NOT_A_FUNCTION", "is a int, not a function"),
        ("only_model",
         "must return (model, optimizer) or (model, optimizer, example_inputs), got a Sequential"),
        ("plain_sgd", "returned a SGD as the optimizer; expected a lars_fx.LARS (or a lars_fx.LAMB)"),
        ("bad_inputs", "returned a list as example_inputs"),
        ("broken", "calling {path}:broken failed: RuntimeError: the factory broke"),
        ("over_adam",
         "the fused step, which is LARS over torch.optim.SGD; {path}:over_adam's LARS wraps Adam"),
        ("frozen", "the backward pass failed: RuntimeError: element 0 of tensors does not require grad"),
    ],
)
def test_factory_returning_the_wrong_thing(capsys, factories, name, message):
    assert main(["inspect", f"{factories}:{name}"]) == 2
    assert message.format(path=factories) in _error_line(capsys, "inspect")


def test_factory_from_a_dotted_module_in_the_current_folder(capsys, factories, monkeypatch):
    module = f"cli_factories_{uuid.uuid4().hex[:8]}"
    factories.rename(factories.with_name(f"{module}.py"))
    monkeypatch.chdir(factories.parent)
    monkeypatch.syspath_prepend(str(factories.parent))
    assert main(["inspect", f"{module}:only_model"]) == 2  # imported, then rejected for what it returned
    assert "got a Sequential" in _error_line(capsys, "inspect")


def test_out_folder_whose_parent_is_missing(capsys, factories, tmp_path):
    out = tmp_path / "missing" / "ir"
    assert main(["inspect", f"{factories}:tiny", "--out", str(out)]) == 2
    assert f"parent folder {out.parent} does not exist" in _error_line(capsys, "inspect")
    assert not out.parent.exists()


def test_out_that_is_a_file(capsys, factories):
    assert main(["export", f"{factories}:tiny", "--out", str(factories)]) == 2
    assert "exists and is not a folder" in _error_line(capsys, "export")


# -- inspect ---------------------------------------------------------------------------------------


def test_inspect_prints_pipeline_graphs_and_counts(capsys, factories):
    assert main(["inspect", f"{factories}:tiny"]) == 0
    out = capsys.readouterr().out
    assert "pass" in out.lower()
    assert "nodes" in out and "kernels" in out
    assert "graph" in out.lower()


def test_inspect_shows_the_lamb_pipeline(capsys, factories):
    assert main(["inspect", f"{factories}:lamb"]) == 0
    out = capsys.readouterr().out
    assert "match_adam_update" in out and "rewrite_lamb_update" in out and "lamb_trust_ratio" in out
    assert "kernels" in out


def test_inspect_without_inputs_writes_stages_to_a_folder(capsys, factories, tmp_path):
    out = tmp_path / "ir"
    assert main(["inspect", f"{factories}:no_inputs", "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) >= 2, written
    assert all((out / name).stat().st_size > 0 for name in written)
    assert str(out) in capsys.readouterr().out


# -- export ----------------------------------------------------------------------------------------


def test_export_needs_example_inputs(capsys, factories, tmp_path):
    assert main(["export", f"{factories}:no_inputs", "--out", str(tmp_path / "a")]) == 2
    assert "must return (model, optimizer, example_inputs) for export" in _error_line(capsys, "export")


def test_export_writes_onnx_training_artifacts(capsys, factories, tmp_path):
    out = tmp_path / "artifacts"
    assert main(["export", f"{factories}:tiny", "--out", str(out)]) == 0
    onnx_files = sorted(p.name for p in out.glob("*.onnx"))
    assert len(onnx_files) >= 2, onnx_files  # at least the training and optimizer models
    printed = capsys.readouterr().out
    assert all(name in printed for name in onnx_files)


def test_export_hides_onnx_runtime_log_unless_verbose(capfd, factories, tmp_path):
    # ONNX Runtime's C++ logger writes ~20 "[I:onnxruntime:...] GraphTransformer ..." lines to descriptor 2.
    assert main(["export", f"{factories}:tiny", "--out", str(tmp_path / "quiet")]) == 0
    quiet = capfd.readouterr()
    assert "onnxruntime" not in quiet.err + quiet.out
    assert "exporting ONNX training artifacts" in quiet.err  # lars-fx's own progress still shows
    assert main(["export", f"{factories}:tiny", "--out", str(tmp_path / "verbose"), "--verbose"]) == 0
    assert "[I:onnxruntime" in capfd.readouterr().err


def test_export_refuses_lamb_in_one_line(capsys, factories, tmp_path):
    assert main(["export", f"{factories}:lamb", "--out", str(tmp_path / "a")]) == 2
    error = _error_line(capsys, "export")
    assert "returned a lars_fx.LAMB; export writes LARS training artifacts only" in error


def test_export_refusal_is_one_line(capsys, factories, tmp_path):
    assert main(["export", f"{factories}:clipped", "--out", str(tmp_path / "a")]) == 2
    assert "use_clip=True cannot be exported" in _error_line(capsys, "export")


# -- bench -----------------------------------------------------------------------------------------


def test_bench_prints_the_table_with_progress(capsys, tmp_path):
    table = tmp_path / "bench.md"
    argv = ["bench", "--device", "cpu", "--peers", "lars_foreach", "sgd_foreach",
            "--warmup", "1", "--iters", "2"]
    threads = torch.get_num_threads()
    try:
        assert main([*argv, "--threads", "1", "--out", str(table)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert "| LARS (foreach), eager |" in captured.out and "| SGD foreach, eager, no LARS |" in captured.out
    assert "resnet50 shapes on cpu" in captured.out
    progress = [line for line in captured.err.splitlines() if line.startswith("lars-fx bench [")]
    assert any("lars_foreach" in line for line in progress)  # live progress on stderr
    assert table.read_text() == captured.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "tpu9"], "--device 'tpu9': not a torch device"),
        (["--device", "cpu", "--peers", "nope"], "--peers: nope not available on cpu"),
        (["--device", "cpu", "--out", "/no/such/folder/bench.md"], "folder /no/such/folder does not exist"),
    ],
)
def test_bench_usage_errors(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    assert message in _error_line(capsys, "bench")


def test_bench_unknown_model_is_rejected_by_the_parser(capsys):
    assert main(["bench", "--model", "gpt5"]) == 2
    assert "invalid choice: 'gpt5'" in capsys.readouterr().err


# -- the installed script --------------------------------------------------------------------------


def test_installed_script_reports_one_line_and_exit_code_2(factories):
    script = Path(sys.executable).with_name("lars-fx")
    assert script.exists(), "pip install -e . creates the lars-fx console script"
    ok = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "inspect" in ok.stdout
    bad = subprocess.run(
        [str(script), "inspect", f"{factories}:plain_sgd"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("lars-fx inspect: error: ")


# -- export --format executorch ----------------------------------------------------------------------

EXECUTORCH_FACTORIES = '''
import torch
import lars_fx


def _lars(model):
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return lars_fx.LARS(sgd)


def batch_norm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    return model, _lars(model), torch.randn(3, 4)


def avg_pool():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 2)
    )
    return model, _lars(model), torch.randn(3, 1, 4, 4)
'''


@pytest.fixture
def executorch_factories(tmp_path: Path) -> Path:
    path = tmp_path / "executorch_factories.py"
    path.write_text(EXECUTORCH_FACTORIES)
    return path


def _methods(path: Path) -> dict:
    """All four methods, loaded before any runs: loading a method resets the program's shared state."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path)
    return {name: program.load_method(name) for name in ("train_step", "predict", "get_state", "set_state")}


@pytest.mark.parametrize(
    "options, loss, file_name",
    [
        ([], "mse", "model.pte"),
        (["--loss", "cross_entropy", "--name", "tiny.pte"], "cross_entropy", "tiny.pte"),
        (["--partitioner", "xnnpack"], "mse", "model.pte"),
    ],
    ids=["mse", "cross_entropy_named", "xnnpack"],
)
def test_export_executorch_writes_a_program_that_trains(capsys, factories, tmp_path, options, loss,
                                                        file_name):
    from lars_fx.cli import build

    out = tmp_path / "program"
    assert main(["export", f"{factories}:tiny", "--format", "executorch", "--out", str(out), *options]) == 0
    path = out / file_name
    assert sorted(out.iterdir()) == [path]
    assert f"{path}  ({path.stat().st_size:,} bytes)" in capsys.readouterr().out

    model, _, (x,) = build(f"{factories}:tiny")  # the factory seeds itself: the exported weights again
    with torch.no_grad():
        output = model(x)
    if loss == "cross_entropy":
        target, expected = torch.zeros(3, dtype=torch.long), torch.nn.functional.cross_entropy
    else:
        target, expected = torch.zeros_like(output), torch.nn.functional.mse_loss
    methods = _methods(path)
    losses = [float(methods["train_step"].execute([x, target, torch.tensor(0.1)])[0]) for _ in range(8)]
    # the model's loss on the target the CLI derived
    assert losses[0] == pytest.approx(float(expected(output, target)), rel=1e-5)
    assert losses[-1] < losses[0]  # and the program steps
    weights = methods["get_state"].execute([])[: len(list(model.parameters()))]
    assert any(not torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))


def test_export_executorch_refuses_a_buffer_write_in_one_line(capsys, executorch_factories, tmp_path):
    argv = ["export", f"{executorch_factories}:batch_norm", "--format", "executorch",
            "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    error = _error_line(capsys, "export")
    assert f"cannot export {executorch_factories}:batch_norm: the model's forward writes its buffer" in error
    assert "'1.running_mean'" in error


def test_export_executorch_names_the_missing_kernel(capfd, executorch_factories, tmp_path):
    argv = ["export", f"{executorch_factories}:avg_pool", "--format", "executorch",
            "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    captured = capfd.readouterr()
    # ExecuTorch's runtime log is hidden; the error line names what it said was missing.
    assert "operator_registry" not in captured.out + captured.err
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("lars-fx export: error: cannot export") and "Traceback" not in captured.err
    assert last.endswith("(missing: aten::avg_pool2d_backward.grad_input)")


@pytest.mark.parametrize(
    "factory, message",
    [
        ("over_adam", "the ExecuTorch export supports LARS over torch.optim.SGD only, got Adam"),
        ("lamb", "returned a lars_fx.LAMB; export writes LARS training artifacts only (the ExecuTorch"),
        ("no_inputs", "must return (model, optimizer, example_inputs) for export"),
    ],
)
def test_export_executorch_refusals_are_one_line(capsys, factories, tmp_path, factory, message):
    argv = ["export", f"{factories}:{factory}", "--format", "executorch", "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    assert message in _error_line(capsys, "export")
    assert not list((tmp_path / "a").iterdir())


EXECUTORCH_ONLY = "--name, --partitioner and --max-batch apply to --format executorch only"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--name", "sub/model.pte", "--format", "executorch"], "--name 'sub/model.pte': a file name"),
        (["--partitioner", "xnnpack"], EXECUTORCH_ONLY),
        (["--name", "model.pte"], EXECUTORCH_ONLY),
        (["--max-batch", "8"], EXECUTORCH_ONLY),
        (["--max-batch", "2", "--format", "executorch"],
         "max_batch=2 must be an int >= the examples' batch size 3"),
    ],
)
def test_export_executorch_options_usage_errors(capsys, factories, tmp_path, options, message):
    assert main(["export", f"{factories}:tiny", "--out", str(tmp_path / "a"), *options]) == 2
    assert message in _error_line(capsys, "export")


def test_export_executorch_without_executorch_names_the_extra(capsys, factories, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lars_fx.executorch", None)  # what an install without the extra raises
    argv = ["export", f"{factories}:tiny", "--format", "executorch", "--out", str(tmp_path / "a")]
    assert main(argv) == 1
    assert "pip install 'lars-fx[executorch]'" in _error_line(capsys, "export")


def test_export_help_mentions_the_formats(capsys):
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--format {onnx,executorch}", "default: onnx", "--partitioner {xnnpack}", "--name FILE",
                 "--max-batch N", "--format executorch"):
        assert text in out


def test_export_executorch_max_batch_takes_smaller_batches(capsys, factories, tmp_path):
    from lars_fx.cli import build

    out = tmp_path / "program"
    argv = ["export", f"{factories}:tiny", "--format", "executorch", "--max-batch", "8", "--out", str(out),
            "--loss", "cross_entropy"]
    assert main(argv) == 0
    model, _, _ = build(f"{factories}:tiny")
    methods = _methods(out / "model.pte")
    for batch in (8, 5, 1):  # the example batch was 3
        x = torch.randn(batch, 4)
        with torch.no_grad():
            assert torch.allclose(methods["predict"].execute([x])[0], model(x), atol=1e-6)
    x, target = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    loss = methods["train_step"].execute([x, target, torch.tensor(0.1)])[0]
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x), target)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
