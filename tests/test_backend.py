"""``torch.compile(sgd.step, backend="lars_fx", options=...)`` and ``backend=LarsBackend(sgd, ...)``: plain
SGD compiled into LARS, against the float64 reference over >= 10 steps with fresh gradients. Most tests
that compile with Inductor run the name (which builds the object, so both go through the same code); the
refusals and the tests whose graphs run without Inductor run both spellings."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import nn

import lars_fx
import lars_fx.backend
import mindspore_replay
from lars_fx._compat import recompile_limit_patch
from lars_fx.backend import BACKEND_OPTIONS, LarsBackend, lars_fx_backend
from lars_fx.functional import LarsOptions, lars_sgd_reference

STEPS = 10
SPELLINGS = ["name", "object"]


def compiled_step(sgd, options=None, spelling="name"):
    """``sgd.step`` compiled into LARS: by the backend's name with ``options=``, or by a ``LarsBackend``."""
    options = options or {}
    if spelling == "name":
        return torch.compile(sgd.step, backend="lars_fx", options=options)
    return torch.compile(sgd.step, backend=LarsBackend(sgd, **options))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(seed=0, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(device, dtype)


class Reference:
    """The float64 reference of one model's SGD turned LARS, advanced one step at a time (one param group)."""

    def __init__(self, model, sgd, lars_options, seed=500):
        self.params = list(model.parameters())
        self.sgd, self.seed = sgd, seed
        filt = lars_options.get("lars_filter", lars_fx.default_lars_filter)
        self.mask = [
            bool(filt(lars_fx.ParamInfo(n, p, 0, i))) for i, (n, p) in enumerate(model.named_parameters())
        ]
        self.lars_kwargs = {
            k: v for k, v in lars_options.items() if k not in ("lars_filter", "carry_weight_norms")
        }
        self.restart()
        self.buffers = [None] * len(self.params)

    def restart(self):
        """Take the weights as they are now (after a write between steps)."""
        self.ref = [p.detach().double().clone() for p in self.params]

    def fresh_gradients(self, i):
        gen = torch.Generator().manual_seed(self.seed + i)
        for p in self.params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)

    def step_and_compare(self, step, rtol=2e-5, atol=1e-6):
        group = self.sgd.param_groups[0]
        step()
        self.buffers = lars_sgd_reference(
            self.ref, [p.grad.double() for p in self.params], self.buffers, self.mask, lr=float(group["lr"]),
            weight_decay=group["weight_decay"], momentum=group["momentum"], dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=group["maximize"], **self.lars_kwargs,
        )
        for got, want in zip(self.params, self.ref, strict=True):
            torch.testing.assert_close(got.detach().double(), want, rtol=rtol, atol=atol)
        if group["momentum"] != 0:
            for p, want in zip(self.params, self.buffers, strict=True):
                torch.testing.assert_close(
                    self.sgd.state[p]["momentum_buffer"].double(), want, rtol=rtol, atol=atol
                )


def run_against_reference(
    model, sgd, step, lars_options, steps=STEPS, before_step=None, rtol=2e-5, atol=1e-6,
    before_step_writes_weights=False,
):
    reference = Reference(model, sgd, lars_options)
    for i in range(steps):
        reference.fresh_gradients(i)
        if before_step is not None:
            before_step(i)
            if before_step_writes_weights:
                reference.restart()
        reference.step_and_compare(step, rtol=rtol, atol=atol)


@pytest.fixture
def graphs_run_eagerly(monkeypatch):
    """The backend's rewritten graphs run as they are, without Inductor: Dynamo, the capture and the
    passes as in real use, in about a second per graph. Returns the list of graphs the backend built."""
    built = []

    def run_eagerly(gm, inputs):
        built.append(gm)
        return gm

    monkeypatch.setattr(lars_fx.backend, "compile_with_inductor", run_eagerly)
    return built


def test_backend_resolves_by_name():
    from torch._dynamo.backends.registry import lookup_backend

    assert "lars_fx" in torch._dynamo.list_backends(exclude_tags=())
    assert lookup_backend("lars_fx") is lars_fx_backend


CASES = {
    "foreach-tensor-lr": (dict(foreach=True, momentum=0.9, weight_decay=1e-2), True),
    "for-loop-tensor-lr-nesterov": (
        dict(foreach=False, momentum=0.9, nesterov=True, weight_decay=1e-2), True),
    "for-loop-float-lr-dampening-maximize": (
        dict(foreach=False, momentum=0.8, dampening=0.3, maximize=True, weight_decay=1e-3), False),
    "foreach-no-momentum": (dict(foreach=True, momentum=0.0, weight_decay=1e-2), True),
}


@pytest.mark.parametrize(
    "case, spelling", [*((case, "name") for case in CASES), ("foreach-tensor-lr", "object")]
)
def test_sgd_forms_become_lars(case, spelling):
    sgd_options, tensor_lr = CASES[case]
    model = tiny_model(1)
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    sgd = torch.optim.SGD(model.named_parameters(), lr=lr, **sgd_options)
    options = {"coefficient": 0.02, "epsilon": 1e-5}
    run_against_reference(model, sgd, compiled_step(sgd, options, spelling), options)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # Dynamo-run step
def test_options_and_scheduler_without_recompiles():
    model = tiny_model(2)
    sgd = torch.optim.SGD(model.named_parameters(), lr=torch.tensor(0.5), momentum=0.9, weight_decay=1e-2)
    options = {
        "coefficient": 0.05, "use_clip": True, "lr_inside_momentum": True,
        "lars_filter": lambda p: p.name != "0.weight",  # by name: only 0.weight keeps its plain gradient
    }
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return lars_fx_backend(gm, example_inputs, options=options)

    step = torch.compile(sgd.step, backend=counting_backend)
    scheduler = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.8)
    run_against_reference(model, sgd, step, options, before_step=lambda i: scheduler.step() if i else None)
    assert float(sgd.param_groups[0]["lr"]) < 0.5 * 0.8**8
    assert len(compiles) == 2  # the first step (creates the buffers), then every later step


@pytest.mark.parametrize("carry", [True, False])
def test_weights_written_between_steps(carry):
    model = tiny_model(7)
    sgd = torch.optim.SGD(model.named_parameters(), lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-2)
    options = {"coefficient": 0.02, "carry_weight_norms": carry}
    step = torch.compile(sgd.step, backend="lars_fx", options=options)
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}

    def write_weights(i):
        with torch.no_grad():
            if i == 4:
                model[0].weight.mul_(2.0)
            if i == 7:
                model.load_state_dict(checkpoint)

    run_against_reference(
        model, sgd, step, options, before_step=write_weights, before_step_writes_weights=True
    )


def test_unknown_option_is_a_clear_error():
    model = tiny_model(3)
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    step = torch.compile(sgd.step, backend="lars_fx", options={"coefficent": 0.01})
    with pytest.raises(Exception, match=r"unknown option\(s\) \['coefficent'\]; valid options are"):
        step()
    with pytest.raises(Exception, match="epsilon must be a finite number > 0"):
        torch.compile(sgd.step, backend="lars_fx", options={"epsilon": 0.0})()


def test_other_optimizers_are_refused():
    model = tiny_model(4)
    adam = torch.optim.Adam(model.named_parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with pytest.raises(Exception, match=r"compiles the step of a torch\.optim\.SGD"):
        torch.compile(adam.step, backend="lars_fx")()


def test_graphs_without_the_update():
    model = tiny_model(6)
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    def reads_a_parameter(self):
        return self.param_groups[0]["params"][0] * 2

    def reads_gradients_only(self):  # what a graph break before `param.add_` would leave in a graph
        return [p.grad * 0.9 for p in self.param_groups[0]["params"]]

    doubled = torch.compile(reads_a_parameter, backend="lars_fx")(sgd)
    torch.testing.assert_close(doubled, model[0].weight * 2)
    with pytest.raises(Exception, match="reads gradients but writes no parameter"):
        torch.compile(reads_gradients_only, backend="lars_fx")(sgd)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_on_gpu(dtype):
    model = tiny_model(5, device="cuda", dtype=dtype)
    sgd = torch.optim.SGD(model.named_parameters(), lr=torch.tensor(0.1, device="cuda"), momentum=0.9,
                          weight_decay=1e-2, foreach=True)
    options = {"coefficient": 0.02}
    step = torch.compile(sgd.step, backend="lars_fx", options=options)
    tolerance = dict(rtol=3e-2, atol=3e-3) if dtype == torch.bfloat16 else {}
    run_against_reference(
        model, sgd, step, options, steps=STEPS if dtype == torch.float32 else 3, **tolerance
    )


@pytest.mark.parametrize("name", mindspore_replay.SCENARIOS)
def test_mindspore_replay_through_backend(name):
    """The MindSpore 2.10 trajectories of the foundation issue, through backend="lars_fx" on plain SGD."""
    scenario, model = mindspore_replay.load(name)
    hp = scenario["hyperparameters"]
    lrs = hp["lr_per_step"]
    groups = mindspore_replay.param_groups(model, scenario)
    sgd = torch.optim.SGD(groups, lr=torch.tensor(lrs[0]), momentum=hp["momentum"])
    options = {"epsilon": hp["epsilon"], "coefficient": hp["coefficient"], "use_clip": hp["use_clip"]}
    if name in mindspore_replay.CUSTOM_FILTERS:
        options["lars_filter"] = mindspore_replay.CUSTOM_FILTERS[name]
    step = torch.compile(sgd.step, backend="lars_fx", options=options)

    def set_lr(index):
        for group in sgd.param_groups:
            group["lr"].fill_(lrs[index])

    mindspore_replay.run(name, scenario, model, step, set_lr)


def assert_refused_before_anything_moves(step, model, error, match):
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        step()
    # meta: no values
    assert all(p.is_meta or torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.fixture
def recompile_limit_2():
    with recompile_limit_patch(2):
        yield


@pytest.fixture
def graph_caches_on(monkeypatch, tmp_path):
    """Inductor's FX graph cache and AOT autograd's cache on, in a cache directory of this test's own."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with (
        torch._inductor.config.patch(fx_graph_cache=True),
        torch._functorch.config.patch(enable_autograd_cache=True),
    ):
        yield


def float_hyperparameters_at(i, nesterov):
    """Every float hyperparameter changes at every step (as OneCycleLR and CyclicLR move lr and momentum)."""
    values = {"lr": 0.4 * 0.9**i, "momentum": 0.9 - 0.03 * i, "weight_decay": 0.01 + 0.002 * i}
    if not nesterov:
        values["dampening"] = 0.05 * i
    return values


SYMBOLIC_CASES = {
    "foreach": (dict(foreach=True), {}),
    "for-loop-maximize-clip": (dict(foreach=False, maximize=True), {"use_clip": True}),
    "foreach-nesterov-lr-inside-momentum": (dict(foreach=True, nesterov=True), {"lr_inside_momentum": True}),
    "for-loop-nesterov-unit-trust-no-carry": (
        dict(foreach=False, nesterov=True), {"unit_trust_on_zero_norm": True, "carry_weight_norms": False}),
}


@pytest.mark.parametrize(
    "case, spelling", [*((case, "name") for case in SYMBOLIC_CASES), ("for-loop-maximize-clip", "object")]
)
def test_changing_float_hyperparameters_become_graph_inputs(case, spelling, graphs_run_eagerly):
    """lr, momentum, weight decay and dampening as changing floats: Dynamo makes them SymFloat inputs of
    the second graph, which every later value reuses (float64, so the graph must match the reference
    to rounding)."""
    sgd_options, lars_options = SYMBOLIC_CASES[case]
    model = tiny_model(9, dtype=torch.float64)
    sgd = torch.optim.SGD(model.named_parameters(), **float_hyperparameters_at(0, False), **sgd_options)
    options = {"coefficient": 0.05, **lars_options}
    step = compiled_step(sgd, options, spelling)

    def schedule(i):
        sgd.param_groups[0].update(float_hyperparameters_at(i, sgd_options.get("nesterov", False)))

    run_against_reference(model, sgd, step, options, steps=8, before_step=schedule, rtol=1e-10, atol=1e-12)
    assert len(graphs_run_eagerly) == 2  # the first step (no buffers, values as constants), then one for all


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_float_lr_schedulers_and_several_optimizers_with_the_caches_on(graph_caches_on):
    """Through Inductor with its graph caches on (torch's default) in a fresh cache directory: OneCycleLR
    cycling lr and momentum on float values for two SGDs of the same shape (the second one's graph
    comes from the cache) and a third SGD with another float lr, in one process. Every step is compared:
    a graph that baked one value in would be caught at the next."""
    from torch._dynamo.utils import counters

    compiles = {"a": 0, "b": 0, "c": 0}

    def counting(name, options):
        def backend(gm, example_inputs):
            compiles[name] += 1
            return lars_fx_backend(gm, example_inputs, options=options)

        return backend

    options = {"coefficient": 0.02}
    runs = []
    for name, seed, max_lr in [("a", 11, 0.5), ("c", 13, 0.3)]:
        model = tiny_model(seed)
        sgd = torch.optim.SGD(
            model.named_parameters(), lr=max_lr, momentum=0.9, weight_decay=1e-2, foreach=True
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            sgd, max_lr=max_lr, total_steps=STEPS + 1, cycle_momentum=True
        )
        step = torch.compile(sgd.step, backend=counting(name, options))
        runs.append((Reference(model, sgd, options, seed=seed), step, scheduler))
    model_b = tiny_model(12)
    sgd_b = torch.optim.SGD(model_b.named_parameters(), lr=0.3, weight_decay=1e-2, foreach=False)
    options_b = {"coefficient": 0.05, "use_clip": True}
    step_b = torch.compile(sgd_b.step, backend=counting("b", options_b))
    runs.append((Reference(model_b, sgd_b, options_b, seed=900), step_b, None))
    group = runs[0][0].sgd.param_groups[0]
    seen = []
    hits = counters["inductor"]["fxgraph_cache_hit"]
    for i in range(STEPS):
        seen.append((group["lr"], group["momentum"]))
        for reference, step, scheduler in runs:
            reference.fresh_gradients(i)
            reference.step_and_compare(step)
            if scheduler is not None:
                scheduler.step()
    assert len(set(seen)) == STEPS and all(isinstance(v, float) for pair in seen for v in pair)
    # a: the first step, then one graph for the buffers and every value; c: values dynamic from the start
    # (Dynamo saw a's change), so its first step compiles once, and its steady graph is a's, from the cache;
    # b: lr already dynamic
    assert compiles == {"a": 2, "c": 2, "b": 1}
    assert counters["inductor"]["fxgraph_cache_hit"] > hits

    # A hyperparameter set to a value SGD refuses is refused before anything moves: by the backend when
    # the value recompiles (a constant that changed, a NaN), at the run when a graph input carries it.
    reference, step_a, _ = runs[0]
    model_a = nn.Module()
    model_a.params = nn.ParameterList(reference.params)
    for key, bad in [("lr", -0.5), ("momentum", math.nan), ("dampening", -0.1), ("weight_decay", math.inf)]:
        saved, group[key] = group[key], bad
        match = rf"param_groups\[0\]\['{key}'\] must be a finite number >= 0"
        assert_refused_before_anything_moves(step_a, model_a, ValueError if key == "lr" else Exception, match)
        group[key] = saved
        if key == "lr":
            assert compiles == {"a": 2, "c": 2, "b": 1}  # the run-time check: no compile saw the value


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_steps_dynamo_stops_compiling_are_refused(spelling, graphs_run_eagerly, recompile_limit_2):
    """Never plain SGD: past Dynamo's recompile limit (here a different parameter without a gradient at
    each step) Dynamo runs the step eagerly, and so does a call without torch.compile."""
    model = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(3)])
    sgd = torch.optim.SGD(model.named_parameters(), lr=torch.tensor(0.1), momentum=0.9)
    step = compiled_step(sgd, spelling=spelling)
    params = list(model.parameters())
    for i in range(3):
        for j, p in enumerate(params):
            p.grad = None if j == i else torch.randn_like(p)
        if i < 2:
            step()
    assert len(graphs_run_eagerly) == 2
    assert_refused_before_anything_moves(
        step, model, RuntimeError, r"hit torch._dynamo.config.recompile_limit \(2"
    )
    assert_refused_before_anything_moves(
        sgd.step, model, RuntimeError, "the step was called without torch.compile"
    )


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_step_without_gradients_moves_nothing_and_one_dynamo_then_skips_is_refused(
    spelling, graphs_run_eagerly
):
    """A first step without any gradient traces to an empty graph: Dynamo then skips SGD.step for good, so
    the next step, with gradients, would run eagerly."""
    model = tiny_model(16)
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    step = compiled_step(sgd, spelling=spelling)
    before = [p.detach().clone() for p in model.parameters()]
    step()  # nothing to step: runs (eagerly), moves nothing
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    match = (
        r"skips SGD.step for good since a step it traced found no gradient at all.*torch._dynamo.reset\(\)"
    )
    assert_refused_before_anything_moves(step, model, RuntimeError, match)
    assert graphs_run_eagerly == [] and len(sgd.state) == 0


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_sparse_gradients_are_refused_though_dynamo_gives_up_before_the_backend(spelling):
    """Dynamo cannot trace a sparse gradient and runs the step eagerly without ever calling the backend."""
    model = nn.ModuleDict({"emb": nn.Embedding(6, 3, sparse=True), "lin": nn.Linear(3, 2)})
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    step = compiled_step(sgd, spelling=spelling)
    model["lin"](model["emb"](torch.tensor([1, 2]))).sum().backward()
    match = r"LARS got a sparse gradient for 'emb.weight' .*use a dense embedding \(sparse=False\)"
    assert_refused_before_anything_moves(step, model, ValueError, match)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_an_optimizer_taking_dynamos_last_cache_entry_is_refused(
    spelling, graphs_run_eagerly, recompile_limit_2
):
    """torch.optim's step wrapper takes the optimizer as *args, so Dynamo counts the compiled steps of all
    optimizer objects against one recompile_limit and runs any step past it eagerly, calling no backend:
    the SGD that would fill the cache is refused rather than let the next one be plain SGD unseen."""
    models = [tiny_model(seed) for seed in (13, 14)]
    sgds = [torch.optim.SGD(m.named_parameters(), lr=0.1) for m in models]
    steps = [compiled_step(sgd, spelling=spelling) for sgd in sgds]
    for model in models:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    steps[0]()
    match = r"recompile_limit = 2 entries \(1 in use\), and this one would take the last"
    assert_refused_before_anything_moves(steps[1], models[1], Exception, match)


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("kind", ["complex", "meta"])
def test_parameters_lars_cannot_step_are_refused(kind, spelling):
    if kind == "complex":
        model = nn.ParameterDict({"w": nn.Parameter(torch.randn(3, dtype=torch.complex64))})
        match = "LARS got a complex gradient for w; .*hold it as a real parameter"
    else:
        model = nn.Linear(3, 2, device="meta")
        match = (r"cannot step parameter 'weight' \(param_groups\[0\]\['params'\]\[0\]\): "
                 r"the parameter is on the meta")
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert_refused_before_anything_moves(compiled_step(sgd, spelling=spelling), model, Exception, match)


@pytest.mark.parametrize("shape, foreach", [((1,), True), ((1, 1), False)])
def test_one_element_lr_tensors(shape, foreach, graphs_run_eagerly):
    """torch.optim.SGD takes an lr tensor of any one-element shape (it squeezes it)."""
    model = tiny_model(8)
    sgd = torch.optim.SGD(
        model.named_parameters(), lr=torch.full(shape, 0.1), momentum=0.9, weight_decay=1e-2, foreach=foreach
    )
    options = {"coefficient": 0.02, "use_clip": True}
    step = torch.compile(sgd.step, backend="lars_fx", options=options)

    def decay(i):
        sgd.param_groups[0]["lr"].mul_(0.9)

    run_against_reference(model, sgd, step, options, before_step=decay)


def test_a_graph_the_passes_do_not_understand_says_how_to_proceed(monkeypatch):
    monkeypatch.setenv("LARS_FX_DISABLE", "insert_lars_norms")
    model = tiny_model(15)
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    match = (r"insert_lars_norms must run before insert_trust_ratio"
             r".*lars_fx.LARS\(sgd, \.\.\.\) \(eager, or fused=True\)"
             r".*LARS_FX_DUMP")
    assert_refused_before_anything_moves(torch.compile(sgd.step, backend="lars_fx"), model, Exception, match)


@pytest.mark.parametrize("backend", ["by_name", "object", "wrapped"])
def test_a_parameter_whose_first_gradient_comes_later(backend, graphs_run_eagerly):
    """Dynamo does not guard a parameter state SGD first creates while it compiles a later step (torch
    2.13): it would rerun that step's graph, which creates the parameter's momentum buffer, once the
    buffer exists, restarting its momentum. backend="lars_fx" and a LarsBackend create the states before
    Dynamo first traces SGD.step, and the late parameter follows the reference; a backend that only calls
    lars_fx_backend is not seen that early, and the stale graph is refused."""
    torch.manual_seed(17)
    model = nn.ParameterDict({name: nn.Parameter(torch.randn(3, 2)) for name in ("a", "b", "late")})
    late = model["late"]
    groups = [{"params": [("a", model["a"])]}, {"params": [("b", model["b"]), ("late", late)], "lr": 0.1}]
    sgd = torch.optim.SGD(groups, lr=0.3, momentum=0.9)
    options = {"coefficient": 0.05, "lars_filter": lambda p: True}
    if backend != "wrapped":
        step = compiled_step(sgd, options, "name" if backend == "by_name" else "object")
    else:
        step = torch.compile(
            sgd.step, backend=lambda gm, inputs: lars_fx_backend(gm, inputs, options=options)
        )
    want, buffer = [late.detach().double().clone()], [None]
    for i in range(4):
        for p in model.values():
            p.grad = None if (p is late and i == 0) else torch.randn_like(p)
        if i == 2 and backend == "wrapped":
            match = r"first step of parameter 'late' \(param_groups\[1\]\['params'\]\[1\]\).*sgd.state\[p\]"
            assert_refused_before_anything_moves(step, model, RuntimeError, match)
            return
        step()
        if late.grad is not None:
            buffer = lars_sgd_reference(want, [late.grad.double()], buffer, [True], lr=0.1, momentum=0.9,
                                        coefficient=0.05, epsilon=1e-5, weight_decay=0.0)
        torch.testing.assert_close(late.detach().double(), want[0], rtol=2e-5, atol=1e-6)
    assert len(graphs_run_eagerly) == 3  # no buffers; late's first step; every buffer


@pytest.mark.parametrize("foreach, spelling", [(True, "name"), (False, "name"), (True, "object")])
def test_gradients_that_are_views_of_one_buffer(foreach, spelling, graphs_run_eagerly):
    """DDP's gradient_as_bucket_view: Dynamo hands the backend each gradient's storage offset as a symbolic
    integer (was a PatternMismatch naming a written input that is no parameter)."""
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)).double()

    def bucketed_gradients(model: nn.Module) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        offset = 0
        for p in model.parameters():
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    x = torch.randn(8, 5, dtype=torch.float64)
    model, reference = build(), build()
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=foreach)
    step = compiled_step(sgd, {"coefficient": 0.02}, spelling)
    expected = lars_fx.LARS(
        torch.optim.SGD(reference.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
        coefficient=0.02, foreach=False,
    )
    for _ in range(3):
        for net, optimizer_step in ((model, step), (reference, expected.step)):
            net(x).square().mean().backward()
            if net is model:
                bucketed_gradients(net)
            optimizer_step()
            net.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_backend_options_are_lars_options():
    """BACKEND_OPTIONS: LarsOptions' names, the filter and the carry, each an option of lars_fx.LARS."""
    assert set(LarsOptions.names()) < set(BACKEND_OPTIONS)
    assert set(BACKEND_OPTIONS) <= set(inspect.signature(lars_fx.LARS).parameters)


def test_backend_object_checks_its_options_once_and_claims_its_sgd():
    model = tiny_model(20)
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    backend = LarsBackend(
        sgd, options=LarsOptions(coefficient=0.05), use_clip=True, lars_filter=lambda p: True
    )
    assert backend.options == LarsOptions(coefficient=0.05, use_clip=True) and backend.carry_weight_norms
    with pytest.raises(ValueError, match=r"LarsBackend got unknown option\(s\) \['coefficent'\]; valid"):
        LarsBackend(sgd, coefficent=0.01)
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
        LarsBackend(sgd, epsilon=0.0)
    with pytest.raises(TypeError, match="lars_filter must be callable"):
        LarsBackend(sgd, lars_filter="bias")
    with pytest.raises(TypeError, match="carry_weight_norms must be True or False"):
        LarsBackend(sgd, carry_weight_norms="yes")
    with pytest.raises(TypeError, match=r"options must be a lars_fx\.functional\.LarsOptions"):
        LarsBackend(sgd, options={"coefficient": 0.05})
    with pytest.raises(TypeError, match=r"compiles the step of a torch\.optim\.SGD.*got Adam"):
        LarsBackend(torch.optim.Adam(model.parameters()))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    # Made for sgd: from now on sgd steps only inside a graph the backend compiled.
    assert_refused_before_anything_moves(sgd.step, model, RuntimeError, "called without torch.compile")
    compiled = torch.compile(sgd.step, backend=backend, options={"coefficient": 0.01})
    assert_refused_before_anything_moves(compiled, model, Exception, r"takes its options when it is made")


def test_backend_object_refuses_the_step_of_another_optimizer(graphs_run_eagerly):
    """A LarsBackend tells its SGD's graphs from another optimizer's by the parameters they write, and
    is not spoiled by the attempt: its own SGD then steps as the reference."""
    models = [tiny_model(seed) for seed in (21, 22)]
    sgds = [torch.optim.SGD(m.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2) for m in models]
    options = {"coefficient": 0.02}
    backend = LarsBackend(sgds[0], **options)
    for p in models[1].parameters():
        p.grad = torch.randn_like(p)
    match = r"writes 4 parameter\(s\) that this SGD does not hold.*LarsBackend\(other, \.\.\.\)"
    other_step = torch.compile(sgds[1].step, backend=backend)
    assert_refused_before_anything_moves(other_step, models[1], Exception, match)
    assert graphs_run_eagerly == []
    run_against_reference(models[0], sgds[0], torch.compile(sgds[0].step, backend=backend), options, steps=4)


def test_backend_object_refuses_another_sgd_over_the_same_parameters(graphs_run_eagerly):
    """An SGD rebuilt over the same parameters with momentum buffers of its own (a checkpoint's copy) is
    told apart by its buffers."""
    model = tiny_model(23)
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    backend = LarsBackend(sgd, coefficient=0.02)
    step = torch.compile(sgd.step, backend=backend)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        step()
    rebuilt = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    rebuilt.load_state_dict(copy.deepcopy(sgd.state_dict()))
    match = r"updates a momentum buffer of '0.weight' .* that this SGD does not hold"
    rebuilt_step = torch.compile(rebuilt.step, backend=backend)
    assert_refused_before_anything_moves(rebuilt_step, model, Exception, match)
