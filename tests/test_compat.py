"""``lars_fx._compat``: each function does what its callers rely on, on the torch installed here.

A torch release that moves one of these private APIs fails the test named after the function. One Inductor
compile is shared by the Inductor functions (compile_fx, the config patch, a CustomGraphPass and the kernel
count).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lars_fx import _compat


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class RecordingBackend:
    """A backend object (as ``LarsBackend`` is) that runs the graph as it is and keeps the example inputs."""

    def __init__(self) -> None:
        self.example_inputs: list = []

    def __call__(self, gm, example_inputs):
        self.example_inputs.append(list(example_inputs))
        return gm


def test_traced_frame_outside_a_trace_is_none():
    assert _compat.traced_frame() is None


def test_traced_frame_inside_a_trace_holds_the_locals_the_code_and_the_backend_object():
    """backend.py's claim reads the traced frame's locals (the string backend finds its SGD there), its code
    (the cache it counts) and the backend it traces for, unwrapped from torch.compile's wrappers."""
    frames = []

    @torch.compiler.assume_constant_result
    def probe() -> int:  # run for real while Dynamo traces, as backend.py's claim is
        frames.append(_compat.traced_frame())
        return 0

    def traced(x, marker):
        probe()
        return x + 1

    backend = RecordingBackend()
    marker = object()
    torch.compile(traced, backend=backend)(torch.randn(3), marker)
    frame = frames[0]
    assert frame.backend is backend
    assert frame.f_locals["marker"] is marker
    assert frame.code is traced.__code__


def test_traced_frame_names_the_function_a_backend_name_resolved_to():
    """torch.compile(..., backend="lars_fx", options=...) wraps the registered function; the claim compares
    the unwrapped backend with it."""
    from lars_fx.backend import lars_fx_backend

    frames = []

    @torch.compiler.assume_constant_result
    def probe() -> int:
        frames.append(_compat.traced_frame())
        return 0

    def traced(x):
        probe()
        return x + 1

    with pytest.raises(Exception, match=r"compiles the step of a torch\.optim\.SGD"):  # no SGD here
        torch.compile(traced, backend="lars_fx", options={"coefficient": 0.01})(torch.randn(3))
    assert frames[0].backend is lars_fx_backend


def test_cache_entry_count_counts_dynamos_compiled_entries():
    def doubled(x):
        return x * 2

    compiled = torch.compile(doubled, backend=RecordingBackend(), dynamic=False)
    assert _compat.cache_entry_count(doubled.__code__) == 0
    compiled(torch.randn(2))
    assert _compat.cache_entry_count(doubled.__code__) == 1
    compiled(torch.randn(3))  # another static shape: a second entry
    assert _compat.cache_entry_count(doubled.__code__) == 2


def test_recompile_limit_and_its_patch():
    before = _compat.recompile_limit()
    assert isinstance(before, int) and before > 0
    with _compat.recompile_limit_patch(before + 5):
        assert _compat.recompile_limit() == before + 5
    assert _compat.recompile_limit() == before


def test_recompile_limit_patch_is_the_limit_dynamo_obeys():
    def doubled(x):
        return x * 2

    backend = RecordingBackend()
    compiled = torch.compile(doubled, backend=backend, dynamic=False)
    with _compat.recompile_limit_patch(2):
        for n in range(2, 6):
            torch.testing.assert_close(compiled(torch.ones(n)), torch.full((n,), 2.0))  # past it: eager
    assert len(backend.example_inputs) == 2


def test_dynamo_is_tracing_while_dynamo_traces_and_not_when_compiled_code_runs():
    """backend.py's SGD._init_group replacement (a torch.compiler.disable'd function) tells the trace, where
    Dynamo runs it for real, from a run, where Dynamo fell back to the eager step."""
    during_trace, at_run = [], []

    @torch.compiler.assume_constant_result
    def probe() -> int:
        during_trace.append(_compat.dynamo_is_tracing())
        return 0

    @torch.compiler.disable
    def untraced() -> None:
        at_run.append(_compat.dynamo_is_tracing())

    def traced(x):
        probe()
        untraced()
        return x + 1

    assert not _compat.dynamo_is_tracing()
    compiled = torch.compile(traced, backend=RecordingBackend())
    compiled(torch.randn(3))
    compiled(torch.randn(3))
    assert during_trace and all(during_trace)  # Dynamo may trace the frame more than once (the graph break)
    assert at_run == [False, False]


def test_as_compiling_sets_is_compiling_and_restores_it():
    assert not torch.compiler.is_compiling()
    with _compat.as_compiling():
        assert torch.compiler.is_compiling()
    assert not torch.compiler.is_compiling()
    with pytest.raises(KeyError), _compat.as_compiling():
        raise KeyError
    assert not torch.compiler.is_compiling()


def test_as_compiling_keeps_a_tensor_lr_in_sgds_foreach_graph():
    """fx_canonicalize's reason for it: SGD's foreach form keeps a tensor lr as a graph input only when
    compiling (else it reads the value with .item(), which a fake trace cannot)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.optim.sgd import sgd

    def step(param, grad, lr):
        sgd([param], [grad], [None], foreach=True, lr=lr, weight_decay=0.0, momentum=0.0, dampening=0.0,
            nesterov=False, maximize=False)
        return param

    inputs = (torch.randn(3), torch.randn(3), torch.tensor(0.1))
    with _compat.as_compiling():
        gm = make_fx(torch.func.functionalize(step), tracing_mode="fake")(*inputs)
    assert not any(n.target is torch.ops.aten._local_scalar_dense.default for n in gm.graph.nodes)
    param, grad, lr = (t.clone() for t in inputs)
    torch.testing.assert_close(gm(param.clone(), grad, lr), param - 0.1 * grad)


def test_fresh_fake_mode_and_tracing():
    fake_mode = _compat.fresh_fake_mode()
    other = _compat.fresh_fake_mode()
    assert fake_mode.shape_env is not None and fake_mode.shape_env is not other.shape_env
    assert fake_mode.static_shapes
    assert torch._guards.TracingContext.try_get() is None
    with _compat.tracing(fake_mode):
        context = torch._guards.TracingContext.try_get()
        assert context is not None and context.fake_mode is fake_mode
    assert torch._guards.TracingContext.try_get() is None


def test_is_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2)
    assert _compat.is_fake(fake)
    assert not _compat.is_fake(torch.empty(2))
    assert not _compat.is_fake(torch.empty(2, device="meta"))
    assert not _compat.is_fake(None)


def test_symint_hint_is_the_value_a_symbolic_integer_stands_for():
    backend = RecordingBackend()
    torch.compile(lambda x: x * 2, backend=backend, dynamic=True)(torch.randn(5))
    symbolic = [v for v in backend.example_inputs[0] if isinstance(v, torch.SymInt)]
    assert symbolic, "Dynamo handed no symbolic integer"
    assert [_compat.symint_hint(v) for v in symbolic] == [5]
    tensor = torch.randn(2)
    assert _compat.symint_hint(3) == 3 and _compat.symint_hint(tensor) is tensor


def test_inductor_functions_in_one_compile(tmp_path, monkeypatch):
    """compile_fx under a tracing context of its own, with a CustomGraphPass (uuid from hash_of_files, graph
    reordered by stable_topological_sort) installed through inductor_config_patch next to a pass configured
    before; the kernel count moves."""
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    seen = []

    class Recorder(_compat.CustomGraphPass):
        def __init__(self, name: str) -> None:
            self.name = name

        def __call__(self, graph: torch.fx.Graph) -> None:
            seen.append(self.name)
            _compat.stable_topological_sort(graph)
            graph.lint()

        def uuid(self) -> bytes:
            return _compat.hash_of_files((__file__,))

    def fn(x, y):
        return (x * y).sum() + y.square().sum()

    x, y = torch.randn(16), torch.randn(16)
    gm = make_fx(fn)(x, y)
    configured = Recorder("configured")
    with _compat.inductor_config_patch(post_grad_custom_post_pass=configured):
        assert _compat.configured_post_grad_passes() == [configured]
        ours = Recorder("ours")
        _compat.reset_inductor_metrics()
        assert _compat.generated_kernel_count() == 0
        with _compat.tracing(_compat.fresh_fake_mode()), _compat.inductor_config_patch(
            post_grad_custom_post_pass=ours, size_asserts=False, fx_graph_cache=False
        ):
            compiled = _compat.compile_fx(gm, [x, y])
        assert _compat.generated_kernel_count() > 0
    assert _compat.configured_post_grad_passes() == []
    assert seen == ["ours"]
    torch.testing.assert_close(compiled(x, y), fn(x, y))
    assert isinstance(ours.uuid(), bytes) and ours.uuid() == Recorder("again").uuid()  # a stable cache key


def test_stable_topological_sort_puts_nodes_after_their_inputs():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    doubled = graph.call_function(torch.mul, (x, 2))
    total = graph.call_function(torch.sum, (doubled,))
    graph.output(total)
    with graph.inserting_after(total):
        late = graph.call_function(torch.neg, (x,))
    doubled.args = (late, 2)  # `doubled` now reads a node that comes after it, as a pass's rewrite leaves it
    _compat.stable_topological_sort(graph)
    order = list(graph.nodes)
    assert order.index(late) < order.index(doubled) < order.index(total)
    graph.lint()


def test_configured_post_grad_passes_as_a_list():
    first, second = object(), object()
    assert _compat.configured_post_grad_passes() == []
    with _compat.inductor_config_patch(post_grad_custom_post_pass=first):
        assert _compat.configured_post_grad_passes() == [first]
    with _compat.inductor_config_patch(post_grad_custom_post_pass=[first, second]):  # torch >= 2.12
        assert _compat.configured_post_grad_passes() == [first, second]


@pytest.fixture
def single_rank_group(tmp_path):
    """A one-rank gloo process group in this process (a file store: no port)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_functional_all_reduce_and_the_graph_ops(single_rank_group):
    tensor = torch.randn(4)
    reduced = _compat.functional_all_reduce(tensor, "sum", single_rank_group)
    assert type(reduced) is torch.Tensor  # waited for: not an AsyncCollectiveTensor
    torch.testing.assert_close(reduced, tensor)
    torch.testing.assert_close(_compat.functional_all_reduce(tensor, "min", single_rank_group), tensor)
    all_reduce, wait_tensor = _compat.c10d_all_reduce_ops()
    torch.testing.assert_close(wait_tensor(all_reduce(tensor, "sum", single_rank_group.group_name)), tensor)


def test_is_fsdp1_flat_parameter():
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    flat, plain = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    _set_fsdp_flattened(flat)  # what FSDP1's FlatParamHandle does to the slices it hands the optimizer
    assert _compat.is_fsdp1_flat_parameter(flat)
    assert not _compat.is_fsdp1_flat_parameter(plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_powsum(dtype):
    tensors = [torch.randn(3, 4), torch.randn(7, dtype=torch.float64), torch.zeros(2)]
    sums = _compat.foreach_powsum(tensors, dtype)
    if not hasattr(torch, "_foreach_powsum"):
        assert sums is None
        return
    want = [torch.sum(torch.square(t.to(dtype))) for t in tensors]
    assert sums is not None and [s.dtype for s in sums] == [dtype] * 3
    torch.testing.assert_close(sums, want)


def test_foreach_powsum_is_none_while_dynamo_traces():
    def none_under_dynamo(x):
        return x + float(_compat.foreach_powsum([x], torch.float32) is None)

    compiled = torch.compile(none_under_dynamo, backend=RecordingBackend(), fullgraph=True)
    torch.testing.assert_close(compiled(torch.zeros(2)), torch.ones(2))


def test_own_init_group_and_its_override():
    """backend.py replaces an SGD's _init_group on the instance; SGD.step calls the replacement once per
    group, and the replacement's call of SGD's own keeps the step SGD's."""
    torch.manual_seed(0)
    model, twin = nn.Linear(3, 2), nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1, momentum=0.9)
    plain = torch.optim.SGD([{"params": [twin.weight]}, {"params": [twin.bias]}], lr=0.1, momentum=0.9)
    calls = []

    def replacement(group, *args, **kwargs):
        calls.append(group["params"][0].shape)
        return _compat.own_init_group(sgd, group, *args, **kwargs)

    assert _compat.override_init_group(sgd, replacement)
    assert not _compat.override_init_group(sgd, lambda *a, **k: None)  # the first one stays
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        sgd.step()
        plain.step()
    assert calls == [model.weight.shape, model.bias.shape] * 3
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(sgd.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"])


def test_export_forward_backward_outputs_the_loss_then_each_parameters_gradient():
    from torch.export.graph_signature import OutputKind

    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x, target):
            return (torch.nn.functional.mse_loss(self.linear(x), target),)

    module = Loss()
    x, target = torch.randn(4, 3), torch.randn(4, 2)
    joint = _compat.export_forward_backward(torch.export.export(module, (x, target), strict=False))
    specs = joint.graph_signature.output_specs
    assert [s.kind for s in specs] == [OutputKind.LOSS_OUTPUT] + [OutputKind.GRADIENT_TO_PARAMETER] * 2
    assert [s.target for s in specs[1:]] == ["linear.weight", "linear.bias"]
    weight, bias = module.linear.weight.detach(), module.linear.bias.detach()
    loss, grad_w, grad_b = joint.graph_module(weight, bias, x, target)
    (expected,) = module(x, target)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad_w, module.linear.weight.grad)
    torch.testing.assert_close(grad_b, module.linear.bias.grad)
