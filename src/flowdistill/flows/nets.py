r"""Velocity networks :math:`v_\theta(x, t, c)` with one calling convention.

Every network here is called as ``net(x, t, context=None)``:

* ``x``: the state -- ``(B, dim)`` for :class:`MLPVelocity`, ``(B, C, H, W)`` for
  :class:`ConvVelocity`, ``(B, T, dim)`` for :class:`TokenVelocity`;
* ``t``: a python float, a 0-d tensor or a ``(B,)`` tensor of times in ``[0, 1]``;
* ``context``: optional conditioning vector ``(B, cond_dim)`` (one-hot class, teacher
  logits, a task-id embedding, ...); required iff the net was built with ``cond_dim``.

The output has the shape of ``x``.  Time and context are embedded into one vector
:math:`e = \mathrm{MLP}(\mathrm{sinusoid}(t)) + \mathrm{MLP}(c)` that modulates every block
through FiLM / adaptive normalisation,
:math:`h \mapsto \mathrm{Norm}(h) \odot (1 + \gamma(e)) + \beta(e)`.
The final layer of every network is zero-initialised, so a freshly built network returns
exactly zero and the flow it generates is the identity map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import TimeLike, as_batch_time

__all__ = [
    "ConditionEmbedding",
    "ConvVelocity",
    "FiLM",
    "MLPVelocity",
    "TimeEmbedding",
    "TokenVelocity",
]


class TimeEmbedding(nn.Module):
    r"""Sinusoidal embedding of a scalar time.

    For ``dim = 2k`` and frequencies :math:`\omega_j = P^{-j/k}` (:math:`j = 0..k-1`,
    :math:`P` = ``max_period``),

    .. math::

        \mathrm{emb}(t) = [\cos(s t \omega_0), \dots, \cos(s t \omega_{k-1}),
                           \sin(s t \omega_0), \dots, \sin(s t \omega_{k-1})],

    where :math:`s` = ``scale`` stretches ``t in [0, 1]`` over the frequency range.
    An odd ``dim`` is padded with one zero.

    Args:
        dim: embedding size.
        scale: multiplier applied to ``t`` before the sinusoids.
        max_period: :math:`P`, the ratio of the highest to the lowest frequency.

    The defaults give angular frequencies from 1 to 30 on ``t in [0, 1]``: enough to tell
    apart the times of a few-step solve, smooth enough that an adaptive solver is not forced
    into tiny steps (diffusion-style ``scale=1000`` makes a randomly initialised field
    oscillate in ``t`` and ``dopri5`` take thousands of steps).

    Shapes: ``t`` scalar / 0-d -> ``(1, dim)``; ``(B,)`` -> ``(B, dim)``.
    """

    def __init__(self, dim: int, scale: float = 30.0, max_period: float = 30.0) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError("TimeEmbedding needs dim >= 2")
        self.dim = dim
        self.scale = float(scale)
        self.max_period = float(max_period)

    def forward(self, t: TimeLike) -> Tensor:
        if not isinstance(t, Tensor):
            t = torch.tensor(float(t), dtype=torch.get_default_dtype())
        if t.ndim > 1:
            raise ValueError(f"t must be a scalar or have shape (B,), got {tuple(t.shape)}")
        t = t.reshape(-1)
        out_dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        # compute in at least float32: scale * t is large and half precision is too coarse
        work = torch.promote_types(out_dtype, torch.float32)
        half = self.dim // 2
        j = torch.arange(half, device=t.device, dtype=work)
        freqs = torch.exp(-math.log(self.max_period) * j / half)  # (half,)
        args = self.scale * t.to(work)[:, None] * freqs[None, :]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, 2*half)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb.to(out_dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, max_period={self.max_period}"


class ConditionEmbedding(nn.Module):
    r"""Embed time (and optionally a context vector) into one vector of size ``dim``.

    .. math::

        e = \mathrm{SiLU}\big(\mathrm{MLP}_t(\mathrm{emb}(t)) + \mathrm{MLP}_c(c)\big)

    Args:
        dim: output size.
        cond_dim: size of the context vector, or ``None`` for time-only conditioning.
        time_dim: size of the sinusoidal time embedding.

    ``forward(t, like, context=None)`` returns ``(B, dim)`` where ``B = like.shape[0]``;
    ``like`` supplies the batch size, dtype and device. A per-position context
    ``(B, N, cond_dim)`` (one vector for each of the ``N`` tokens of ``like``) gives a
    per-position embedding ``(B, N, dim)``.
    """

    def __init__(self, dim: int, cond_dim: int | None = None, time_dim: int = 64) -> None:
        super().__init__()
        self.cond_dim = cond_dim
        self.time = TimeEmbedding(time_dim)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.cond_mlp = (
            nn.Sequential(nn.Linear(cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            if cond_dim is not None
            else None
        )

    def forward(self, t: TimeLike, like: Tensor, context: Tensor | None = None) -> Tensor:
        t = as_batch_time(t, like)  # (B,)
        e = self.time_mlp(self.time(t))  # (B, dim)
        if self.cond_mlp is None:
            if context is not None:
                raise ValueError("context given but the network was built with cond_dim=None")
        else:
            if context is None:
                raise ValueError(f"this network needs context=<tensor (B, {self.cond_dim})>")
            per_position = (
                context.ndim == 3
                and like.ndim == 3
                and context.shape == (like.shape[0], like.shape[1], self.cond_dim)
            )
            if not per_position and context.shape != (like.shape[0], self.cond_dim):
                raise ValueError(
                    f"context must have shape ({like.shape[0]}, {self.cond_dim})"
                    + (f" or {(*like.shape[:2], self.cond_dim)}" if like.ndim == 3 else "")
                    + f", got {tuple(context.shape)}"
                )
            c = self.cond_mlp(context.to(device=like.device, dtype=like.dtype))
            e = (e[:, None] if per_position else e) + c
        return F.silu(e)


class FiLM(nn.Module):
    r"""Feature-wise affine modulation :math:`h \odot (1 + \gamma(e)) + \beta(e)`.

    Args:
        emb_dim: size of the conditioning vector ``e`` ``(B, emb_dim)``.
        features: number of modulated features.
        channel_axis: axis of ``h`` holding the features (``1`` for ``(B, C, H, W)``,
            ``-1`` for ``(B, F)`` or ``(B, T, F)``).

    A per-position ``e`` ``(B, T, emb_dim)`` modulates each position of ``h`` ``(B, T, F)``
    with its own vector.
    """

    def __init__(self, emb_dim: int, features: int, channel_axis: int = -1) -> None:
        super().__init__()
        self.proj = nn.Linear(emb_dim, 2 * features)
        self.channel_axis = channel_axis

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        gamma, beta = self.proj(emb).chunk(2, dim=-1)  # (B, F) each
        if emb.ndim == 3:  # one vector per position, (B, T, F)
            if self.channel_axis not in (-1, h.ndim - 1) or h.shape[:2] != emb.shape[:2]:
                raise ValueError(
                    f"a per-position embedding {tuple(emb.shape)} needs h of shape "
                    f"(B, T, F) with the same B, T; got {tuple(h.shape)}"
                )
            return h * (1 + gamma) + beta
        shape = [h.shape[0]] + [1] * (h.ndim - 1)
        shape[self.channel_axis] = gamma.shape[-1]
        return h * (1 + gamma.reshape(shape)) + beta.reshape(shape)


def _zero_(layer: nn.Module) -> nn.Module:
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


class _MLPBlock(nn.Module):
    # h + W2 SiLU(W1 SiLU(FiLM(LN(h), e)))
    def __init__(self, hidden: int, emb_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = FiLM(emb_dim, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = F.silu(self.film(self.norm(h), emb))
        return h + self.fc2(F.silu(self.fc1(z)))


class MLPVelocity(nn.Module):
    r"""Residual MLP velocity field for vectors ``x`` of shape ``(B, dim)``.

    ``x -> Linear -> depth x [LN -> FiLM(e) -> SiLU -> Linear -> SiLU -> Linear (+res)]
    -> LN -> SiLU -> Linear`` (last layer zero-initialised).

    Args:
        dim: size of ``x``.
        hidden: width of the hidden layers.
        depth: number of residual blocks.
        cond_dim: size of the ``context`` vector, or ``None``.
        time_dim: size of the sinusoidal time embedding.

    Example::

        v = MLPVelocity(64, hidden=128, depth=2, cond_dim=10)
        out = v(x, 0.5, context=one_hot)   # (B, 64); all zeros before training
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        cond_dim: int | None = None,
        time_dim: int = 64,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.embed = ConditionEmbedding(hidden, cond_dim, time_dim)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden, hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = _zero_(nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: TimeLike, context: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected x of shape (B, {self.dim}), got {tuple(x.shape)}")
        emb = self.embed(t, x, context)  # (B, hidden)
        h = self.inp(x)  # (B, hidden)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))  # (B, dim)


def _num_groups(channels: int, groups: int) -> int:
    return math.gcd(channels, groups) or 1


class _ConvBlock(nn.Module):
    # h + conv(SiLU(GN(conv(SiLU(FiLM(GN(h), e))))))
    def __init__(self, channels: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        g = _num_groups(channels, groups)
        self.norm1 = nn.GroupNorm(g, channels, affine=False)
        self.film = FiLM(emb_dim, channels, channel_axis=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(g, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.conv1(F.silu(self.film(self.norm1(h), emb)))
        z = self.conv2(F.silu(self.norm2(z)))
        return h + z


class ConvVelocity(nn.Module):
    r"""Convolutional velocity field for feature maps ``x`` of shape ``(B, C, H, W)``.

    ``x -> conv3x3 -> depth x ResBlock[GN -> FiLM(e) -> SiLU -> conv3x3 -> GN -> SiLU ->
    conv3x3] -> GN -> SiLU -> conv3x3`` (last conv zero-initialised).  Padding keeps ``H, W``.

    Args:
        channels: ``C``.
        hidden: width of the hidden feature maps.
        cond_dim: size of the ``context`` vector, or ``None``.
        depth: number of residual blocks.
        groups: number of GroupNorm groups (reduced to ``gcd(hidden, groups)``).
        time_dim: size of the sinusoidal time embedding.
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        cond_dim: int | None = None,
        depth: int = 2,
        groups: int = 8,
        time_dim: int = 64,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.embed = ConditionEmbedding(hidden, cond_dim, time_dim)
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(_ConvBlock(hidden, hidden, groups) for _ in range(depth))
        self.out_norm = nn.GroupNorm(_num_groups(hidden, groups), hidden)
        self.out = _zero_(nn.Conv2d(hidden, channels, 3, padding=1))

    def forward(self, x: Tensor, t: TimeLike, context: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"expected x of shape (B, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        emb = self.embed(t, x, context)  # (B, hidden)
        h = self.inp(x)  # (B, hidden, H, W)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))  # (B, C, H, W)


class _TokenBlock(nn.Module):
    # pre-norm transformer block with adaptive LayerNorm (FiLM on the normalised tokens)
    def __init__(
        self, width: int, heads: int, mlp_ratio: int, emb_dim: int, causal: bool = False
    ) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.film1 = FiLM(emb_dim, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.film2 = FiLM(emb_dim, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, h: Tensor, emb: Tensor, allowed: Tensor | None = None) -> Tensor:
        b, n, w = h.shape
        z = self.film1(self.norm1(h), emb)  # (B, T, W)
        q, k, v = self.qkv(z).reshape(b, n, 3, self.heads, w // self.heads).unbind(2)
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # (B, heads, T, W/heads)
        a = F.scaled_dot_product_attention(  # (B, heads, T, W/heads)
            q, k, v, attn_mask=allowed, is_causal=self.causal and allowed is None
        )
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, w))
        return h + self.mlp(self.film2(self.norm2(h), emb))


class TokenVelocity(nn.Module):
    r"""Transformer velocity field for token sequences ``x`` of shape ``(B, T, dim)``.

    ``x -> Linear -> depth x [x + Attn(FiLM(LN(x), e)); x + MLP(FiLM(LN(x), e))] -> LN ->
    FiLM(e) -> Linear`` (last layer zero-initialised).  No positional encoding is added:
    the map is permutation-equivariant over tokens, which suits features that already carry
    position information (e.g. ViT tokens). With ``causal=True`` token ``i`` attends to
    tokens ``<= i`` only, so the field at a position never depends on later positions (the
    field of a causal language model's sequences). ``forward(x, t, context, mask)`` with a
    ``mask`` ``(B, T)`` (true at real tokens, false at padding; or integers, 0 at padding and
    equal within one document of a row that packs several) lets a token attend only to the
    real tokens of its own document, so the field there does not depend on the padding or
    on the other documents.

    Args:
        dim: token size ``D``.
        hidden: transformer width (must be divisible by ``heads``).
        depth: number of transformer blocks.
        heads: attention heads.
        mlp_ratio: expansion of the per-token MLP.
        cond_dim: size of the ``context`` vector, or ``None``.
        time_dim: size of the sinusoidal time embedding.
        causal: attend to earlier tokens only.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        cond_dim: int | None = None,
        time_dim: int = 64,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.dim, self.causal = dim, bool(causal)
        self.embed = ConditionEmbedding(hidden, cond_dim, time_dim)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            _TokenBlock(hidden, heads, mlp_ratio, hidden, causal) for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.out_film = FiLM(hidden, hidden)
        self.out = _zero_(nn.Linear(hidden, dim))

    #: the field mixes tokens, so it takes the padding ``mask`` of a sequence batch
    takes_mask = True

    def forward(
        self, x: Tensor, t: TimeLike, context: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        if x.ndim != 3 or x.shape[2] != self.dim:
            raise ValueError(f"expected x of shape (B, T, {self.dim}), got {tuple(x.shape)}")
        allowed = None
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"mask has shape {tuple(mask.shape)}; expected (B, T) = {tuple(x.shape[:2])}"
                )
            n = x.shape[1]
            seg = mask.long()  # (B, T): documents, 0 at padding
            allowed = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0))[:, None]
            if self.causal:
                allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            # a padded token attends to itself (a row with no key would give NaN)
            allowed = allowed | torch.eye(n, dtype=torch.bool, device=x.device)
        emb = self.embed(t, x, context)  # (B, hidden)
        h = self.inp(x)  # (B, T, hidden)
        for block in self.blocks:
            h = block(h, emb, allowed)
        return self.out(self.out_film(self.out_norm(h), emb))  # (B, T, dim)
