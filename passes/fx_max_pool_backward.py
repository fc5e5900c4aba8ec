"""Max-pool backward as a scatter-add: a joint graph's ``max_pool2d_with_indices_backward`` rewritten so that
ExecuTorch computes it right.

ExecuTorch 1.5.1's portable kernel ``max_pool2d_with_indices_backward.grad_input`` adds into its output
without clearing it first; its output memory is planned, so a training program's second step gets twice the
gradient, its third three times (seen in ``tests/test_executorch.py``), silently.
Pattern: ``aten.max_pool2d_with_indices_backward.default(grad, x, kernel, stride, padding, dilation,
ceil_mode, indices)``, whose ``indices`` index each (batch, channel) plane of ``x`` flattened.
Rewrite: ``zeros_like(x).flatten(-2).scatter_add(-1, indices.flatten(-2), grad.flatten(-2)).view_as(x)``,
torch's own definition of that gradient (windows that overlap add, as the kernel does), from ops ExecuTorch's
kernels compute afresh each call. The indices address each plane of ``x`` (its last two dimensions), for 3-d
and 4-d inputs alike.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["ScatterMaxPoolBackward", "max_pool2d_backward_by_scatter"]

_BACKWARD = torch.ops.aten.max_pool2d_with_indices_backward.default


def max_pool2d_backward_by_scatter(grad: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    """The gradient of ``max_pool2d`` with respect to its input ``x``, from its ``indices``."""
    planes = torch.zeros_like(x).flatten(-2)
    return planes.scatter_add(-1, indices.flatten(-2), grad.flatten(-2)).view_as(x)


class ScatterMaxPoolBackward(PassBase):
    name = "scatter_max_pool_backward"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        found = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _BACKWARD]
        for node in found:
            grad, x, *_, indices = node.args
            with gm.graph.inserting_before(node):
                replacement = gm.graph.call_function(max_pool2d_backward_by_scatter, (grad, x, indices))
            replacement.meta.update(node.meta)
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
        gm.recompile()
        return PassResult(gm, bool(found))
