"""What tests/test_flat.py runs on every rank (through ``dist_harness.run_on_ranks``): ``LARS(flat=True)``
under DDP, with and without ``gradient_as_bucket_view``. Model, data, param groups and the float64 reference
are ``dist_workers``'s, so the runs compare with ``dist_workers.reference_trajectory``."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

import dist_workers as workers
import lars_fx
from lars_fx.flat_layout import GRAD_COPY_WARNING

DDP_CONFIGS: dict[str, dict[str, Any]] = {
    "ddp": {},
    "ddp_gradient_as_bucket_view": {"gradient_as_bucket_view": True},
}
VARIANT = "scheduled"  # momentum with dampening, a StepLR on a float lr
WARNING_START = GRAD_COPY_WARNING.split("{")[0]


def ddp_flat_job(steps: int) -> dict[str, Any]:
    """Every DDP configuration of ``DDP_CONFIGS``, one check each (``dist_workers.Checks``)."""
    checks = workers.Checks()
    for config, ddp_options in DDP_CONFIGS.items():
        checks.run(config, functools.partial(ddp_flat_run, ddp_options, steps))
    return checks.results


def ddp_flat_run(ddp_options: dict[str, Any], steps: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(workers.build_model(), **ddp_options)
    optimizer = lars_fx.LARS(
        workers.sgd_for(model.module, VARIANT), coefficient=workers.COEFFICIENT, flat=True
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    batches = workers.data_parallel_batches()
    trajectory = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            workers.loss_of(model, *batches(step)).backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            trajectory.append(workers.full_parameters(model))
    layout = optimizer.flat_layout
    assert layout is not None
    return {
        "trajectory": trajectory,
        "grad_copies": layout.grad_copies,
        "copy_warnings": sum(str(w.message).startswith(WARNING_START) for w in caught),
        "views": on_the_buffers(optimizer),
    }


def on_the_buffers(optimizer: lars_fx.LARS) -> bool:
    """Whether every parameter, gradient and momentum buffer of the layout is its bucket's view."""
    layout = optimizer.flat_layout
    assert layout is not None
    for bucket in layout.buckets:
        for k, p in enumerate(bucket.params):
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if p.data_ptr() != bucket.weight_views[k].data_ptr() or p.grad is not bucket.grad_views[k]:
                return False
            if buf is not None and buf is not bucket.momentum_views[k]:
                return False
    return True
