"""The benchmark's peers: LARS in each of its forms, timm's Lars, and SGD without LARS."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import SGD, Optimizer
from torch.optim.optimizer import ParamsT

from ..backend import LarsBackend
from ..optimizer import LARS, ParamInfo, default_lars_filter

LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4

# -- the timm peer -------------------------------------------------------------------------------


class TimmLars(Optimizer):
    """A faithful reimplementation of ``timm.optim.Lars``'s step (timm is not a dependency).

    Per tensor: norms, a ``torch.where`` trust ratio (1 where either norm is 0), the gradient scaled
    in place, then torch-1.7-style momentum SGD. As in timm, only groups with weight decay (or
    ``always_adapt``) are adapted, so timm's usual split (no decay for biases and norms) selects the
    LARS tensors.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coeff: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        always_adapt: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            trust_coeff=trust_coeff,
            eps=eps,
            trust_clip=trust_clip,
            always_adapt=always_adapt,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weight_decay = group["weight_decay"]
            momentum = group["momentum"]
            dampening = group["dampening"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if weight_decay != 0 or group["always_adapt"]:
                    w_norm = p.norm(2.0)
                    g_norm = grad.norm(2.0)
                    trust_ratio = (
                        group["trust_coeff"] * w_norm / (g_norm + w_norm * weight_decay + group["eps"])
                    )
                    trust_ratio = torch.where(w_norm > 0, torch.where(g_norm > 0, trust_ratio, 1.0), 1.0)
                    if group["trust_clip"]:
                        trust_ratio = torch.clamp(trust_ratio / group["lr"], max=1.0)
                    grad.add_(p, alpha=weight_decay)
                    grad.mul_(trust_ratio)
                if momentum != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        buf = state["momentum_buffer"] = torch.clone(grad).detach()
                    else:
                        buf = state["momentum_buffer"]
                        buf.mul_(momentum).add_(grad, alpha=1.0 - dampening)
                    grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(grad, alpha=-group["lr"])
        return loss


# -- peers ---------------------------------------------------------------------------------------

NamedParams = list[tuple[str, torch.nn.Parameter]]
Step = Callable[[], object]


@dataclass(frozen=True)
class Peer:
    key: str
    label: str
    build: Callable[[NamedParams], Step]
    compiled: bool = False
    cuda_only: bool = False
    writes_grads: bool = False  # scales .grad in place: gets gradients of its own


def lars_mask(named: Sequence[tuple[str, Tensor]]) -> list[bool]:
    return [default_lars_filter(ParamInfo(name, p, 0, i)) for i, (name, p) in enumerate(named)]


def _timm_lars(named: NamedParams) -> TimmLars:
    mask = lars_mask(named)
    groups = [
        {"params": [p for (_, p), lars in zip(named, mask, strict=True) if lars],
         "weight_decay": WEIGHT_DECAY},
        {"params": [p for (_, p), lars in zip(named, mask, strict=True) if not lars], "weight_decay": 0.0},
    ]
    return TimmLars([g for g in groups if g["params"]], lr=LR, momentum=MOMENTUM)


def _sgd(named: NamedParams, **options) -> SGD:
    return SGD(named, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **options)


def _fused_lars(named: NamedParams, **options) -> Step:
    """``LARS(fused=True).step``, failing the row if the fused path fell back to the eager step, or compiled
    nothing by its second step (the first makes the momentum buffers eagerly): the row would time eager LARS
    under the fused step's name."""
    lars = LARS(_sgd(named), fused=True, **options)
    steps = 0

    def step() -> None:
        nonlocal steps
        lars.step()
        steps += 1
        fused = lars.fused_step
        assert fused is not None  # fused=True
        if fused.fallback:
            raise RuntimeError(f"fused step fell back to eager LARS: {fused.fallback}")
        if steps >= 2 and fused.compile_count == 0:
            raise RuntimeError("fused step compiled no graph by its second step: it runs eager LARS")

    return step


def _backend_lars(sgd: SGD) -> Step:
    """SGD's step compiled into LARS by the backend (the object: needs no installed entry point)."""
    return torch.compile(sgd.step, backend=LarsBackend(sgd))


def _in_one_cuda_graph(step: Step) -> Step:
    """Warm up on a side stream (creates the momentum buffers), capture one step, replay it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


PEERS: dict[str, Peer] = {
    peer.key: peer
    for peer in (
        Peer("timm_eager", "timm Lars, eager", lambda n: _timm_lars(n).step, writes_grads=True),
        Peer(
            "timm_compiled",
            "torch.compile(timm Lars.step)",
            lambda n: torch.compile(_timm_lars(n).step),
            True,
            writes_grads=True,
        ),
        Peer(
            "timm_compiled_combo",
            "torch.compile(timm Lars.step), combo_kernels",
            lambda n: torch.compile(_timm_lars(n).step, options={"combo_kernels": True}),
            True,
            cuda_only=True,
            writes_grads=True,
        ),
        Peer(
            "timm_reduce_overhead",
            "torch.compile(timm Lars.step, mode=reduce-overhead)",
            lambda n: torch.compile(_timm_lars(n).step, mode="reduce-overhead"),
            True,
            cuda_only=True,
            writes_grads=True,
        ),
        Peer(
            "lars_loop", "LARS(foreach=False), per-tensor eager", lambda n: LARS(_sgd(n), foreach=False).step
        ),
        Peer("lars_foreach", "LARS (foreach), eager", lambda n: LARS(_sgd(n)).step),
        Peer(
            "lars_foreach_cudagraph",
            "LARS (foreach) in one CUDA graph",
            lambda n: _in_one_cuda_graph(LARS(_sgd(n)).step),
            cuda_only=True,
        ),
        Peer("lars_flat", "LARS(flat=True), eager", lambda n: LARS(_sgd(n), flat=True).step),
        Peer(
            "lars_flat_cudagraph",
            "LARS(flat=True) in one CUDA graph",
            lambda n: _in_one_cuda_graph(LARS(_sgd(n), flat=True).step),
            cuda_only=True,
        ),
        Peer("lars_fused", "LARS(fused=True)", _fused_lars, True),
        Peer(
            "lars_fused_no_carry",
            "LARS(fused=True, carry_weight_norms=False)",
            lambda n: _fused_lars(n, carry_weight_norms=False),
            True,
        ),
        Peer("lars_flat_fused", "LARS(flat=True, fused=True)", lambda n: _fused_lars(n, flat=True), True),
        Peer(
            "lars_backend",
            'torch.compile(SGD.step, backend="lars_fx")',
            lambda n: _backend_lars(_sgd(n)),
            True,
        ),
        Peer("sgd_compiled", "torch.compile(SGD.step), no LARS", lambda n: torch.compile(_sgd(n).step), True),
        Peer("sgd_foreach", "SGD foreach, eager, no LARS", lambda n: _sgd(n, foreach=True).step),
        Peer(
            "sgd_foreach_cudagraph",
            "SGD foreach in one CUDA graph, no LARS",
            lambda n: _in_one_cuda_graph(_sgd(n, foreach=True).step),
            cuda_only=True,
        ),
    )
}


def available_peers(device: str | torch.device) -> list[str]:
    """The peers that run on ``device``, in table order."""
    on_cuda = torch.device(device).type == "cuda"
    return [key for key, peer in PEERS.items() if on_cuda or not peer.cuda_only]
