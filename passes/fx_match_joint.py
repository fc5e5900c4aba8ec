"""Match a joint forward-backward graph's gradients: the start of a training program's LARS step.

Pattern: a graph whose placeholders are the model's parameters (and buffers, constants) then its inputs, and
whose outputs are the loss then gradients, as ``torch.export.experimental._export_forward_backward`` makes it
(``lars_fx.executorch`` captures it so). The request (``JointStepRequest``) names each trained parameter's
placeholder, its gradient's output index and its ``JointParam``.
Rewrite: one new 0-d placeholder ``lr`` (the request's ``lr_input``) after the others; per param group whose
lr is a multiple of it, ``lr * lr_scale``; ``neg(grad)`` for a ``maximize`` group. Records a ``JointUpdate``
on each trained parameter's placeholder, for ``insert_lars_norms`` and ``insert_trust_ratio`` (the same
passes as ``LARS_SGD``'s) and ``append_momentum_step``.
Preconditions (``requires``): the request is a ``JointStepRequest`` whose placeholders and gradient outputs
exist; the placeholders carry ``meta["val"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .fx_spec import UPDATE, JointStepRequest, JointUpdate, PatternMismatch, request_of

__all__ = ["MatchJointGradients", "joint_request_of", "output_node"]


def joint_request_of(gm: torch.fx.GraphModule, pass_name: str) -> JointStepRequest:
    request = request_of(gm, pass_name)
    if not isinstance(request, JointStepRequest):
        raise PatternMismatch(
            None, "joint step request", f"{pass_name} needs a JointStepRequest, got {type(request).__name__}"
        )
    return request


def output_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


class MatchJointGradients(PassBase):
    name = "match_joint_gradients"

    def requires(self, gm: torch.fx.GraphModule) -> None:
        request = joint_request_of(gm, self.name)
        placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        outputs = output_node(gm).args[0]
        if not isinstance(outputs, (tuple, list)):
            raise PatternMismatch(
                output_node(gm), "joint graph", "outputs are not a tuple (loss, gradients...)"
            )
        if request.lr_input in placeholders:
            raise PatternMismatch(
                placeholders[request.lr_input], "joint graph",
                f"a placeholder is already named {request.lr_input!r}",
            )
        for name, index in request.gradients.items():
            if name not in placeholders or name not in request.params or name not in request.steps:
                raise PatternMismatch(
                    None, "joint graph", f"the request's parameter {name!r} is not a placeholder"
                )
            if not 0 < index < len(outputs) or not isinstance(outputs[index], torch.fx.Node):
                raise PatternMismatch(None, "joint graph", f"{name!r}'s gradient is not output {index}")
            if not isinstance(placeholders[name].meta.get("val"), torch.Tensor):
                raise PatternMismatch(placeholders[name], "joint graph", "placeholder has no meta['val']")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        request = joint_request_of(gm, self.name)
        graph = gm.graph
        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        outputs = cast(Sequence[torch.fx.Node], output_node(gm).args[0])
        with graph.inserting_after(list(placeholders.values())[-1]):
            lr = graph.placeholder(request.lr_input)
        lr.meta["val"] = torch.empty((), dtype=torch.float32, device="meta")
        scaled_lrs: dict[float, torch.fx.Node] = {}
        for name, index in request.gradients.items():
            param, step = placeholders[name], request.steps[name]
            grad = outputs[index]
            with graph.inserting_before(output_node(gm)):
                if step.lr_scale != 1.0 and step.lr_scale not in scaled_lrs:
                    scaled_lrs[step.lr_scale] = graph.call_function(torch.mul, (lr, step.lr_scale))
                if step.maximize:
                    grad = graph.call_function(torch.neg, (grad,))
            param.meta[UPDATE] = JointUpdate(
                role=request.params[name],
                param=param,
                grad=grad,
                weight_decay=step.weight_decay,
                lr=scaled_lrs.get(step.lr_scale, lr),
                step=step,
            )
        gm.recompile()
        return PassResult(gm, True)
