"""Each FX pass on small canonical graphs of torch.optim.SGD, run eagerly (no Inductor): fast."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch.optim.sgd import sgd

from lars_fx.functional import LarsOptions, lars_sgd_reference
from lars_fx.passes.fx_canonicalize import canonicalize
from lars_fx.passes.fx_match_sgd import MatchSgdUpdate
from lars_fx.passes.fx_norm_after_write_back import NormAfterWriteBack
from lars_fx.passes.fx_norms import InsertLarsNorms, squared_norms
from lars_fx.passes.fx_pipeline import pipeline_names, run_pipeline
from lars_fx.passes.fx_spec import (
    REQUEST,
    LarsRequest,
    ParamRole,
    PatternMismatch,
    batches_of,
    carried_batches,
    telemetry_outputs,
    updates_of,
)
from lars_fx.passes.fx_trust_ratio import InsertTrustRatio
from lars_fx.passes.pipelines import LARS_SGD

aten = torch.ops.aten
SHAPES = [(5, 3), (3,), (2, 2, 2), (4,)]


def make_state(dtype=torch.float64, first_step=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    grads = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    buffers = [None if first_step else torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    return params, grads, buffers


def sgd_graph(params, grads, buffers, *, lr, foreach, momentum, **options):
    """The canonical graph of one SGD step; inputs [lr?, params, grads, existing buffers]."""
    n = len(params)
    tensor_lr = foreach  # the for-loop form keeps a float lr (a tensor one becomes .item() there)

    def step(*flat):
        lr_value = flat[0] if tensor_lr else lr
        rest = flat[1:] if tensor_lr else flat
        ps, gs = list(rest[:n]), list(rest[n : 2 * n])
        existing = iter(rest[2 * n :])
        bufs = [next(existing) if b is not None else None for b in buffers]
        sgd(ps, gs, bufs, foreach=foreach, lr=lr_value, momentum=momentum, **options)
        return [b for b, old in zip(bufs, buffers, strict=True) if old is None] if momentum != 0 else []

    inputs = ([torch.tensor(lr, dtype=torch.float64)] if tensor_lr else []) + params + grads
    inputs += [b for b in buffers if b is not None]
    gm = canonicalize(step, inputs)
    names = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    offset = 1 if tensor_lr else 0
    return gm, inputs, names[offset : offset + n]


def request_for(param_names, mask, **options):
    pairs = enumerate(zip(param_names, mask, strict=True))
    roles = {name: ParamRole(0, i, use_lars) for i, (name, use_lars) in pairs}
    lars = {name: options.pop(name) for name in LarsOptions.names() if name in options}
    return LarsRequest(params=roles, options=LarsOptions(**lars), **options)


def test_canonicalize_decomposes_foreach_and_leaves_writes_for_the_end():
    params, grads, buffers = make_state()
    gm, inputs, _ = sgd_graph(params, grads, buffers, lr=0.1, foreach=True, momentum=0.9, weight_decay=0.1,
                              dampening=0.0, nesterov=False, maximize=False)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("_foreach" in str(t) for t in targets)
    copies = [i for i, t in enumerate(targets) if t is aten.copy_.default]
    assert len(copies) == 2 * len(SHAPES)  # parameters and buffers
    assert copies == list(range(len(targets) - len(copies), len(targets)))
    # tracing ran on fake tensors: the real ones are untouched
    assert all(torch.equal(a, b) for a, b in zip(params, make_state()[0], strict=True))


SGD_CASES = [
    dict(foreach=fe, momentum=m, dampening=d, nesterov=n, maximize=mx, weight_decay=wd, first_step=first)
    for fe, m, d, n, mx, wd, first in itertools.product(
        [True, False], [0.0, 0.8], [0.0, 0.3], [False, True], [False, True], [0.0, 0.05], [False, True]
    )
    if not (n and (m == 0 or d != 0)) and not (first and m == 0)
]


@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_match_recovers_every_sgd_option(case):
    case = dict(case)
    first_step = case.pop("first_step")
    foreach = case.pop("foreach")
    params, grads, buffers = make_state(first_step=first_step)
    lr = 0.0625
    gm, _, names = sgd_graph(params, grads, buffers, lr=lr, foreach=foreach, **case)
    request = request_for(names, [True] * len(names))
    gm.meta[REQUEST] = request
    MatchSgdUpdate()(gm)
    assert [u.param.name for u in updates_of(gm)] == names
    for update in updates_of(gm):
        assert update.weight_decay == case["weight_decay"]
        assert (update.grad.target is aten.neg.default) == case["maximize"]
        assert isinstance(update.lr, torch.fx.Node) if foreach else update.lr == lr
        assert (update.new_buffer is not None) == (case["momentum"] != 0)
        assert (update.nesterov_add is not None) == case["nesterov"]
        if case["momentum"] != 0 and not first_step:
            assert update.momentum == pytest.approx(case["momentum"])
            assert update.dampening == pytest.approx(case["dampening"])


LARS_CASES = [
    dict(foreach=fe, momentum=m, dampening=d, nesterov=n, maximize=mx, weight_decay=wd, first_step=first,
         use_clip=clip, lr_inside_momentum=inside, unit_trust_on_zero_norm=unit)
    for fe, (m, d, n), mx, wd, first, (clip, inside, unit) in itertools.product(
        [True, False], [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.25, False), (0.9, 0.0, True)],
        [False, True], [0.0, 0.01], [False, True],
        [(False, False, False), (True, False, False), (False, True, False), (False, False, True),
         (True, True, True)],
    )
    if not (first and m == 0)
]


@pytest.mark.parametrize("case", LARS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_pipeline_equals_reference(case):
    case = dict(case)
    foreach, first_step = case.pop("foreach"), case.pop("first_step")
    lars = {k: case.pop(k) for k in ("use_clip", "lr_inside_momentum", "unit_trust_on_zero_norm")}
    params, grads, buffers = make_state(first_step=first_step, seed=len(str(case)))
    params[1].zero_()  # a zero weight: MindSpore's 0 trust ratio, or 1 with unit_trust_on_zero_norm
    mask = [True, False, True, True]
    lr = 0.3
    expected_params = [p.clone() for p in params]
    expected_buffers = lars_sgd_reference(
        expected_params, grads, [b.clone() if b is not None else None for b in buffers], mask,
        lr=lr, coefficient=0.02, epsilon=1e-5, **case, **lars,
    )
    gm, inputs, names = sgd_graph(params, grads, buffers, lr=lr, foreach=foreach, **case)
    request = request_for(names, mask, coefficient=0.02, epsilon=1e-5, **lars)
    gm, stages = run_pipeline(gm, LARS_SGD, request, disabled=())
    assert [s.name for s in stages] == ["captured", *pipeline_names(LARS_SGD)]
    created = gm(*inputs)  # runs eagerly, writing the parameters and buffers in place
    for got, want in zip(params, expected_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_buffers = list(created) if first_step else buffers
    if case["momentum"] != 0:
        for got, want in zip(got_buffers, expected_buffers, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_norm_pass_batches_per_dtype_and_reduces_each_batch_once(per_tensor):
    params = [torch.randn(4, 3), torch.randn(3, dtype=torch.float64), torch.randn(2, 2),
              torch.randn(5, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    gm, inputs, names = sgd_graph(params, grads, [None] * 4, lr=0.1, foreach=True, momentum=0.0,
                                  weight_decay=0.0, dampening=0.0, nesterov=False, maximize=False)
    request = request_for(names, [True, True, True, False])
    gm.meta[REQUEST] = request
    MatchSgdUpdate()(gm)
    InsertLarsNorms(per_tensor_devices=("cpu",) if per_tensor else ())(gm)
    norm_nodes = [n for n in gm.graph.nodes if n.target is squared_norms]
    sizes = [1, 1, 1] if per_tensor else [1, 2]  # float32 batch of 2, float64 batch of 1
    assert sorted(len(b.updates) for b in batches_of(gm)) == sizes
    assert len(norm_nodes) == 2 * len(sizes)  # w and g
    assert {tuple(n.args[0]) for n in norm_nodes} == {
        tuple(getattr(u, part) for u in b.updates) for b in batches_of(gm) for part in ("param", "grad")
    }


def test_squared_norms_matches_vector_norm():
    tensors = [torch.randn(7, 3), torch.zeros(2), torch.randn(5).to(torch.bfloat16)]
    got = squared_norms(tensors, torch.float32)
    want = torch.stack([torch.linalg.vector_norm(t.float()) ** 2 for t in tensors])
    torch.testing.assert_close(got, want)


def test_trust_ratio_pass_adds_telemetry_outputs():
    params, grads, buffers = make_state()
    gm, inputs, names = sgd_graph(params, grads, buffers, lr=0.1, foreach=True, momentum=0.9,
                                  weight_decay=0.01, dampening=0.0, nesterov=False, maximize=False)
    request = request_for(names, [True, False, True, True], telemetry=True, coefficient=0.01)
    gm, _ = run_pipeline(gm, LARS_SGD, request, disabled=())
    w = [p.clone() for p in params]
    outputs = gm(*inputs)
    lars_index = [0, 2, 3]
    # one (||w||, ||g||, coeff) triple per batch; on CPU a batch is one tensor
    assert [i for _, indices in telemetry_outputs(gm) for i in indices] == lars_index
    assert all(group == 0 for group, _ in telemetry_outputs(gm))
    w_norm, g_norm, ratio = (torch.cat(outputs[k::3]) for k in range(3))
    torch.testing.assert_close(w_norm, torch.stack([torch.linalg.vector_norm(w[i]) for i in lars_index]))
    torch.testing.assert_close(g_norm, torch.stack([torch.linalg.vector_norm(grads[i]) for i in lars_index]))
    torch.testing.assert_close(ratio, 0.01 * w_norm / (g_norm + 0.01 * w_norm + 1e-5))


def test_trust_ratio_pass_needs_the_norm_pass():
    params, grads, buffers = make_state()
    gm, _, names = sgd_graph(params, grads, buffers, lr=0.1, foreach=True, momentum=0.9, weight_decay=0.0,
                             dampening=0.0, nesterov=False, maximize=False)
    request = request_for(names, [True] * 4)
    gm.meta[REQUEST] = request
    MatchSgdUpdate()(gm)
    with pytest.raises(PatternMismatch, match="insert_lars_norms must run before insert_trust_ratio"):
        InsertTrustRatio()(gm)
    assert batches_of(gm) == []
    with pytest.raises(PatternMismatch, match="insert_trust_ratio must run before rewrite_momentum"):
        run_pipeline(gm, LARS_SGD, request,
                     disabled={"match_sgd_update", "insert_lars_norms", "insert_trust_ratio"})


def test_match_rejects_a_parameter_written_otherwise():
    params = [torch.randn(3), torch.randn(2)]
    grads = [torch.randn(3), torch.randn(2)]

    def step(w0, w1, g0, g1):
        w0.add_(g0, alpha=-0.1)
        w1.mul_(0.5).add_(g1)  # not an SGD update

    gm = canonicalize(step, params + grads)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    with pytest.raises(PatternMismatch, match=rf"written into parameter {names[1]}"):
        run_pipeline(gm, LARS_SGD, request_for(names[:2], [True, True]), disabled=())


def test_match_rejects_writes_to_unknown_inputs():
    params, grads = [torch.randn(3)], [torch.randn(3)]
    other = torch.randn(3)

    def step(w, g, x):
        w.add_(g, alpha=-0.1)
        x.add_(1.0)

    gm = canonicalize(step, params + grads + [other])
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    with pytest.raises(PatternMismatch, match=f"graph input {names[2]} is written"):
        run_pipeline(gm, LARS_SGD, request_for(names[:1], [True]), disabled=())


def symbolic_sgd_step(n, *, nesterov, maximize, lr_of=lambda lr: lr):
    """torch.optim.SGD's per-tensor update (existing buffers) with lr, momentum, weight decay and dampening
    read from 0-d tensors with ``.item()``: symbolic scalars under make_fx, as Dynamo hands a changing
    float to a backend. Inputs: [lr, momentum, weight_decay, dampening, params, grads, buffers]."""

    def step(*flat):
        lr, momentum, decay, dampening = (t.item() for t in flat[:4])
        params, grads, buffers = flat[4 : 4 + n], flat[4 + n : 4 + 2 * n], flat[4 + 2 * n :]
        for p, g, b in zip(params, grads, buffers, strict=True):
            d = (-g if maximize else g).add(p, alpha=decay)
            b.mul_(momentum).add_(d, alpha=1 - dampening)
            p.add_(d.add(b, alpha=momentum) if nesterov else b, alpha=-lr_of(lr))

    return step


@pytest.mark.parametrize("nesterov, maximize, lars", [
    (False, False, {}), (True, True, {"use_clip": True}), (False, True, {"lr_inside_momentum": True}),
])
def test_symbolic_hyperparameters_become_tensor_inputs(nesterov, maximize, lars):
    params, grads, buffers = make_state(seed=4)
    hyper = dict(lr=0.3, momentum=0.8, weight_decay=0.01, dampening=0.0 if nesterov else 0.2)
    scalars = [torch.tensor(v, dtype=torch.float64) for v in hyper.values()]
    mask = [True, False, True, True]
    expected_params = [p.clone() for p in params]
    expected_buffers = lars_sgd_reference(expected_params, grads, [b.clone() for b in buffers], mask,
                                          coefficient=0.02, epsilon=1e-5, nesterov=nesterov,
                                          maximize=maximize, **hyper, **lars)
    inputs = scalars + params + grads + buffers
    gm = canonicalize(symbolic_sgd_step(len(params), nesterov=nesterov, maximize=maximize), inputs)
    symbolic = [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), (torch.SymFloat, torch.SymInt))]
    assert symbolic == [] and not any(n.target is aten._local_scalar_dense.default for n in gm.graph.nodes)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [n.name for n in placeholders[4 : 4 + len(params)]]
    request = request_for(names, mask, coefficient=0.02, **lars)
    gm, _ = run_pipeline(gm, LARS_SGD, request, disabled=())
    lr, momentum, weight_decay, dampening = placeholders[:4]
    for update in updates_of(gm):
        assert (update.lr, update.momentum, update.weight_decay) == (lr, momentum, weight_decay)
        assert update.dampening is dampening
    gm(*inputs)  # runs eagerly, writing the parameters and buffers in place
    pairs = [*zip(params, expected_params, strict=True), *zip(buffers, expected_buffers, strict=True)]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_symbolic_arithmetic_the_passes_cannot_take_is_named():
    params, grads, buffers = make_state()
    scalars = [torch.tensor(v, dtype=torch.float64) for v in (0.1, 0.9, 0.0, 0.0)]
    step = symbolic_sgd_step(len(params), nesterov=False, maximize=False, lr_of=lambda lr: lr**2)
    with pytest.raises(PatternMismatch, match="of a symbolic scalar: the passes turn only"):
        canonicalize(step, scalars + params + grads + buffers)


def test_dump_and_disable(tmp_path, monkeypatch, caplog):
    params, grads, buffers = make_state()
    kwargs = dict(
        lr=0.1, foreach=True, momentum=0.9, weight_decay=0.0, dampening=0.0, nesterov=False, maximize=False
    )
    gm, inputs, names = sgd_graph(params, grads, buffers, **kwargs)
    monkeypatch.setenv("LARS_FX_DUMP", str(tmp_path))
    monkeypatch.setenv("LARS_FX_DISABLE", "rewrite_momentum")
    with caplog.at_level(logging.WARNING, logger="lars_fx.passes"):
        gm, stages = run_pipeline(gm, LARS_SGD, request_for(names, [True] * 4), tag="t")
    assert "rewrite_momentum is switched off" in caplog.text
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"t.{i:02d}.{s.name}.txt" for i, s in enumerate(stages)]
    assert "trust_ratio" in (tmp_path / files[-1]).read_text()
    # without the momentum pass the graph still is plain SGD
    expected = [p - 0.1 * (0.9 * b + g) for p, g, b in zip(params, grads, buffers, strict=True)]
    gm(*inputs)
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got, want)
    monkeypatch.setenv("LARS_FX_DISABLE", "no_such_pass")
    with pytest.raises(ValueError, match="unknown passes"):
        run_pipeline(gm, LARS_SGD, request_for(names, [True] * 4))


@pytest.mark.parametrize("lr_inside_momentum", [False, True])
def test_carry_pass_takes_weight_norms_in_and_returns_those_of_the_written_weights(lr_inside_momentum):
    params, grads, buffers = make_state(seed=3)
    mask = [True, False, True, True]
    options = dict(momentum=0.9, weight_decay=0.01, dampening=0.0, nesterov=False, maximize=False)
    expected_params = [p.clone() for p in params]
    lars_sgd_reference(
        expected_params, grads, [b.clone() for b in buffers], mask, lr=0.3, coefficient=0.02, epsilon=1e-5,
        lr_inside_momentum=lr_inside_momentum, **options,
    )
    gm, inputs, names = sgd_graph(params, grads, buffers, lr=0.3, foreach=True, **options)
    request = request_for(
        names, mask, coefficient=0.02, carry_weight_norms=True, lr_inside_momentum=lr_inside_momentum
    )
    gm, stages = run_pipeline(gm, LARS_SGD, request, disabled=())
    assert stages[-1].name == "carry_weight_norms"
    carried = [n.name for n in gm.graph.nodes if n.op == "placeholder"][len(inputs):]
    assert carried == [f"carried_w_sq_norm_{k}" for k in range(len(carried_batches(gm)))]
    param_inputs = {n for n in gm.graph.nodes if n.name in names}
    assert not any(n.target is squared_norms and set(n.args[0]) & param_inputs for n in gm.graph.nodes)

    batches = [[names.index(u.param.name) for u in b.updates] for b in carried_batches(gm)]
    assert sorted(i for b in batches for i in b) == [0, 2, 3]
    outputs = gm(*inputs, *[squared_norms([params[i] for i in b], torch.float64) for b in batches])
    for got, want in zip(params, expected_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for got, b in zip(outputs[-len(batches) :], batches, strict=True):
        torch.testing.assert_close(got, squared_norms([expected_params[i] for i in b], torch.float64))


def test_carry_pass_is_off_unless_asked():
    params, grads, buffers = make_state()
    gm, inputs, names = sgd_graph(params, grads, buffers, lr=0.1, foreach=True, momentum=0.9,
                                  weight_decay=0.0, dampening=0.0, nesterov=False, maximize=False)
    request = request_for(names, [True] * 4)
    gm, _ = run_pipeline(gm, LARS_SGD, request, disabled=())
    assert carried_batches(gm) == []
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == len(inputs)
    assert sum(n.target is squared_norms for n in gm.graph.nodes) == 2 * len(batches_of(gm))


def _write_back_graph(
    weight_dtype=torch.float32, square=lambda g, x: g.call_function(aten.mul.Tensor, (x, x))
):
    """``copy_(w, w + x)`` and ``sum(square(w + x))``, as AOT autograd hands them to Inductor."""
    graph = torch.fx.Graph()
    w, x = graph.placeholder("w"), graph.placeholder("x")
    w.meta["val"], x.meta["val"] = torch.empty(3, 2, dtype=weight_dtype), torch.empty(3, 2)
    new = graph.call_function(aten.add.Tensor, (w, x))
    new.meta["val"] = torch.empty(3, 2)
    squared = square(graph, new)
    total = graph.call_function(aten.sum.default, (squared,))
    write = graph.call_function(aten.copy_.default, (w, new))
    graph.output((total,))
    return graph, squared, write


def test_norm_after_write_back_reads_the_written_weight():
    graph, squared, write = _write_back_graph()
    NormAfterWriteBack()(graph)
    assert squared.args == (write, write)
    order = list(graph.nodes)
    assert order.index(write) < order.index(squared)
    w, x = torch.randn(3, 2), torch.randn(3, 2)
    expected = ((w + x) ** 2).sum()
    (total,) = torch.fx.GraphModule(torch.nn.Module(), graph)(w, x)
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize(
    "case",
    [
        dict(weight_dtype=torch.float64),  # copy_ converts: the written weight is not w + x
        dict(
            square=lambda g, x: g.call_function(aten.mul.Tensor, (x, g.call_function(aten.neg.default, (x,))))
        ),
    ],
    ids=["dtype_changes", "not_a_square"],
)
def test_norm_after_write_back_leaves_other_graphs_alone(case):
    graph, squared, write = _write_back_graph(**case)
    before = str(graph)
    NormAfterWriteBack()(graph)
    assert str(graph) == before
