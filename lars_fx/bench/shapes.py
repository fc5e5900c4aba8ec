"""Parameter shapes of real models, named as torch names them (so LARS's default filter applies)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple


class ParamShape(NamedTuple):
    name: str
    shape: tuple[int, ...]


def resnet50_shapes() -> list[ParamShape]:
    """torchvision's ResNet-50: 161 tensors, 25,557,032 parameters."""
    shapes = [ParamShape("conv1.weight", (64, 3, 7, 7)), *_norm("bn1", 64)]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            width = planes * 4
            shapes += [
                ParamShape(f"{prefix}.conv1.weight", (planes, inplanes, 1, 1)),
                *_norm(f"{prefix}.bn1", planes),
                ParamShape(f"{prefix}.conv2.weight", (planes, planes, 3, 3)),
                *_norm(f"{prefix}.bn2", planes),
                ParamShape(f"{prefix}.conv3.weight", (width, planes, 1, 1)),
                *_norm(f"{prefix}.bn3", width),
            ]
            if block == 0:
                shapes += [
                    ParamShape(f"{prefix}.downsample.0.weight", (width, inplanes, 1, 1)),
                    *_norm(f"{prefix}.downsample.1", width),
                ]
            inplanes = width
    shapes += _linear("fc", 2048, 1000)
    return shapes


def vit_l16_shapes() -> list[ParamShape]:
    """ViT-L/16 at 224 px with a 1000-class head, timm's names: 296 tensors, 304,326,632 parameters."""
    dim, hidden, depth, tokens = 1024, 4096, 24, 197
    shapes = [
        ParamShape("cls_token", (1, 1, dim)),
        ParamShape("pos_embed", (1, tokens, dim)),
        ParamShape("patch_embed.proj.weight", (dim, 3, 16, 16)),
        ParamShape("patch_embed.proj.bias", (dim,)),
    ]
    for block in range(depth):
        prefix = f"blocks.{block}"
        shapes += [
            *_norm(f"{prefix}.norm1", dim),
            *_linear(f"{prefix}.attn.qkv", dim, 3 * dim),
            *_linear(f"{prefix}.attn.proj", dim, dim),
            *_norm(f"{prefix}.norm2", dim),
            *_linear(f"{prefix}.mlp.fc1", dim, hidden),
            *_linear(f"{prefix}.mlp.fc2", hidden, dim),
        ]
    shapes += [*_norm("norm", dim), *_linear("head", dim, 1000)]
    return shapes


def _norm(prefix: str, channels: int) -> list[ParamShape]:
    return [ParamShape(f"{prefix}.weight", (channels,)), ParamShape(f"{prefix}.bias", (channels,))]


def _linear(prefix: str, fan_in: int, fan_out: int) -> list[ParamShape]:
    return [ParamShape(f"{prefix}.weight", (fan_out, fan_in)), ParamShape(f"{prefix}.bias", (fan_out,))]


def small_shapes(count: int, numel: int = 64) -> list[ParamShape]:
    """``count`` tensors of ``numel`` elements, weights and biases in turn (``layer3.weight``,
    ``layer3.bias``): the many-small-tensors case, where per-tensor costs (compile, host time, kernels)
    dominate."""
    return [
        ParamShape(f"layer{i // 2}.{'weight' if i % 2 == 0 else 'bias'}", (numel,)) for i in range(count)
    ]


def shrunk(shapes: list[ParamShape], numel: int) -> list[ParamShape]:
    """The same names, each tensor cut to at most ``numel`` elements (1-d): a step that costs host time
    only."""
    return [ParamShape(name, (min(numel, math.prod(shape)),)) for name, shape in shapes]


def reduced(shapes: list[ParamShape], count: int = 8, numel: int = 64) -> list[ParamShape]:
    """The first ``count`` tensors, cut to ``numel`` elements: a run of the benchmark's machinery in seconds,
    not a figure."""
    return shrunk(shapes[:count], numel)


MODELS: dict[str, Callable[[], list[ParamShape]]] = {
    "resnet50": resnet50_shapes,
    "vitl": vit_l16_shapes,
    "resnet50_tiny": lambda: shrunk(resnet50_shapes(), 4),  # ResNet-50's 161 tensors, 4 elements each
    "small_1000": lambda: small_shapes(1_000),
    "small_10000": lambda: small_shapes(10_000),
}
