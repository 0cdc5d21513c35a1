"""Shape adapters: map a student feature into the shape of a teacher feature.

Shapes are per sample (no batch dimension) and fall in three kinds:

* vector ``(D,)``            — logits, pooled features, MLP activations;
* map ``(C, H, W)``          — convolutional feature maps;
* tokens ``(T, D)``          — transformer token sequences.

:func:`make_adapter` returns a module for every pair it can bridge: a linear layer for
vectors and tokens, a 1×1 convolution plus bilinear resize for maps, and a reshape between
maps and square token grids (an extra class token is dropped). Any other pair raises
:class:`~flowdistill.errors.ShapeMismatchError` naming both shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ShapeMismatchError

__all__ = ["Adapter", "ChannelNorm", "feature_kind", "make_adapter"]

Shape = tuple[int, ...]


def feature_kind(shape: Shape) -> str:
    """``"vector"``, ``"map"`` or ``"tokens"`` for a per-sample shape."""
    if len(shape) == 1:
        return "vector"
    if len(shape) == 2:
        return "tokens"
    if len(shape) == 3:
        return "map"
    raise ShapeMismatchError(f"feature shape {shape} is not a vector, token sequence or map")


def _grid(tokens: int) -> tuple[int, int, int] | None:
    """``(drop, h, w)``: tokens form a square grid after dropping ``drop`` leading tokens."""
    for drop in (0, 1):
        side = math.isqrt(tokens - drop)
        if side > 0 and side * side == tokens - drop:
            return drop, side, side
    return None


class Adapter(nn.Module):
    """Maps features of per-sample shape ``src`` to ``dst``; see :func:`make_adapter`."""

    def __init__(self, src: Shape, dst: Shape, init: str = "default") -> None:
        super().__init__()
        self.src, self.dst = tuple(src), tuple(dst)
        ks, kd = feature_kind(self.src), feature_kind(self.dst)
        self.plan = f"{ks}->{kd}"
        self.proj: nn.Module
        if ks == "vector" and kd == "vector":
            self.proj = nn.Linear(self.src[0], self.dst[0])
        elif ks == "tokens" and kd == "tokens":
            self.proj = nn.Linear(self.src[1], self.dst[1])
        elif ks == "map" and kd == "map":
            self.proj = nn.Conv2d(self.src[0], self.dst[0], kernel_size=1)
        elif ks == "map" and kd == "tokens":
            grid = _grid(self.dst[0])
            if grid is None:
                raise ShapeMismatchError(
                    f"cannot map a feature map {self.src} to {self.dst[0]} tokens: "
                    "the token count is not a square grid (with or without a class token)"
                )
            self.proj = nn.Conv2d(self.src[0], self.dst[1], kernel_size=1)
        elif ks == "tokens" and kd == "map":
            if _grid(self.src[0]) is None:
                raise ShapeMismatchError(
                    f"cannot map {self.src[0]} tokens {self.src} to a feature map {self.dst}: "
                    "the token count is not a square grid (with or without a class token)"
                )
            self.proj = nn.Conv2d(self.src[1], self.dst[0], kernel_size=1)
        else:
            raise ShapeMismatchError(
                f"no adapter maps a {ks} feature of shape {self.src} to a {kd} feature of "
                f"shape {self.dst}; tap features of matching kinds (vector↔vector, "
                "map/tokens↔map/tokens)"
            )
        if init == "orthogonal":
            weight = self.proj.weight
            nn.init.orthogonal_(weight.view(weight.shape[0], -1))
            nn.init.zeros_(self.proj.bias)

    @staticmethod
    def _to_map(x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` tokens to a ``(B, D, h, w)`` map, dropping a class token."""
        drop, h, w = _grid(x.shape[1])
        return x[:, drop:].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.src:
            raise ShapeMismatchError(f"adapter expects shape {self.src}, got {tuple(x.shape[1:])}")
        if self.plan in ("vector->vector", "tokens->tokens"):
            y = self.proj(x)
            if self.plan == "tokens->tokens" and y.shape[1] != self.dst[0]:
                y = F.interpolate(y.transpose(1, 2), size=self.dst[0], mode="linear")
                y = y.transpose(1, 2)
            return y
        if self.plan == "tokens->map":
            x = self._to_map(x)
        y = self.proj(x)  # (B, C', h, w)
        if self.plan == "map->tokens":
            drop, h, w = _grid(self.dst[0])
            if y.shape[-2:] != (h, w):
                y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
            y = y.flatten(2).transpose(1, 2)  # (B, h*w, D)
            if drop:
                y = torch.cat([y.mean(dim=1, keepdim=True), y], dim=1)
            return y
        if y.shape[-2:] != self.dst[1:]:
            y = F.interpolate(y, size=self.dst[1:], mode="bilinear", align_corners=False)
        return y


def make_adapter(src: Shape, dst: Shape, init: str = "default") -> nn.Module:
    """A module mapping per-sample shape ``src`` to ``dst`` (identity when equal).

    >>> make_adapter((16, 8, 8), (32, 4, 4))(torch.zeros(2, 16, 8, 8)).shape
    torch.Size([2, 32, 4, 4])
    """
    if tuple(src) == tuple(dst):
        return nn.Identity()
    return Adapter(src, dst, init=init)


class ChannelNorm(nn.Module):
    """Batch normalisation over the channels of a feature of per-sample ``shape`` (any kind:
    ``BatchNorm2d`` for maps, ``BatchNorm1d`` over the last axis for vectors and tokens).

    For token sequences ``forward(x, mask)`` with a padding ``mask`` ``(B, T)`` takes the
    batch statistics in training (and the running statistics they update, unbiased as
    BatchNorm keeps them) over the positions ``mask`` keeps only, in tensor operations alone
    (no value is read back from the device); without a mask, or in evaluation, it is the
    plain BatchNorm."""

    def __init__(self, shape: Shape, affine: bool = True, momentum: float = 0.1) -> None:
        super().__init__()
        kind = feature_kind(shape)
        self.tokens = kind == "tokens"
        channels = shape[0] if kind == "map" else shape[-1]
        norm = nn.BatchNorm2d if kind == "map" else nn.BatchNorm1d
        self.norm = norm(channels, affine=affine, momentum=momentum)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.tokens and mask is not None and self.training:
            return self._masked(x, mask)
        if self.tokens:
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x)

    def _masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        w = mask.to(x.dtype)[..., None]  # (B, T, 1)
        count = w.sum()
        mean = (x * w).sum(dim=(0, 1)) / count.clamp_min(1.0)
        var = ((x - mean).pow(2) * w).sum(dim=(0, 1)) / count.clamp_min(1.0)
        if norm.track_running_stats:
            with torch.no_grad():
                unbiased = var * count / (count - 1.0).clamp_min(1.0)
                m = norm.momentum
                norm.running_mean.mul_(1 - m).add_(m * mean.to(norm.running_mean.dtype))
                norm.running_var.mul_(1 - m).add_(m * unbiased.to(norm.running_var.dtype))
                norm.num_batches_tracked.add_(1)
        y = (x - mean) / torch.sqrt(var + norm.eps)
        if norm.affine:
            y = y * norm.weight + norm.bias
        return y
