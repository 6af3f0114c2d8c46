"""The towers' building blocks: an MLP, a first layer read from its input's parts, FLOP counts."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def mlp(dims: list[int], final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if final_activation or i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def linear_of_parts(
    parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(cat(parts, -1), weight, bias)`` without the cat: each part times its block of the
    weight's columns, summed. A cat copies every row's whole input; on a scoring pass that copy
    cost as much as the layer's matmul (``bench/bench_serving.py``)."""
    out = F.linear(parts[0], weight[:, : parts[0].shape[-1]], bias)
    start = parts[0].shape[-1]
    for part in parts[1:]:
        width = part.shape[-1]
        out = out + F.linear(part, weight[:, start : start + width])
        start += width
    return out


def linear_flops(module: nn.Module) -> int:
    """2 * in * out per Linear (multiply-adds counted as 2 FLOPs)."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
