"""``LARS(flat=True, fused=True)``: torch's SGD step captured over the flat buffers, rewritten by the LARS
passes (segmented norms, per-chunk trust ratios), against ``LARS(foreach=False)`` on a float64 copy of the
model, over >= 10 steps with fresh gradients.

Most tests run the rewritten graph as it is (``eager_graphs``: Inductor's compile replaced by the graph
itself): the capture, passes, cache, carried norms and telemetry of the compiled step, without Inductor's
10-30 s per graph, so that every option gets a configuration of its own, in float64. ``test_compiled_*``
compile with Inductor (float32 against the float64 reference).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import lars_fx
from lars_fx import graph_cache
from lars_fx.flat_layout import FlatLayout
from lars_fx.fused import FusedStep, inspect_step

STEPS = 12
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64 graph against the float64 reference: rounding only
FLOAT32 = dict(rtol=2e-5, atol=1e-6)
HALF = dict(rtol=2e-2, atol=2e-3)


class Recorder:
    """A telemetry sink keeping what the optimizer hands it, per step and group."""

    def __init__(self):
        self.calls = []

    def record(self, optimizer, group_index, params, w_norm, g_norm, trust_ratio):
        position = {id(p): i for i, p in enumerate(optimizer.param_groups[group_index]["params"])}
        values = torch.stack([w_norm, g_norm, trust_ratio]).double()
        self.calls.append((group_index, [position[id(p)] for p in params], values))


def make_model(seed=0, dtype=torch.float64, empty=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 40), nn.LayerNorm(40), nn.Linear(40, 3))
    with torch.no_grad():
        model[2].weight.zero_()  # a LARS parameter of zero norm (moves only with unit_trust_on_zero_norm)
    if empty:  # a parameter without elements, in the second group: outside the flat buffers
        model.register_parameter("empty", nn.Parameter(torch.zeros(4, 0)))
    return model.to(dtype)


def groups_of(model, lr, weight_decay, **sgd):
    """Two param groups of (name, parameter) pairs: the second with half the lr and its own weight decay."""
    named = list(model.named_parameters())
    return [
        {"params": named[:4], "lr": lr, "weight_decay": weight_decay, **sgd},
        {"params": named[4:], "lr": lr / 2, "weight_decay": weight_decay / 2, **sgd},
    ]


def _naming(what):
    return lambda message: f"{what}: {message}"


class Pair:
    """A flat fused LARS and the float64 reference LARS(foreach=False) over a copy of the same model."""

    def __init__(self, *, lr=0.1, momentum=0.9, weight_decay=1e-2, tensor_lr=False, dtype=torch.float64,
                 seed=0, telemetry=False, sgd=None, coefficient=0.02, empty=False, **lars):
        sgd = dict(sgd or {}, momentum=momentum)
        self.model = make_model(seed, dtype, empty)
        self.reference_model = copy.deepcopy(self.model).double()
        self.base_lrs = [lr, lr / 2]

        def lr_of(value):
            return torch.tensor(value, dtype=torch.float64) if tensor_lr else value

        def optimizer(model, **mode):
            groups = groups_of(model, 0.0, weight_decay, **sgd)
            for group, base in zip(groups, self.base_lrs, strict=True):
                group["lr"] = lr_of(base)
            sgd_optimizer = torch.optim.SGD(groups, lr=lr_of(lr))
            return lars_fx.LARS(sgd_optimizer, coefficient=coefficient, **lars, **mode)

        self.opt = optimizer(self.model, flat=True, fused=True)
        self.reference = optimizer(self.reference_model, foreach=False)
        if telemetry:
            self.opt.telemetry, self.reference.telemetry = Recorder(), Recorder()

    def set_lr(self, step):
        """A scheduler: a new lr at every step, set as torch's schedulers do (float, or in place)."""
        for opt in (self.opt, self.reference):
            for group, base in zip(opt.param_groups, self.base_lrs, strict=True):
                value = base * (1 - step / 25)
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(value)
                else:
                    group["lr"] = value

    def set_grads(self, step, skip=()):
        """Fresh gradients, written into the flat gradient views in place where there are views."""
        gen = torch.Generator().manual_seed(1000 + step)
        pairs = zip(self.model.named_parameters(), self.reference_model.parameters(), strict=True)
        for (name, p), q in pairs:
            grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            for param in (p, q):
                if name in skip:
                    param.grad = None
                elif param.grad is None:
                    param.grad = grad.to(param.dtype)
                else:
                    param.grad.copy_(grad)

    def step(self, step, skip=()):
        self.set_lr(step)
        self.set_grads(step, skip)
        self.opt.step()
        self.reference.step()

    def check(self, tolerance):
        pairs = zip(self.model.named_parameters(), self.reference_model.parameters(), strict=True)
        for (name, p), q in pairs:
            if p.dtype in (torch.bfloat16, torch.float16):
                tolerance = HALF  # the stored weights' rounding, step after step
            torch.testing.assert_close(p.detach().double(), q.detach(), **tolerance, msg=_naming(name))
            mine = self.opt.state[p].get("momentum_buffer") if p in self.opt.state else None
            theirs = self.reference.state[q].get("momentum_buffer") if q in self.reference.state else None
            assert (mine is None) == (theirs is None), name
            if mine is not None:
                torch.testing.assert_close(mine.double(), theirs, **tolerance, msg=_naming(f"{name} buffer"))

    def run(self, steps=STEPS, tolerance=EXACT, before_step=None):
        for step in range(steps):
            if before_step is not None:
                before_step(step)
            self.step(step)
            self.check(tolerance)

    def check_telemetry(self, tolerance):
        mine, theirs = self.opt.telemetry.calls, self.reference.telemetry.calls
        assert len(mine) == len(theirs) > 0
        for (group, indices, values), (group_, indices_, values_) in zip(mine, theirs, strict=True):
            assert (group, indices) == (group_, indices_)
            torch.testing.assert_close(values, values_, **tolerance)

    @property
    def fused(self) -> FusedStep:
        fused = self.opt.fused_step
        assert fused is not None
        return fused


@pytest.fixture
def eager_graphs(monkeypatch):
    """Every fused graph runs as the rewritten FX graph itself instead of Inductor's compile of it; returns
    the list of graph runs (one entry per run)."""
    runs = []

    def as_is(gm, inputs, **_):
        def run(*args):
            runs.append(gm)
            return gm(*args)

        return run

    monkeypatch.setattr(graph_cache, "compile_with_inductor", as_is)
    return runs


OPTIONS = {
    "default": {},
    "coefficient_epsilon": dict(coefficient=0.05, epsilon=0.5),
    "use_clip": dict(use_clip=True),
    "unit_trust_on_zero_norm": dict(unit_trust_on_zero_norm=True),
    "lr_inside_momentum": dict(lr_inside_momentum=True),
    "momentum_0": dict(momentum=0.0),
    "dampening": dict(sgd=dict(dampening=0.3)),
    "nesterov": dict(sgd=dict(nesterov=True)),
    "maximize": dict(sgd=dict(maximize=True)),
    "weight_decay_0": dict(weight_decay=0.0),
    "no_carried_norms": dict(carry_weight_norms=False),
    "telemetry": dict(telemetry=True),
    "tensor_lr": dict(tensor_lr=True, use_clip=True),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_equals_the_float64_reference(name, eager_graphs):
    pair = Pair(**OPTIONS[name])
    pair.run()
    assert pair.fused.fallback is None
    # one graph for all steps, whatever the lr; with momentum, the first step makes the buffers eagerly
    assert pair.fused.compile_count == 1
    assert len(eager_graphs) == STEPS - (name != "momentum_0")
    assert len(pair.opt.flat_layout.buckets) == 4  # per group: LARS and not
    # MindSpore's trust ratio is 0 at ||w|| = 0: the zero weight moves only with unit_trust_on_zero_norm
    assert bool(torch.count_nonzero(pair.model[2].weight)) == (name == "unit_trust_on_zero_norm")
    if name == "telemetry":
        pair.check_telemetry(EXACT)
    carried = [graph.carry is not None for graph in pair.fused.cache.graphs()]
    assert carried == [name != "no_carried_norms"]


def test_half_precision_parameters_get_float32_norms_and_no_carry(eager_graphs):
    """A bfloat16 layer is a bucket of its own: its norms and trust ratios in float32, its ||w||^2 read from
    the weights each step (a carried ||w'||^2 would be summed before the rounding to bfloat16)."""
    pair = Pair(telemetry=True)
    for p in pair.model[4].parameters():
        p.data = p.data.to(torch.bfloat16)  # the optimizer notices and lays the buffers out again
    pair.run()
    assert len(pair.opt.flat_layout.buckets) == 6 and pair.fused.compile_count == 1
    (graph,) = pair.fused.cache.graphs()
    assert graph.carry is not None and len(graph.carry.batches) == 2  # the float64 LARS buckets only
    pair.check_telemetry(HALF)


@pytest.mark.parametrize("telemetry", [False, True])
def test_empty_parameters_step_beside_the_graph(eager_graphs, telemetry):
    """A parameter without elements stays out of the buffers and steps per tensor after the graph (with
    telemetry, the eager flat step takes the whole step: one record per group)."""
    pair = Pair(empty=True, telemetry=telemetry)
    pair.run()
    assert "momentum_buffer" in pair.opt.state[pair.model.empty]
    assert len(eager_graphs) == (0 if telemetry else STEPS - 1)
    if telemetry:
        pair.check_telemetry(EXACT)


def test_changed_options_compile_once_each(eager_graphs, monkeypatch):
    """Every LARS and SGD option the flat graph bakes in is part of its key: a change captures once, going
    back reuses the graph."""
    monkeypatch.setattr(lars_fx.fused, "MAX_GRAPHS", 16)
    pair = Pair()
    opts = (pair.opt, pair.reference)

    def change(step):
        changes = {
            2: ("coefficient", 0.05), 3: ("use_clip", True), 4: ("epsilon", 0.5),
            5: ("unit_trust_on_zero_norm", True), 6: ("lr_inside_momentum", True),
        }
        if step in changes:
            for opt in opts:
                setattr(opt, *changes[step])
        elif step == 7:
            pair.opt.carry_weight_norms = False
        elif step == 8:
            for opt in opts:
                opt.param_groups[1]["weight_decay"] = 0.02
        elif step == 9:
            for opt in opts:
                opt.param_groups[0]["dampening"] = 0.1
        elif step == 10:
            pair.opt.telemetry, pair.reference.telemetry = Recorder(), Recorder()
        elif step == 11:  # all back as at step 1: that graph again
            for opt in opts:
                opt.coefficient, opt.use_clip, opt.epsilon = 0.02, False, 1e-5
                opt.unit_trust_on_zero_norm = opt.lr_inside_momentum = False
                opt.param_groups[1]["weight_decay"], opt.param_groups[0]["dampening"] = 5e-3, 0.0
                opt.telemetry = None
            pair.opt.carry_weight_norms = True

    pair.run(steps=13, before_step=change)
    assert pair.fused.compile_count == 10  # steps 1-10; step 0 makes the momentum buffers, 11 and 12 reuse


def test_carried_norms_notice_writes_through_parameter_views(eager_graphs):
    """A parameter is a view of its bucket's weights with a version counter of its own (``p.data = view``):
    ``p.copy_``, an in-place op or ``load_state_dict`` on it must make the carried ||w||^2 be recomputed."""
    pair = Pair()
    checkpoint = copy.deepcopy(pair.model.state_dict())

    def write_weights(step):
        with torch.no_grad():
            if step == 3:
                pair.model[0].weight.copy_(torch.randn(pair.model[0].weight.shape, dtype=torch.float64))
            elif step == 5:
                pair.model[4].weight.mul_(3.0)
            elif step == 7:
                pair.model.load_state_dict(checkpoint)
        for p, q in zip(pair.model.parameters(), pair.reference_model.parameters(), strict=True):
            q.data.copy_(p.detach())

    pair.run(before_step=write_weights)
    assert pair.fused.compile_count == 1
    assert [graph.carry is not None for graph in pair.fused.cache.graphs()] == [True]


def test_carried_norms_go_stale_without_noticing_view_writes(eager_graphs, monkeypatch):
    """What the previous test guards against: with the notice switched off, a write through a view goes
    unseen and the next step uses the stale norm."""
    monkeypatch.setattr(FlatLayout, "notice_writes", staticmethod(lambda flat: None))
    pair = Pair()
    pair.run(steps=3)
    with torch.no_grad():
        pair.model[0].weight.mul_(3.0)
        pair.reference_model[0].weight.mul_(3.0)
    pair.step(3)
    with pytest.raises(AssertionError):
        pair.check(EXACT)


def test_steps_with_a_missing_gradient_run_eagerly_and_come_back(eager_graphs):
    """A parameter without a gradient steps per tensor, so that step runs the eager flat step; the graph runs
    again once every parameter has one (no new capture)."""
    pair = Pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the re-made gradient is copied into its view, with a warning
        for step in range(STEPS):
            pair.step(step, skip=("4.weight",) if step in (4, 5) else ())
            pair.check(EXACT)
    assert pair.fused.compile_count == 1
    assert len(eager_graphs) == STEPS - 3  # not step 0 (new momentum buffers), 4 and 5


def many_tensors(n, seed=0):
    torch.manual_seed(seed)
    named = [
        (f"layer{i}.{'bias' if i % 4 == 0 else 'weight'}", nn.Parameter(torch.randn(1 + (37 * i) % 300)))
        for i in range(n)
    ]
    opt = lars_fx.LARS(
        torch.optim.SGD(named, lr=0.1, momentum=0.9, weight_decay=1e-4), fused=True, flat=True, telemetry=True
    )
    for _, p in named:
        p.grad = torch.randn_like(p)
    return opt


def test_the_graph_does_not_grow_with_the_number_of_tensors():
    small, large = (inspect_step(many_tensors(n), compile=False) for n in (10, 100))
    assert small.fallback is None and large.fallback is None
    assert small.node_counts == large.node_counts
    final = large.stages[-1][1]
    assert "segment_squared_norms" in final and "per_chunk" in final
    # lr, momentum, 3 buffers per bucket, 2 segment tensors per LARS bucket, 1 carried norm
    signatures = [re.search(r"def forward\(self, (.*)\):", r.stages[-1][1]).group(1) for r in (small, large)]
    inputs = [re.findall(r"arg\d+_1|carried_w_sq_norm_\d+", signature) for signature in signatures]
    assert len(inputs[0]) == len(inputs[1]) == 2 + 3 * 2 + 2 + 1


def test_compiled_flat_step():
    """Inductor: one compile over 12 steps of a float lr schedule, with telemetry, carried norms (recomputed
    after a write through a parameter) and the written weights' norms summed in the update's own loop (no
    temporary of the buffers' size)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    pair = Pair(dtype=torch.float32, telemetry=True)
    pair.step(0)  # eager: makes the momentum buffers
    pair.check(FLOAT32)
    pair.set_lr(1)
    pair.set_grads(1)
    with inductor_config.patch(fx_graph_cache=False):
        _, (code,) = run_and_get_code(pair.opt.step)
    pair.reference.step()
    pair.check(FLOAT32)
    allocated = re.findall(r"empty_strided_\w+\(\(([^)]*)\)", code)
    assert allocated and not [shape for shape in allocated if "," in shape.replace(" ", "").rstrip(",")]

    for step in range(2, STEPS):
        if step == 6:
            with torch.no_grad():
                pair.model[4].weight.copy_(torch.randn(pair.model[4].weight.shape))
                pair.reference_model[4].weight.copy_(pair.model[4].weight.double())
        pair.step(step)
        pair.check(FLOAT32)
    assert pair.fused.compile_count == 1 and pair.fused.fallback is None
    pair.check_telemetry(FLOAT32)


def test_compiled_flat_step_other_options():
    """Inductor over the graph's other branches: nesterov, maximize, the clip, unit trust at zero norms, the
    paper's momentum form and a tensor lr moved in place."""
    pair = Pair(
        dtype=torch.float32, tensor_lr=True, sgd=dict(nesterov=True, maximize=True), use_clip=True,
        unit_trust_on_zero_norm=True, lr_inside_momentum=True,
    )
    pair.run(tolerance=FLOAT32)
    assert pair.fused.compile_count == 1 and pair.fused.fallback is None
