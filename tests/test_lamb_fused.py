"""``LAMB(fused=True)`` (``lars_fx.fused_lamb.FusedLambStep``: the LAMB_ADAM pipeline compiled by Inductor),
against the float64 reference (``LAMB(foreach=False)`` on float64 copies, i.e. ``lamb_reference``)
step by step with fresh random gradients; compile counts under an lr scheduler; a state dict round trip; the
eager fallback. An Inductor compile costs 10-30 s here, so the configurations are few and shared.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from lars_fx.lamb import LAMB

STEPS = 12


class Net(nn.Module):
    """Trust-ratio weights, a LayerNorm and biases (the default filter leaves them out), a zero weight, and
    one with a gradient on even steps only (two configurations, each compiled once)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.LayerNorm = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 3)
        self.zero = nn.Parameter(torch.zeros(4, 2))
        self.sometimes = nn.Parameter(torch.randn(3))


def _groups(model: nn.Module) -> list[dict]:
    named = list(model.named_parameters())
    return [{"params": named[:4], "weight_decay": 0.05}, {"params": named[4:], "lr": 0.02}]


def _pair(seed: int, **options):
    torch.manual_seed(seed)
    model = Net()
    twin = copy.deepcopy(model).double()
    opt = LAMB(_groups(model), lr=0.01, fused=True, **options)
    oracle = LAMB(_groups(twin), lr=0.01, foreach=False, **options)
    return model, twin, opt, oracle, opt.fused_step


def _set_gradients(model: nn.Module, twin: nn.Module, generator: torch.Generator, step: int) -> None:
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if name == "sometimes" and step % 2:
            p.grad = q.grad = None
            continue
        g = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        p.grad, q.grad = g.float(), g


def _assert_close(model: nn.Module, twin: nn.Module, step: int) -> None:
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(
            p.double(), q, rtol=2e-5, atol=2e-6, msg=lambda m, where=f"step {step} {name}": f"{where}: {m}"
        )


def test_fused_equals_reference_under_a_scheduler_without_recompiles():
    model, twin, opt, oracle, fused = _pair(0)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)) for o in (opt, oracle)]
    generator = torch.Generator().manual_seed(1)
    lrs = set()
    for step in range(STEPS):
        _set_gradients(model, twin, generator, step)
        opt.step()
        oracle.step()
        _assert_close(model, twin, step)
        lrs.add(opt.param_groups[0]["lr"])
        for schedule in schedules:
            schedule.step()
    assert len(lrs) == STEPS
    # step 0 creates the state eagerly; then one graph with `sometimes` and one without, whatever the lr
    assert fused.compile_count == 2 and fused.fallback is None
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (
            opt.state[p]["step"].item()
            == oracle.state[q]["step"].item()
            == STEPS // (2 if name == "sometimes" else 1)
        )
    assert model.zero.abs().sum() > 0  # the zero weight moved (ratio 1 at ||w|| = 0)


def test_trust_clip_change_and_state_dict_round_trip():
    model, twin, opt, oracle, fused = _pair(2, trust_clip=0.8)
    generator = torch.Generator().manual_seed(3)
    for step in range(4):  # only even steps: `sometimes` always has a gradient, one configuration
        _set_gradients(model, twin, generator, 2 * step)
        opt.step()
        oracle.step()
        _assert_close(model, twin, step)
    opt.trust_clip = oracle.trust_clip = 0.3  # a new option value: one more graph
    _set_gradients(model, twin, generator, 0)
    opt.step()
    oracle.step()
    _assert_close(model, twin, 4)
    assert fused.compile_count == 2

    saved_state = copy.deepcopy(opt.state_dict())
    saved_weights = [p.detach().clone() for p in model.parameters()]
    grads = [[torch.randn(p.shape, generator=generator) for p in model.parameters()] for _ in range(3)]
    runs = []
    for _ in range(2):
        # Both runs start from the saved point, written from outside (the carried norms see it and are
        # recomputed, so both runs read the same norms; a carried norm may differ from a recomputed one in the
        # last bit).
        with torch.no_grad():
            for p, w in zip(model.parameters(), saved_weights, strict=True):
                p.copy_(w)
        # torch keeps the loaded step tensors, which steps bump
        opt.load_state_dict(copy.deepcopy(saved_state))
        for gs in grads:
            for p, g in zip(model.parameters(), gs, strict=True):
                p.grad = g.clone()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fused.compile_count == 2  # the loaded state tensors are read by the same graph
    assert opt.state[opt.param_groups[0]["params"][0]]["step"].item() == 5 + 3  # the loaded count, 3 steps on


def test_a_graph_the_passes_refuse_runs_the_eager_step(monkeypatch, caplog):
    monkeypatch.setenv("LARS_FX_DISABLE", "insert_trust_ratio")
    model, twin, opt, oracle, fused = _pair(4)
    generator = torch.Generator().manual_seed(5)
    with caplog.at_level(logging.WARNING, logger="lars_fx"):
        for step in range(0, 6, 2):
            _set_gradients(model, twin, generator, step)
            opt.step()
            oracle.step()
            _assert_close(model, twin, step)
    assert fused.compile_count == 1
    assert "insert_trust_ratio must run before rewrite_lamb_update" in fused.fallback
    assert any("falls back to the eager LAMB step" in r.getMessage() for r in caplog.records)


def test_refuses_sparse_gradients_naming_the_parameter():
    model, _, opt, _, fused = _pair(6)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the state
    model.fc1.weight.grad = torch.zeros_like(model.fc1.weight).to_sparse()
    with pytest.raises(ValueError, match=r"LAMB got a sparse gradient for 'fc1\.weight'"):
        opt.step()


def test_telemetry_and_a_copy_mid_run_follow_the_reference():
    """Telemetry of the fused step (the trust-ratio pass's graph outputs) equals the eager reference's; a
    deepcopy made mid-run compiles its own graph and continues as the original."""
    model, twin, opt, oracle, fused = _pair(7, telemetry=True)
    generator = torch.Generator().manual_seed(8)
    for step in range(0, 8, 2):
        _set_gradients(model, twin, generator, step)
        opt.step()
        oracle.step()
        _assert_close(model, twin, step)
    assert fused.compile_count == 1 and fused.fallback is None
    got, want = opt.telemetry.to_records(), oracle.telemetry.to_records()
    fields = ("step", "group", "param")
    assert [tuple(r[f] for f in fields) for r in got] == [tuple(r[f] for f in fields) for r in want]
    for a, b in zip(got, want, strict=True):
        for key in ("w_norm", "g_norm", "trust_ratio"):
            assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-7), (a, key)
    assert any(r["trust_ratio"] != 1.0 for r in got)

    copied, copied_model = copy.deepcopy((opt, model))
    assert copied.fused and copied.fused_step is not fused and copied.fused_step.compile_count == 0
    for step in range(8, 12, 2):
        _set_gradients(model, twin, generator, step)
        for p, q in zip(model.parameters(), copied_model.parameters(), strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        opt.step()
        copied.step()
        oracle.step()
        _assert_close(model, twin, step)
        for p, q in zip(model.parameters(), copied_model.parameters(), strict=True):
            # not bit for bit: the copy's first step recomputes the weight norms the original carries
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8)
    assert copied.fused_step.compile_count == 1


def test_sharded_parameters_are_refused(monkeypatch):
    """LAMB does not reduce norms across ranks: a DTensor parameter is refused when the groups are set up."""
    from lars_fx import sharding

    model = Net()
    monkeypatch.setattr(sharding, "is_dtensor", lambda t: t is model.fc2.weight)
    with pytest.raises(ValueError, match=r"sharded \(DTensor\) parameter 'fc2\.weight'"):
        LAMB(model.named_parameters(), fused=True)


def test_inspect_shows_every_stage_of_the_lamb_pipeline_without_stepping():
    from lars_fx.fused_lamb import inspect_lamb_step
    from lars_fx.passes.fx_pipeline import pipeline_names
    from lars_fx.passes.pipelines import LAMB_ADAM

    model, _, opt, _, _ = _pair(9)
    with pytest.raises(ValueError, match="needs gradients"):
        inspect_lamb_step(opt, compile=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    report = inspect_lamb_step(opt, compile=False)  # no state yet: stood in by zeros
    assert report.fallback is None
    assert [name for name, _ in report.stages] == ["captured", *pipeline_names(LAMB_ADAM)]
    assert "lamb_trust_ratio" in report.stages[-1][1] and "lamb_trust_ratio" not in report.stages[0][1]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)) and not opt.state


def test_a_tensor_lr_under_a_scheduler_compiles_once():
    torch.manual_seed(10)
    model = Net()
    twin = copy.deepcopy(model).double()
    opt = LAMB(_groups(model), lr=torch.tensor(0.01), fused=True)
    oracle = LAMB(_groups(twin), lr=0.01, foreach=False)
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    generator = torch.Generator().manual_seed(11)
    for step in range(0, 20, 2):  # `sometimes` always has a gradient: one configuration
        _set_gradients(model, twin, generator, step)
        for group, twin_group in zip(opt.param_groups, oracle.param_groups, strict=True):
            twin_group["lr"] = float(group["lr"])
        opt.step()
        oracle.step()
        _assert_close(model, twin, step)
        schedule.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert opt.fused_step.compile_count == 1 and opt.fused_step.fallback is None
