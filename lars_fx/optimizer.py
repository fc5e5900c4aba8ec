"""``LARS``: MindSpore's ``nn.LARS`` wrapper as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import SGD, Optimizer

from . import functional as F
from . import sharding
from .functional.lars import lars_norms
from .functional.options import LarsOptions, check_flag
from .inner_step import step_with_gradients
from .params import (
    ParamInfo,
    check_filter,
    check_sgd_group,
    default_lars_filter,
    filter_decisions,
    group_gradients,
    parameter_name,
)
from .sharded_norms import reduce_step_norms
from .telemetry import Telemetry

if TYPE_CHECKING:
    from .flat_layout import FlatGather, FlatLayout
    from .fused import FusedStep

__all__ = ["LARS", "ParamInfo", "default_lars_filter", "GroupTensors"]


class GroupTensors(NamedTuple):
    """One param group's tensors for a step, gathered once: the parameters that have gradients, their
    gradients, the filter's decisions, their indices in the group, and this rank's pieces of the parameters
    and of their gradients laid out as them (the same tensors without DTensors)."""

    params: list[Tensor]
    grads: list[Tensor]
    mask: list[bool]
    indices: list[int]
    local_params: list[Tensor]
    local_grads: list[Tensor]


class _Option:
    """A LARS mode switch: checked when set, and read by every mode at its next step (the fused step's
    cache key includes it, so a change compiles once)."""

    def __init__(
        self, check: Callable[[str, Any], Any], on_set: Callable[[LARS], None] | None = None
    ) -> None:
        self.check = check
        self.on_set = on_set

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = "_option_" + name

    def __get__(self, obj: LARS | None, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj, self.slot)

    def __set__(self, obj: LARS, value: Any) -> None:
        missing = object()
        previous = getattr(obj, self.slot, missing)
        setattr(obj, self.slot, self.check(self.name, value))
        if self.on_set is None:
            return
        try:
            self.on_set(obj)
        except Exception:  # refused (say fused=True over Adam): the option keeps its previous value
            if previous is missing:
                delattr(obj, self.slot)
            else:
                setattr(obj, self.slot, previous)
            raise


class _MathOption:
    """One of ``LarsOptions``' fields as an attribute: setting it replaces ``opt.options`` (checked there)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: LARS | None, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.options, self.name)

    def __set__(self, obj: LARS, value: Any) -> None:
        obj.options = obj.options.replace(**{self.name: value})


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling around another optimizer, as MindSpore's ``nn.LARS``.

    For every parameter ``w`` with gradient ``g`` for which ``lars_filter`` is true, the wrapped
    optimizer steps with ``coeff * (g + weight_decay * w)`` in place of ``g``, where
    ``coeff = coefficient * ||w|| / (||g|| + weight_decay * ||w|| + epsilon)`` (clipped to
    ``[0, 1]`` after dividing by the group's lr when ``use_clip``). Other parameters step with
    their plain gradient. LARS takes over the wrapped optimizer's weight decay: the group's
    ``weight_decay`` is applied inside the trust ratio and the wrapped optimizer applies none.

    Args:
        optimizer: the wrapped optimizer, built from named parameters (``model.named_parameters()``)
            so the filter can read names. Over ``torch.optim.SGD`` every SGD option is supported
            (its ``foreach``/``fused`` flags aside: LARS's own ``foreach`` and ``fused`` decide);
            over any other optimizer, the trust-ratio-scaled gradients are fed to its ``step``.
        epsilon: added to the trust ratio's denominator; MindSpore's default.
        coefficient: the trust coefficient (eta).
        use_clip: clip ``coeff / lr`` to ``[0, 1]``, with ``lr`` the group's current learning rate.
        lars_filter: ``ParamInfo -> bool``; True means the parameter gets LARS.
        unit_trust_on_zero_norm: use a trust ratio of 1 where ``||w||`` or ``||g||`` is 0 (timm,
            apex) instead of MindSpore's formula (which gives 0 where ``||w|| = 0``).
        lr_inside_momentum: the paper's momentum form ``v = m*v + lr*u; w = w - v`` instead of
            MindSpore's/torch's ``v = m*v + u; w = w - lr*v``. They differ only when lr changes.
            Requires SGD as the wrapped optimizer.
        skip_nonfinite: skip the whole step (parameters and state untouched) when any gradient
            has an inf or NaN; costs one device-to-host sync per step. By default, as MindSpore,
            non-finite gradients propagate into the parameters. Skipped steps are counted in
            ``skipped_steps``.
        foreach: use the multi-tensor kernels (default); False runs the per-tensor reference.
        fused: capture the step as an FX graph, rewrite it with lars-fx's passes and compile it
            with Inductor (SGD only); same numbers as the eager path.
        carry_weight_norms: with ``fused``, each step also computes the squared norms of the weights
            it writes, in the update's own loop, and the next step uses them instead of reading the
            weights once more (24 instead of 28 bytes per fp32 parameter). Weights written between
            steps are noticed through their version counter (in-place ops, ``load_state_dict``,
            ``copy_``) and the norms recomputed; writes that bypass it (through ``.data``, or from
            outside PyTorch) are not: set this to False when the weights are written that way. Graphs over
            sharded (DTensor) parameters never carry: writes through ``torch._foreach_*_`` on DTensors or
            through ``p.to_local()`` bump no version counter the carry could watch.
        telemetry: record each LARS parameter's ||w||, ||g|| and trust ratio every step, kept on
            the device (no host sync) and read on demand through ``telemetry``.
        flat: keep each (param group, device, dtype, LARS or not)'s parameters, gradients and momentum
            buffers as segments of one contiguous buffer each (``lars_fx.flat_layout``; SGD only): the step
            then runs a few whole-buffer operations, eager or fused, whatever the number of tensors. The
            parameters stay the same objects (their data become views); ``opt.zero_grad()`` zeroes the
            gradient buffer in place (as ``set_to_none=False``: a parameter that gets no gradient from the
            next backward steps with a zero one); gradients that are not views (``model.zero_grad()``, an
            assigned ``.grad``) are copied in, exactly, with a warning. Sharded (DTensor) parameters and
            parameters that are views of other tensors are refused.

    The options are attributes of the same names. Assigning one (``opt.coefficient = 0.002``,
    ``opt.lars_filter = ...``) is checked as in the constructor and takes effect at the next step in
    every mode (a fused step compiles once for the new value). The param groups' ``lr``,
    ``weight_decay``, ``momentum`` and ``dampening`` are checked at every step (a tensor lr on a GPU
    only for its shape: reading its value would sync).

    Sharded parameters (DTensors: FSDP2's ``fully_shard``, tensor parallelism, both, HSDP) step in every mode:
    each rank computes its pieces' sums of squares, one all-reduce per sharding mesh dimension sums those of
    the whole step, and the update runs on the local shards (see docs/distributed.md). FSDP1's flat-parameter
    slices are refused (use FSDP2).

    Norms are computed in float32 for float32 and half-precision tensors (float64 for float64), as
    MindSpore's kernel does: a ``||w||`` or ``||g||`` above about 1.8e19 overflows to inf and the
    step writes inf/NaN, like a non-finite gradient.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        epsilon: float = 1e-5,
        coefficient: float = 0.001,
        use_clip: bool = False,
        lars_filter: Callable[[ParamInfo], bool] = default_lars_filter,
        *,
        unit_trust_on_zero_norm: bool = False,
        lr_inside_momentum: bool = False,
        skip_nonfinite: bool = False,
        foreach: bool = True,
        fused: bool = False,
        carry_weight_norms: bool = True,
        telemetry: bool = False,
        flat: bool = False,
    ) -> None:
        if isinstance(optimizer, LARS):
            raise TypeError("optimizer is already a lars_fx.LARS; wrap the inner optimizer only once")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer such as "
                "torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9), "
                f"got {type(optimizer).__name__}"
            )
        self._wraps_sgd = type(optimizer) is SGD
        self.skipped_steps = 0
        self.telemetry: Telemetry | None = Telemetry() if check_flag("telemetry", telemetry) else None
        self._fused_step: FusedStep | None = None
        self._flat_layout: FlatLayout | None = None
        self._telemetry_parts: dict[int, tuple[list[int], F.NormCollector]] | None = None
        self._own_storages: frozenset[int] = frozenset()

        # Optimizer.__init__ sets up hooks and registers the groups; afterwards the wrapper and the
        # wrapped optimizer share one list of groups and one state, so schedulers, state_dict and
        # the wrapped optimizer all see the same numbers.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._lars_masks: list[list[bool]] = []
        self._has_dtensors = False
        self._norm_reduction: sharding.NormReduction | None = None
        self._norm_weights: list[list[float]] = []

        self.options = LarsOptions(
            epsilon=epsilon,
            coefficient=coefficient,
            use_clip=use_clip,
            unit_trust_on_zero_norm=unit_trust_on_zero_norm,
            lr_inside_momentum=lr_inside_momentum,
        )
        self.skip_nonfinite = skip_nonfinite
        self.foreach = foreach
        self.carry_weight_norms = carry_weight_norms
        self.lars_filter = lars_filter  # decides the masks
        self.flat = flat
        # creates the fused step here, not in step(), so a torch.compile'd training step sees it
        self.fused = fused

    # -- options: checked when set; every mode reads them at its next step ---------------------

    def _refresh_after_filter_change(self) -> None:
        self._refresh_lars_masks()

    @property
    def options(self) -> LarsOptions:
        """LARS's options (``epsilon``, ``coefficient``, ``use_clip``, ``unit_trust_on_zero_norm``,
        ``lr_inside_momentum``), one frozen object; each is also an attribute of its own name."""
        return self._options

    @options.setter
    def options(self, value: LarsOptions) -> None:
        if not isinstance(value, LarsOptions):
            raise TypeError(f"options must be a lars_fx.LarsOptions, got {type(value).__name__}")
        previous = getattr(self, "_options", None)
        self._options = value
        try:
            self._check_inner_is_sgd()
        except ValueError:
            if previous is not None:
                self._options = previous
            raise

    def _check_inner_is_sgd(self) -> None:
        switches = {
            "fused": getattr(self, "_option_fused", False),
            "flat": getattr(self, "_option_flat", False),
            "lr_inside_momentum": self._options.lr_inside_momentum,
        }
        for name, on in switches.items():
            if on and not self._wraps_sgd:
                raise ValueError(
                    f"{name}=True needs torch.optim.SGD as the wrapped optimizer, got "
                    f"{type(self.optimizer).__name__}; use {name}=False"
                )

    def _fused_changed(self) -> None:
        self._check_inner_is_sgd()
        if not self.fused:
            self._fused_step = None
        elif self._fused_step is None:
            from .fused import FusedStep

            self._fused_step = FusedStep(self)

    def _flat_changed(self) -> None:
        self._check_inner_is_sgd()
        self._refresh_flat_layout()

    def _refresh_flat_layout(self) -> None:
        """Build the flat buffers anew (parameters, gradients, momentum buffers copied in), or drop them."""
        # The storages of this optimizer's buffers, whose views are parameters (not slices of a user's tensor)
        # after a rebuild, or after flat=False and flat=True again.
        if self._flat_layout is not None:
            self._own_storages = self._own_storages | self._flat_layout.storages()
        if not getattr(self, "_option_flat", False):
            self._flat_layout = None
            return
        from .flat_layout import FlatLayout

        self._flat_layout = FlatLayout(self.param_groups, self._lars_masks, self.state, self._own_storages)

    epsilon = _MathOption()
    coefficient = _MathOption()
    use_clip = _MathOption()
    unit_trust_on_zero_norm = _MathOption()
    lr_inside_momentum = _MathOption()
    skip_nonfinite = _Option(check_flag)
    foreach = _Option(check_flag)
    carry_weight_norms = _Option(check_flag)
    fused = _Option(check_flag, _fused_changed)
    flat = _Option(check_flag, _flat_changed)
    lars_filter = _Option(check_filter, _refresh_after_filter_change)

    # -- groups and filter decisions ---------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "optimizer"):  # called by Optimizer.__init__ for the shared groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._refresh_lars_masks()

    def _refresh_lars_masks(self) -> None:
        masks, lars_params, lars_names, places = [], [], [], []
        for group_index, group in enumerate(self.param_groups):
            check_sgd_group(group_index, group)
            mask = filter_decisions(group, group_index, self.lars_filter, "lars_filter")
            for index, param in enumerate(group["params"]):
                sharding.refuse_flat_parameters([param], [parameter_name(group, group_index, index)])
                if mask[index]:
                    lars_params.append(param)
                    lars_names.append(parameter_name(group, group_index, index))
                    places.append((group_index, index))
            masks.append(mask)
        self._lars_masks = masks
        self._refresh_norm_reduction(lars_params, lars_names, places)
        self._refresh_flat_layout()  # a new filter or new parameters: new buckets

    def _refresh_norm_reduction(
        self, lars_params: list[Tensor], names: list[str], places: list[tuple[int, int]]
    ) -> None:
        """Sharded (DTensor) parameters: how the step reduces their norms (``lars_fx.sharding``), decided
        here once, with each LARS parameter's weight by group and index (read by the step, compiled or
        not)."""
        self._has_dtensors = any(
            sharding.is_dtensor(p) for group in self.param_groups for p in group["params"]
        )
        self._norm_reduction = sharding.NormReduction.of(lars_params, names) if self._has_dtensors else None
        self._norm_weights = [[1.0] * len(group["params"]) for group in self.param_groups]
        if self._norm_reduction is not None:
            for (group_index, index), weight in zip(places, self._norm_reduction.weights, strict=True):
                self._norm_weights[group_index][index] = weight

    def _masks_match_groups(self) -> bool:
        """False when groups or parameters were added to the shared groups behind the wrapper's back."""
        return len(self._lars_masks) == len(self.param_groups) and all(
            len(mask) == len(group["params"])
            for mask, group in zip(self._lars_masks, self.param_groups, strict=True)
        )

    @property
    def flat_layout(self) -> FlatLayout | None:
        """With ``flat=True``, the flat buffers (``lars_fx.flat_layout.FlatLayout``: its ``buckets`` and the
        ``grad_copies`` it had to make); None otherwise."""
        return self._flat_layout

    @property
    def fused_step(self) -> FusedStep | None:
        """With ``fused=True``, the compiled step: its ``compile_count`` and ``fallback`` (the last diagnostic
        that sent a configuration to the eager step) tell what it did; None otherwise."""
        return self._fused_step

    def lars_mask(self, group_index: int) -> list[bool]:
        """Which parameters of ``param_groups[group_index]`` get LARS (the filter's decisions)."""
        return list(self._lars_masks[group_index])

    # -- state ------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults, state and groups; LARS needs its options and the
        # wrapped optimizer too. Hooks are dropped as torch.optim drops them; the fused step's compiled
        # graphs are not copied but made again on the first step of the copy.
        # The sharded norm reduction holds process groups, which do not copy: it is made again too.
        return {
            key: value
            for key, value in self.__dict__.items()
            if key not in ("_fused_step", "_norm_reduction", "_flat_layout")
            and not key.startswith("_optimizer_")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fused_step = None
        self._flat_layout = None
        # An unpickled flat optimizer's parameters share the storage of the original's buffers (pickle keeps
        # views as views): they were the original's segments, not slices of a user's tensor.
        self._own_storages = frozenset(
            p.untyped_storage().data_ptr() for group in self.param_groups for p in group["params"]
            if not p.is_meta and not sharding.is_dtensor(p)
        )
        self._refresh_lars_masks()
        self._fused_changed()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict rebuilt our groups and state; share them again.
        self.optimizer.__setstate__({"state": self.state, "param_groups": self.param_groups})
        self._refresh_lars_masks()

    def __repr__(self) -> str:
        options = ", ".join(f"{name}={getattr(self.options, name)}" for name in LarsOptions.names())
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"LARS({options},\n{inner}\n)"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; with ``flat=True`` the flat gradient buffers are zeroed in
        place and the parameters keep their views as gradients (``set_to_none`` applies to the others)."""
        layout = self._flat_layout
        if layout is None:
            super().zero_grad(set_to_none)
            return
        layout.zero_grad()
        in_layout = layout.param_ids()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in in_layout or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()

    # -- the step ---------------------------------------------------------------------------

    def _lars_options(self, group: dict[str, Any]) -> dict[str, Any]:
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() > 0:
            lr = lr.reshape(())  # torch.optim.SGD takes a one-element lr of any shape; the math wants 0-d
        return {
            "weight_decay": group.get("weight_decay", 0.0),
            "lr": lr,
            **self.options.trust_ratio_options(),
        }

    def _gather(self, group_index: int) -> GroupTensors:
        """The step's tensors of one group, gathered in one place for every mode (see ``GroupTensors``)."""
        group = self.param_groups[group_index]
        params, grads, mask, indices = group_gradients(
            group, group_index, self._lars_masks[group_index], "LARS"
        )
        if not self._has_dtensors:
            return GroupTensors(params, grads, mask, indices, params, grads)
        local_grads = [
            sharding.local_gradient(p, g, parameter_name(group, group_index, i))
            for p, g, i in zip(params, grads, indices, strict=True)
        ]
        return GroupTensors(params, grads, mask, indices, [sharding.local(p) for p in params], local_grads)

    def gather(self) -> list[GroupTensors]:
        """Per param group, the tensors the next step reads (the parameters that have gradients now, ...)."""
        return [self._gather(group_index) for group_index in range(len(self.param_groups))]

    def _sharded_norms(self, gathered: list[GroupTensors]) -> list[tuple[Tensor, Tensor] | None]:
        """``(||w||, ||g||)`` of every group's LARS tensors when they are sharded, one reduction for the whole
        step (``sharded_norms.reduce_step_norms``); None per group without."""
        if self._norm_reduction is None:
            return [None] * len(gathered)
        return reduce_step_norms(
            self._norm_reduction,
            [
                (
                    [w for w, use in zip(g.local_params, g.mask, strict=True) if use],
                    [x for x, use in zip(g.local_grads, g.mask, strict=True) if use],
                    [
                        self._norm_weights[group_index][i]
                        for i, use in zip(g.indices, g.mask, strict=True)
                        if use
                    ],
                )
                for group_index, g in enumerate(gathered)
            ],
        )

    def _all_finite(self) -> bool:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self._has_dtensors:
            grads = [sharding.local(g) for g in grads]
        if not grads:
            finite = torch.ones(())
        else:
            # The largest magnitude: finite exactly when every element is (a sum could overflow, e.g. in
            # fp16).
            largest = torch._foreach_norm(grads, math.inf)
            finite = torch.stack([s.float().to(largest[0].device) for s in largest]).isfinite().all().float()
        if self._norm_reduction is not None:  # every rank skips, or none: one more (tiny) all-reduce
            finite = self._norm_reduction.all_agree(finite)
        return bool(finite)

    # Not traced under torch.compile: its host sync breaks the graph anyway, and torch 2.11's Dynamo cannot
    # set the count in the code it resumes with after that break (AssertionError: "Attempted setattr on a
    # user-defined object that does not have an AttributeMutation mutation_type").
    @torch.compiler.disable
    def _skips_this_step(self) -> bool:
        """With ``skip_nonfinite``: whether a gradient has an inf or NaN (the step is then counted as
        skipped)."""
        if self._all_finite():
            return False
        self.skipped_steps += 1
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._masks_match_groups():
            self._refresh_lars_masks()  # groups or parameters added to the shared groups directly
        else:
            for group_index, group in enumerate(self.param_groups):
                check_sgd_group(group_index, group)
        if self.skip_nonfinite and self._skips_this_step():
            return loss
        if self._flat_layout is not None:
            self._flat_step()
            return loss
        gathered = self.gather()
        if self._fused_step is not None:
            self._fused_step(gathered, self._eager_sgd_step)
        elif self._wraps_sgd:
            self._eager_sgd_step(gathered)
        else:
            norms = self._sharded_norms(gathered)
            scaled = [self._lars_gradients(i, g, norms[i]) for i, g in enumerate(gathered)]
            gradients = [(g.params, s) for g, s in zip(gathered, scaled, strict=True)]
            step_with_gradients(self.optimizer, gradients, self._has_dtensors)
        return loss

    # Not traced under torch.compile (a compiled training step around the optimizer runs it as it is): its
    # bookkeeping reads data pointers and tensor identities; fused=True is the compiled flat step.
    @torch.compiler.disable
    def _flat_step(self) -> None:
        layout = self._flat_layout
        assert layout is not None
        if layout.moved():  # parameter data re-pointed since the layout was built (model.to(...), ...)
            self._refresh_flat_layout()
            layout = self._flat_layout
            assert layout is not None
        flat = layout.gather(self.param_groups, self.state)
        layout.notice_writes(flat)
        if flat.per_tensor or flat.outside_grads:
            whole = {id(p) for bucket, _ in flat.buckets for p in bucket.params}
            rest = [self._without(g, whole) for g in self.gather()]
        else:
            rest = []
        if self._fused_step is not None:
            self._fused_step.flat(flat, rest, self._eager_flat_step)
        else:
            self._eager_flat_step(flat, rest)
        layout.stepped(flat)

    @staticmethod
    def _without(tensors: GroupTensors, ids: set[int]) -> GroupTensors:
        """``tensors`` less the parameters whose ids are in ``ids`` (those stepped whole by the flat step)."""
        keep = [k for k, p in enumerate(tensors.params) if id(p) not in ids]
        return GroupTensors(
            [tensors.params[k] for k in keep],
            [tensors.grads[k] for k in keep],
            [tensors.mask[k] for k in keep],
            [tensors.indices[k] for k in keep],
            [tensors.local_params[k] for k in keep],
            [tensors.local_grads[k] for k in keep],
        )

    def _eager_flat_step(self, flat: FlatGather, rest: list[GroupTensors]) -> None:
        """The eager ``flat=True`` step: each whole bucket in a few whole-buffer operations
        (``functional.flat.lars_sgd_flat``), then the parameters that step per tensor."""
        layout = self._flat_layout
        assert layout is not None
        parts: dict[int, tuple[list[int], F.NormCollector]] = {}
        for bucket, momentum_state in flat.buckets:
            group = self.param_groups[bucket.group_index]
            norms = None
            if bucket.use_lars:
                norms = (F.segment_norms(bucket.weight_views), F.segment_norms(bucket.grad_views))
            new_buffer, result = F.lars_sgd_flat(
                bucket.weights, bucket.grads, bucket.momentum if momentum_state == "flat" else None,
                bucket.segments, norms=norms, **self._sgd_options(group),
            )
            if momentum_state == "new" and new_buffer is not None:
                layout.keep_new_momentum(bucket, new_buffer, self.state)
            if self.telemetry is not None and result is not None:
                _add_telemetry_part(parts, bucket.group_index, bucket.indices, result)
        self._telemetry_parts = parts  # the per-tensor steps' norms join their group's record
        try:
            for group_index, tensors in enumerate(rest):
                if tensors.params:
                    self._sgd_group_step(group_index, tensors, None)
        finally:
            self._telemetry_parts = None
        if self.telemetry is not None:
            for group_index, (indices, collector) in parts.items():
                params = self.param_groups[group_index]["params"]
                lars_params = [params[i] for i in sorted(indices)]
                self.telemetry.record(self, group_index, lars_params, *collector.result())

    def _eager_sgd_step(self, gathered: list[GroupTensors]) -> None:
        """The eager LARS-over-SGD step of every group (sharded norms reduced once for all of them)."""
        norms = self._sharded_norms(gathered)
        for group_index, group_tensors in enumerate(gathered):
            if group_tensors.params:
                self._sgd_group_step(group_index, group_tensors, norms[group_index])

    def _record_telemetry(self, group_index: int, tensors: GroupTensors, norms: F.LarsNorms) -> None:
        if self.telemetry is None:
            return
        if self._telemetry_parts is not None:  # part of a flat step: recorded with the group's other parts
            indices = [i for i, use_lars in zip(tensors.indices, tensors.mask, strict=True) if use_lars]
            _add_telemetry_part(self._telemetry_parts, group_index, indices, norms)
            return
        lars_params = [p for p, use_lars in zip(tensors.params, tensors.mask, strict=True) if use_lars]
        self.telemetry.record(self, group_index, lars_params, *norms)

    def _reference_norms(
        self, group_index: int, tensors: GroupTensors, given: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor] | None:
        """With telemetry, the per-tensor reference's norms computed once (recorded, and handed to the
        reference so it does not compute them again); ``given`` (sharded) norms otherwise."""
        if self.telemetry is None:
            return given
        options = self._lars_options(self.param_groups[group_index])
        norms = lars_norms(tensors.local_params, tensors.local_grads, tensors.mask, norms=given, **options)
        self._record_telemetry(group_index, tensors, norms)
        return norms.w_norm, norms.g_norm

    def _lars_gradients(
        self, group_index: int, tensors: GroupTensors, norms: tuple[Tensor, Tensor] | None
    ) -> list[Tensor]:
        """The LARS-scaled gradients of a group (computed on the ``local`` pieces, with the sharded
        ``norms``), for an optimizer other than SGD."""
        group = self.param_groups[group_index]
        options = self._lars_options(group)
        maximize = group.get("maximize", False)
        if self.foreach:
            result = F.lars_gradients_foreach(
                tensors.local_params,
                tensors.local_grads,
                tensors.mask,
                maximize=maximize,
                norms=norms,
                **options,
            )
            self._record_telemetry(group_index, tensors, result.norms)
            return result.updates
        norms = self._reference_norms(group_index, tensors, norms)
        given = iter(zip(*norms, strict=True)) if norms is not None else None
        return [
            F.lars_gradient(
                p, g, maximize=maximize, norms=next(given) if given is not None else None, **options
            )
            if use_lars
            else (-g if maximize else g)
            for p, g, use_lars in zip(tensors.local_params, tensors.local_grads, tensors.mask, strict=True)
        ]

    def _sgd_options(self, group: dict[str, Any]) -> dict[str, Any]:
        return {
            **self._lars_options(group),
            "momentum": group["momentum"],
            "dampening": group["dampening"],
            "nesterov": group["nesterov"],
            "maximize": group["maximize"],
            "lr_inside_momentum": self.lr_inside_momentum,
        }

    def _sgd_group_step(
        self, group_index: int, tensors: GroupTensors, norms: tuple[Tensor, Tensor] | None
    ) -> None:
        """One group's LARS-over-SGD step (``norms``: the sharded norms, reduced once for all groups)."""
        group = self.param_groups[group_index]
        params = tensors.params
        momentum = group["momentum"]
        if momentum != 0:
            buffers = [self.state[p].get("momentum_buffer") for p in params]
        else:
            buffers = [None] * len(params)
        if self._has_dtensors:
            local_buffers = [None if b is None else sharding.local(b) for b in buffers]
        else:
            local_buffers = buffers
        options = self._sgd_options(group)
        local_params, local_grads, mask = tensors.local_params, tensors.local_grads, tensors.mask
        if self.foreach:
            new_buffers = list(local_buffers)
            result = F.lars_sgd_foreach(local_params, local_grads, new_buffers, mask, norms=norms, **options)
            self._record_telemetry(group_index, tensors, result)
        else:
            norms = self._reference_norms(group_index, tensors, norms)
            new_buffers = F.lars_sgd_reference(
                local_params, local_grads, local_buffers, mask, norms=norms, **options
            )
        if momentum != 0 and not self._has_dtensors:
            for p, buf in zip(params, new_buffers, strict=True):
                self.state[p]["momentum_buffer"] = buf
        elif momentum != 0:  # DTensor buffers keep their identity (checkpoints hold them): write their pieces
            for p, local_previous, buf in zip(params, local_buffers, new_buffers, strict=True):
                assert buf is not None  # with momentum, the step made every buffer
                if local_previous is None:
                    self.state[p]["momentum_buffer"] = sharding.wrap_like(p, buf)
                elif buf is not local_previous:
                    local_previous.copy_(buf)


def _add_telemetry_part(
    parts: dict[int, tuple[list[int], F.NormCollector]],
    group_index: int,
    indices: list[int],
    norms: F.LarsNorms,
) -> None:
    """One part of a group's telemetry: the norms of its LARS parameters at ``indices`` in the group."""
    positions, collector = parts.setdefault(group_index, ([], F.NormCollector()))
    positions += indices
    collector.add(indices, *norms)
