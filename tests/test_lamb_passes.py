"""The LAMB pipeline (``pipelines.LAMB_ADAM``) on captured ``torch.optim.AdamW``/``Adam`` steps, run as
rewritten FX graphs (no Inductor), against ``lars_fx.functional.lamb_reference`` on float64 copies, over
several steps with fresh random gradients; the refusals of the matcher and each pass's ``requires``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from lars_fx import functional as F
from lars_fx.passes.fx_canonicalize import canonicalize
from lars_fx.passes.fx_lamb_spec import AdamUpdate, LambRequest
from lars_fx.passes.fx_lamb_update import RewriteLambUpdate
from lars_fx.passes.fx_match_adam import MatchAdamUpdate
from lars_fx.passes.fx_norms import squared_norms
from lars_fx.passes.fx_pipeline import run_pipeline
from lars_fx.passes.fx_spec import REQUEST, LarsRequest, ParamRole, PatternMismatch, updates_of
from lars_fx.passes.pipelines import LAMB_ADAM, LARS_SGD

SHAPES = [(4, 3), (5,), (2, 3), (3, 2)]  # the last one starts at zero: ||w|| = 0, ratio 1
MASK = [True, False, True, True]  # the second one takes a plain Adam step
BETAS = (0.9, 0.99)
EPS = 1e-6
STEPS = 4


def _adam_step(*, weight_decay: float, decoupled: bool = True, maximize: bool = False, **options):
    """Adam's step over the flat inputs ``[lr, params, grads, exp_avgs, exp_avg_sqs, steps]``."""
    n = len(SHAPES)
    settings = dict(foreach=False, capturable=True, amsgrad=False, maximize=maximize)
    settings.update(options)

    def step(lr: Tensor, *tensors: Tensor) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = (list(tensors[k * n : (k + 1) * n]) for k in range(5))
        adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            beta1=BETAS[0],
            beta2=BETAS[1],
            lr=lr,
            weight_decay=weight_decay,
            eps=EPS,
            decoupled_weight_decay=decoupled,
            **settings,
        )

    return step


def _inputs(generator: torch.Generator, dtype: torch.dtype) -> list[Tensor]:
    params = [torch.randn(s, generator=generator, dtype=dtype) for s in SHAPES[:-1]] + [
        torch.zeros(SHAPES[-1], dtype=dtype)
    ]
    zeros = [torch.zeros(s, dtype=dtype) for s in SHAPES]
    grads = [torch.randn(s, generator=generator, dtype=dtype) for s in SHAPES]
    steps = [torch.tensor(0.0) for _ in SHAPES]
    return [
        torch.tensor(0.01, dtype=torch.float64),
        *params,
        *grads,
        *zeros,
        *[z.clone() for z in zeros],
        *steps,
    ]


def _lamb(step, inputs: list[Tensor], *, trust_clip: float | None = None, carry: bool = False):
    gm = canonicalize(step, inputs)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    roles = {names[1 + k]: ParamRole(0, k, use) for k, use in enumerate(MASK)}
    request = LambRequest(
        params=roles, options=F.LambOptions(trust_clip=trust_clip), carry_weight_norms=carry
    )
    return gm, request


def _pieces(inputs: list[Tensor]) -> list[list[Tensor]]:
    n = len(SHAPES)
    return [inputs[1 + k * n : 1 + (k + 1) * n] for k in range(5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("weight_decay", "trust_clip", "maximize", "lrs"),
    [
        (0.0, None, False, (0.01, 0.01, 0.01, 0.01)),
        (0.05, None, True, (0.01, 0.02, 0.005, 0.0)),
        (0.05, 0.5, False, (0.03, 0.01, 0.02, 0.01)),
    ],
)
def test_pipeline_equals_float64_reference(dtype, weight_decay, trust_clip, maximize, lrs):
    generator = torch.Generator().manual_seed(7)
    inputs = _inputs(generator, dtype)
    gm, request = _lamb(
        _adam_step(weight_decay=weight_decay, maximize=maximize), inputs, trust_clip=trust_clip
    )
    gm, stages = run_pipeline(gm, LAMB_ADAM, request)
    assert [s.name for s in stages] == ["captured", *(p.name for p in LAMB_ADAM)]
    oracle = [[t.double().clone() for t in piece] for piece in _pieces(inputs)]
    oracle[4] = [t.clone() for t in _pieces(inputs)[4]]
    ratios_seen = []
    for step, lr in enumerate(lrs):
        grads = [torch.randn(s, generator=generator, dtype=torch.float64) for s in SHAPES]
        for mine, theirs, g in zip(_pieces(inputs)[1], oracle[1], grads, strict=True):
            mine.copy_(g)
            theirs.copy_(g)
        inputs[0].fill_(lr)  # a scheduled lr: the same graph
        gm(*inputs)
        norms = F.lamb_reference(
            *oracle,
            MASK,
            lr=lr,
            beta1=BETAS[0],
            beta2=BETAS[1],
            eps=EPS,
            weight_decay=weight_decay,
            trust_clip=trust_clip,
            maximize=maximize,
        )
        ratios_seen.append(norms.trust_ratio)
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
        for name, mine, theirs in zip(
            ["params", "grads", "exp_avgs", "exp_avg_sqs"], _pieces(inputs)[:4], oracle[:4], strict=True
        ):
            for k, (a, b) in enumerate(zip(mine, theirs, strict=True)):
                torch.testing.assert_close(
                    a.double(),
                    b,
                    **tolerance,
                    msg=lambda m, where=f"step {step} {name}[{k}]": f"{where}: {m}",
                )
        for a, b in zip(_pieces(inputs)[4], oracle[4], strict=True):
            assert a.item() == b.item() == step + 1
    ratios = torch.stack(ratios_seen)
    assert not torch.allclose(ratios, torch.ones_like(ratios))  # the trust ratio did scale the steps
    assert ratios[0, -1] == (
        1.0 if trust_clip is None else trust_clip
    )  # ||w|| = 0 on the first step: ratio 1
    if trust_clip is not None:
        assert (ratios <= trust_clip).all()


def test_adam_without_weight_decay_is_taken_and_equals_adamw_form():
    generator = torch.Generator().manual_seed(3)
    inputs = _inputs(generator, torch.float32)
    twin = [t.clone() for t in inputs]
    results = []
    for decoupled, tensors in ((False, inputs), (True, twin)):
        gm, request = _lamb(_adam_step(weight_decay=0.0, decoupled=decoupled), tensors)
        gm, _ = run_pipeline(gm, LAMB_ADAM, request)
        gm(*tensors)
        results.append(_pieces(tensors)[0])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"weight_decay": 0.01, "decoupled": False}, "coupled"),
        ({"weight_decay": 0.0, "amsgrad": True}, "amsgrad"),
        ({"weight_decay": 0.0, "foreach": True}, "foreach"),
    ],
)
def test_matcher_refuses_what_is_not_lamb(options, why):
    inputs = _inputs(torch.Generator().manual_seed(0), torch.float32)
    if options.get("amsgrad"):
        n = len(SHAPES)
        extra = [torch.zeros(s) for s in SHAPES]
        step = _adam_step(**options)

        def with_max(lr, *tensors):  # amsgrad's max_exp_avg_sqs after the steps
            params, grads, ms, vs, steps = (list(tensors[k * n : (k + 1) * n]) for k in range(5))
            adam(
                params,
                grads,
                ms,
                vs,
                list(tensors[5 * n :]),
                steps,
                foreach=False,
                capturable=True,
                amsgrad=True,
                beta1=BETAS[0],
                beta2=BETAS[1],
                lr=lr,
                weight_decay=0.0,
                eps=EPS,
                maximize=False,
            )

        del step
        inputs += extra
        gm = canonicalize(with_max, inputs)
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        request = LambRequest(params={names[1 + k]: ParamRole(0, k, use) for k, use in enumerate(MASK)})
    else:
        gm, request = _lamb(_adam_step(**options), inputs)
    with pytest.raises(PatternMismatch, match=why):
        run_pipeline(gm, LAMB_ADAM, request)


def test_matcher_refuses_an_unexplained_write():
    inputs = _inputs(torch.Generator().manual_seed(0), torch.float32) + [torch.zeros(2)]
    adam_step = _adam_step(weight_decay=0.0)

    def step(*tensors):
        adam_step(*tensors[:-1])
        tensors[-1].add_(1)

    gm, request = _lamb(step, inputs)
    with pytest.raises(PatternMismatch, match="no parameter or Adam state"):
        run_pipeline(gm, LAMB_ADAM, request)


def test_matcher_records_r_and_the_adam_hyperparameters():
    inputs = _inputs(torch.Generator().manual_seed(0), torch.float32)
    gm, request = _lamb(_adam_step(weight_decay=0.05), inputs)
    gm.meta[REQUEST] = request
    MatchAdamUpdate()(gm)
    updates = updates_of(gm)
    assert len(updates) == len(SHAPES) and all(isinstance(u, AdamUpdate) for u in updates)
    for update, use in zip(updates, MASK, strict=True):
        assert (update.beta1, update.beta2, update.eps, update.weight_decay) == (*BETAS, EPS, 0.05)
        assert update.lr.op == "placeholder"
        assert update.grad.kwargs["weight_decay"] == (
            0.05 if use else 0.0
        )  # r decays trust-ratio params only


@pytest.mark.parametrize(
    ("disabled", "message"),
    [
        ("match_adam_update", "a matcher must run before insert_lars_norms"),
        ("insert_lars_norms", "insert_lars_norms must run before insert_trust_ratio"),
        ("insert_trust_ratio", "insert_trust_ratio must run before rewrite_lamb_update"),
    ],
)
def test_requires_catches_a_missing_pass(disabled, message):
    gm, request = _lamb(
        _adam_step(weight_decay=0.01), _inputs(torch.Generator().manual_seed(0), torch.float32)
    )
    with pytest.raises(PatternMismatch, match=message):
        run_pipeline(gm, LAMB_ADAM, request, disabled=[disabled])


def test_requires_catches_a_wrong_order_and_a_wrong_request():
    inputs = _inputs(torch.Generator().manual_seed(0), torch.float32)
    gm, request = _lamb(_adam_step(weight_decay=0.01), inputs, carry=True)
    matcher, norms, sharded, ratio, update, carry = LAMB_ADAM
    with pytest.raises(PatternMismatch, match="insert_lars_norms must run before carry_weight_norms"):
        run_pipeline(gm, (matcher, carry), request)
    gm, request = _lamb(_adam_step(weight_decay=0.01), inputs)
    with pytest.raises(PatternMismatch, match="needs a LambRequest"):
        run_pipeline(gm, LAMB_ADAM, LarsRequest(params=request.params))
    gm, request = _lamb(_adam_step(weight_decay=0.01), inputs)
    with pytest.raises(
        PatternMismatch, match="needs a LarsRequest"
    ):  # LARS's momentum pass on LAMB's records
        run_pipeline(gm, (matcher, norms, ratio, LARS_SGD[4]), request)


def test_lamb_update_refuses_sgd_records():
    n = 2
    inputs = [torch.tensor(0.1, dtype=torch.float64), *(torch.randn(3) for _ in range(2 * n))]

    def sgd_step(lr, *tensors):
        sgd(
            list(tensors[:n]),
            list(tensors[n:]),
            [None] * n,
            lr=lr,
            weight_decay=0.0,
            momentum=0.0,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            foreach=False,
        )

    gm = canonicalize(sgd_step, inputs)
    names = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    request = LambRequest(params={names[1 + k]: ParamRole(0, k, True) for k in range(n)})
    with pytest.raises(PatternMismatch, match="needs match_adam_update's records"):
        run_pipeline(gm, (*LARS_SGD[:4], RewriteLambUpdate()), request)


def test_carried_weight_norms_are_those_of_the_written_weights():
    generator = torch.Generator().manual_seed(5)
    inputs = _inputs(generator, torch.float32)
    gm, request = _lamb(_adam_step(weight_decay=0.05), inputs, carry=True)
    gm, _ = run_pipeline(gm, LAMB_ADAM, request)
    carried = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("carried_w_sq_norm")]
    assert len(carried) == sum(MASK)  # one per-tensor batch per trust-ratio parameter on CPU
    reference = [t.clone() for t in inputs]
    plain, plain_request = _lamb(_adam_step(weight_decay=0.05), reference)
    plain, _ = run_pipeline(plain, LAMB_ADAM, plain_request)  # reads w
    params = _pieces(inputs)[0]
    norms = [squared_norms([p], torch.float32) for p, use in zip(params, MASK, strict=True) if use]
    for _ in range(3):
        grads = [torch.randn(s, generator=generator) for s in SHAPES]
        for a, b, g in zip(_pieces(inputs)[1], _pieces(reference)[1], grads, strict=True):
            a.copy_(g)
            b.copy_(g)
        norms = list(gm(*inputs, *norms))
        plain(*reference)
        expected = [squared_norms([p], torch.float32) for p, use in zip(params, MASK, strict=True) if use]
        torch.testing.assert_close(norms, expected)
        torch.testing.assert_close(params, _pieces(reference)[0], rtol=0, atol=0)


def _adamw_spelled_as_torch_211_dynamo_traces(weight_decay: float):
    """AdamW's per-tensor capturable step with the second moment written as torch 2.11's Dynamo records
    ``Adam.step``: ``add(mul(v, beta2), mul(g, g), alpha=1 - beta2)`` (2.13 records an fma spelling, the fused
    capture an ``addcmul``); the rest as ``torch.optim.adam._single_tensor_adam`` writes it."""
    n = len(SHAPES)
    beta1, beta2 = BETAS

    def step(lr: Tensor, *tensors: Tensor) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = (list(tensors[k * n : (k + 1) * n]) for k in range(5))
        for param, grad, exp_avg, exp_avg_sq, step_t in zip(
            params, grads, exp_avgs, exp_avg_sqs, steps, strict=True
        ):
            step_t += 1
            param.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).add_(grad * grad, alpha=1 - beta2)
            step_size_neg = (lr / (1 - beta1**step_t)).neg()
            bias_correction2_sqrt = (1 - beta2**step_t).sqrt()
            denom = (exp_avg_sq.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(EPS / step_size_neg)
            param.addcdiv_(exp_avg, denom)

    return step


def test_the_second_moment_as_torch_211_dynamo_spells_it():
    generator = torch.Generator().manual_seed(11)
    inputs = _inputs(generator, torch.float64)
    gm, request = _lamb(_adamw_spelled_as_torch_211_dynamo_traces(0.05), inputs)
    v_updates = [n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor and "alpha" in n.kwargs]
    assert any(n.args[1].target is torch.ops.aten.mul.Tensor for n in v_updates)  # the spelling under test
    gm, _ = run_pipeline(gm, LAMB_ADAM, request)
    oracle = [[t.clone() for t in piece] for piece in _pieces(inputs)]
    for _ in range(3):
        grads = [torch.randn(s, generator=generator, dtype=torch.float64) for s in SHAPES]
        for mine, theirs, g in zip(_pieces(inputs)[1], oracle[1], grads, strict=True):
            mine.copy_(g)
            theirs.copy_(g)
        gm(*inputs)
        F.lamb_reference(*oracle, MASK, lr=0.01, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=0.05)
        for a, b in zip(_pieces(inputs)[0], oracle[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
