"""Norm after write-back: an Inductor post-grad pass that lets a weight's new squared norm be
computed in the loop that writes the weight.

AOT autograd hands Inductor a functional graph whose input writes are ``copy_(w, w')`` at its end.
``carry_weight_norms`` makes ``w'`` feed both that ``copy_`` and ``sum(square(w'))``; Inductor then
materialises ``w'`` in a temporary buffer and copies it into ``w`` in a second loop (two extra
streams). Reading the written ``w`` instead turns it into ``copy_`` followed by a reduction over the
same elements, which Inductor fuses into one loop (the store is reused from registers).

Pattern (post-grad ATen)::

    copy_(w, w')    with w a graph input of w's dtype and shape
    [convert_element_type](w') -> mul(x, x) | pow(x, 2) -> [where(mask, x, 0)] -> sum(x[, dims])

(a squared norm of ``w'``: of the whole tensor, or per segment of a flat buffer, ``segment_squared_norms``'s
masked sum over each chunk's data). Rewrite: the chain's first node reads ``copy_(w, w')`` (the written
``w``) instead of ``w'``; the graph is re-sorted topologically. Nothing else changes; no other graph is
touched.
Preconditions: none (installed by ``fx_pipeline.compile_with_inductor``, which chains it after any
``post_grad_custom_post_pass`` already configured).
"""

from __future__ import annotations

import torch
import torch.fx

from lars_fx._compat import CustomGraphPass, hash_of_files, stable_topological_sort

__all__ = ["NormAfterWriteBack"]

aten = torch.ops.aten
prims = torch.ops.prims


def _is(node: object, *targets: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _squares(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    if _is(node, aten.mul.Tensor):
        return node.args[0] is source and node.args[1] is source
    if not _is(node, aten.pow.Tensor_Scalar):
        return False
    exponent = node.args[1]
    return node.args[0] is source and isinstance(exponent, (int, float)) and exponent == 2


def _is_squared_norm(first: torch.fx.Node, value: torch.fx.Node) -> bool:
    """``first`` (a user of ``value``) starts ``[convert](value) -> square -> [where] -> sum`` with no other
    users."""
    square = first
    if _is(first, prims.convert_element_type.default):
        if len(first.users) != 1:
            return False
        square, value = next(iter(first.users)), first
    if not _squares(square, value) or len(square.users) != 1:
        return False
    total = next(iter(square.users))
    if _is(total, aten.where.self) and total.args[1] is square:  # padding of a flat buffer masked out
        if len(total.users) != 1:
            return False
        total = next(iter(total.users))
    return _is(total, aten.sum.default, aten.sum.dim_IntList)


def _same_layout(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    return va.dtype == vb.dtype and va.shape == vb.shape


class NormAfterWriteBack(CustomGraphPass):
    name = "norm_after_write_back"

    def __call__(self, graph: torch.fx.Graph) -> None:
        changed = False
        for write in [n for n in graph.nodes if _is(n, aten.copy_.default)]:
            target, value = write.args[0], write.args[1]
            if not isinstance(value, torch.fx.Node) or target.op != "placeholder":
                continue
            if not _same_layout(target, value):
                continue
            for user in list(value.users):
                if user is not write and _is_squared_norm(user, value):
                    user.replace_input_with(value, write)
                    changed = True
        if changed:
            stable_topological_sort(graph)
            graph.lint()

    def uuid(self) -> bytes:
        return hash_of_files((__file__,))
