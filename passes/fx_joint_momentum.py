"""Momentum: append momentum SGD to a joint forward-backward graph, which then returns the stepped state.

Pattern: the ``JointUpdate``s ``match_joint_gradients`` recorded, with each trust-ratio parameter's
``coefficient`` (``insert_trust_ratio``).
Rewrite: per trained parameter, in placeholder order, the update ``u = coeff * (g + weight_decay * w)``
(``lars_fx.functional.scaled_gradient``; the plain gradient for a parameter without the trust ratio) and
``momentum_step(w, u, buf, lr, momentum, dampening, nesterov, lr_inside_momentum)``
(``lars_fx.functional``), with a new placeholder for the momentum buffer of each parameter whose group has
momentum (``momentum_buffer_<param>``, after the lr). The outputs become ``(loss, new parameters...,
new momentum buffers...)``, in the order of the parameters; the gradients are no longer outputs, and what
only they needed is removed.
A buffer input stands for torch's ``momentum_buffer``; where torch has none yet (its first step sets
``buf = u``), the caller feeds zeros, which is the same step only with ``dampening == 0`` (the entry point
checks it).
Preconditions (``requires``): ``match_joint_gradients`` and ``insert_trust_ratio`` ran.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import cast

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from lars_fx.functional import momentum_step, scaled_gradient

from .fx_match_joint import joint_request_of, output_node
from .fx_spec import JointUpdate, PatternMismatch, require_on_updates, updates_of

__all__ = ["AppendMomentumStep"]


class AppendMomentumStep(PassBase):
    name = "append_momentum_step"

    def requires(self, gm: torch.fx.GraphModule) -> None:
        request = joint_request_of(gm, self.name)
        updates = updates_of(gm)
        if len(updates) != len(request.gradients) or not all(isinstance(u, JointUpdate) for u in updates):
            raise PatternMismatch(None, "joint step", f"match_joint_gradients must run before {self.name}")
        require_on_updates(gm, self.name, "insert_trust_ratio", lambda u: u.coefficient is not None)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        request = joint_request_of(gm, self.name)
        graph = gm.graph
        updates = [u for u in updates_of(gm) if isinstance(u, JointUpdate)]
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        for update in updates:
            if update.step.momentum != 0:
                with graph.inserting_after(last_input):
                    buffer = graph.placeholder(f"momentum_buffer_{update.param.name}")
                last_input = update.momentum_buffer = buffer
                update.momentum_buffer.meta["val"] = update.param.meta["val"]
        output = output_node(gm)
        (loss, *_) = cast(Sequence[torch.fx.Node], output.args[0])
        new_params, new_buffers = [], []
        with graph.inserting_before(output):
            for update in updates:
                u = update.grad
                if update.role.use_lars:
                    u = graph.call_function(
                        scaled_gradient, (update.param, update.grad, update.coefficient, update.weight_decay)
                    )
                stepped = graph.call_function(
                    momentum_step,
                    (update.param, u, update.momentum_buffer),
                    {
                        "lr": update.lr,
                        "momentum": update.step.momentum,
                        "dampening": update.step.dampening,
                        "nesterov": update.step.nesterov,
                        "lr_inside_momentum": request.options.lr_inside_momentum,
                    },
                )
                new_params.append(graph.call_function(operator.getitem, (stepped, 0)))
                if update.momentum_buffer is not None:
                    new_buffers.append(graph.call_function(operator.getitem, (stepped, 1)))
        output.args = ((loss, *new_params, *new_buffers),)
        graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, True)
