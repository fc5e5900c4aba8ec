"""``torch.compile(lars.step)`` with float hyperparameters that change every step (a scheduler on a float
lr, OneCycleLR/CyclicLR cycling momentum), against the float64 reference.

Torch's AOT autograd and FX graph caches are on (torch's default) in a fresh cache directory: a float
that reaches an op's Scalar argument gets baked into a cached graph that later values reuse (issue 9,
item 1). Each case compiles the step at most twice: once with the first values, once with them dynamic
(item 13). Compiles cost 10-30 s on CPU, so each case covers several options at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lars_fx
from lars_fx.functional import lars_sgd_reference

STEPS = 8
MAX_COMPILES = 2  # the first values static, then one graph with them dynamic


@pytest.fixture(autouse=True)
def fresh_compile_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Run:
    """One LARS optimizer stepped through ``torch.compile(lars.step)``, and its float64 reference."""

    def __init__(self, seed: int, sgd_options: dict[str, Any], lars_options: dict[str, Any],
                 scheduler: Callable[[lars_fx.LARS], Any] | None = None) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        self.lars = lars_fx.LARS(
            torch.optim.SGD(self.model.named_parameters(), **sgd_options), **lars_options
        )
        self.scheduler = scheduler(self.lars) if scheduler is not None else None
        self.counter = CompileCounterWithBackend("inductor")
        self.compiled_step = torch.compile(self.lars.step, backend=self.counter)
        self.reference = [p.detach().double().clone() for p in self.model.parameters()]
        self.buffers: list[torch.Tensor | None] = [None] * len(self.reference)
        self.generator = torch.Generator().manual_seed(seed + 100)
        self.seen: dict[str, set[float]] = {"lr": set(), "momentum": set()}

    def step(self, lr: float | None = None) -> None:
        group = self.lars.param_groups[0]
        if lr is not None:
            group["lr"] = lr
        for key in self.seen:
            self.seen[key].add(float(group[key]))
        grads = [torch.randn(p.shape, generator=self.generator) for p in self.model.parameters()]
        for p, g in zip(self.model.parameters(), grads, strict=True):
            p.grad = g.clone()
        self.compiled_step()
        self.buffers = lars_sgd_reference(
            self.reference, [g.double() for g in grads], self.buffers, self.lars.lars_mask(0),
            lr=float(group["lr"]), weight_decay=group["weight_decay"], momentum=group["momentum"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            coefficient=self.lars.coefficient, epsilon=self.lars.epsilon, use_clip=self.lars.use_clip,
            lr_inside_momentum=self.lars.lr_inside_momentum,
        )
        if self.scheduler is not None:
            self.scheduler.step()

    def check(self, step: int) -> None:
        for (name, p), expected in zip(self.model.named_parameters(), self.reference, strict=True):
            torch.testing.assert_close(p.detach().double(), expected, rtol=2e-5, atol=2e-5,
                                       msg=lambda m, name=name: f"step {step}, {name}: {m}")

    def check_compiles(self) -> None:
        assert self.counter.frame_count <= MAX_COMPILES, (
            f"{self.counter.frame_count} compiles for lr {sorted(self.seen['lr'])}, "
            f"momentum {sorted(self.seen['momentum'])}"
        )


LRS = [0.5, 0.4, 0.3, 0.2, 0.1, 0.15, 0.25, 0.05]


def _one_cycle(lars: lars_fx.LARS) -> torch.optim.lr_scheduler.OneCycleLR:
    return torch.optim.lr_scheduler.OneCycleLR(lars, max_lr=0.5, total_steps=STEPS + 1, pct_start=0.4,
                                               base_momentum=0.8, max_momentum=0.95)


def _cyclic(lars: lars_fx.LARS) -> torch.optim.lr_scheduler.CyclicLR:
    return torch.optim.lr_scheduler.CyclicLR(lars, base_lr=0.02, max_lr=0.2, step_size_up=3,
                                             base_momentum=0.8, max_momentum=0.9)


@pytest.mark.parametrize(
    "sgd_options,lars_options,scheduler",
    [
        # clip's coeff / lr and nesterov's -lr * a meet the lr that momentum's update scales by
        (dict(lr=LRS[0], momentum=0.9, nesterov=True, weight_decay=1e-2),
         dict(coefficient=0.5, use_clip=True), None),
        # OneCycleLR cycles momentum too; dampening scales every update after the first
        (dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-3), dict(coefficient=0.5, use_clip=True),
         _one_cycle),
        # a tensor lr (what the README advises) still meets a float momentum that CyclicLR cycles
        (dict(lr=torch.tensor(0.02), momentum=0.9, nesterov=True, weight_decay=1e-2),
         dict(coefficient=0.5, use_clip=True), _cyclic),
    ],
    ids=["clip_nesterov_float_lr", "clip_dampening_onecycle", "tensor_lr_cyclic_momentum_nesterov"],
)
def test_compiled_step_follows_changing_float_hyperparameters(sgd_options, lars_options, scheduler):
    run = Run(0, sgd_options, lars_options, scheduler)
    for step in range(STEPS):
        run.step(LRS[step] if scheduler is None else None)
        run.check(step)
    assert len(run.seen["lr"]) > 2
    assert scheduler is None or len(run.seen["momentum"]) > 2
    run.check_compiles()


def test_two_optimizers_with_different_float_lrs_compile_separately():
    """Dynamo's caches are shared by every ``LARS.step``: two optimizers, stepped in turn, each compiled
    on its own; one runs the per-tensor reference, the other the paper's momentum form under CyclicLR."""
    per_tensor = Run(1, dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-2),
                     dict(coefficient=0.5, use_clip=True, foreach=False))
    paper_form = Run(2, dict(lr=0.02, momentum=0.9, weight_decay=1e-3),
                     dict(coefficient=0.5, use_clip=True, lr_inside_momentum=True), _cyclic)
    for step in range(STEPS):
        per_tensor.step(LRS[step] * 0.9)
        paper_form.step()
        per_tensor.check(step)
        paper_form.check(step)
    assert len(paper_form.seen["lr"]) > 2 and len(paper_form.seen["momentum"]) > 2
    per_tensor.check_compiles()
    paper_form.check_compiles()
