r"""Discrete invertible layers with exact log-determinants (normalizing-flow building blocks).

Direction convention: ``forward`` maps *data -> latent*,

.. math::

    y = f(x), \qquad \mathrm{logdet} = \log\left|\det \frac{\partial f}{\partial x}\right|,

and returns ``(y, logdet)`` with ``logdet`` of shape ``(B,)`` (one value per sample);
``inverse(y)`` returns ``x = f^{-1}(y)``.  For a latent density :math:`p_Z`,
:math:`\log p_X(x) = \log p_Z(f(x)) + \mathrm{logdet}(x)`.

All layers act on a channel axis ``1``: inputs are ``(B, C)`` vectors or ``(B, C, H, W)``
feature maps (:class:`Squeeze` needs the latter).  Every layer treats samples
independently.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "InvConv1x1",
    "InvertibleLayer",
    "InvertibleSequence",
    "Squeeze",
    "squeeze2d",
    "unsqueeze2d",
]


def _per_sample_size(x: Tensor) -> int:
    # number of positions per channel: 1 for (B, C), H*W for (B, C, H, W)
    return math.prod(x.shape[2:])


def _channel_view(p: Tensor, x: Tensor) -> Tensor:
    # (C,) -> (1, C, 1, ..., 1) broadcasting against x
    return p.reshape(1, -1, *([1] * (x.ndim - 2)))


class InvertibleLayer(nn.Module):
    """Base class: ``forward(x) -> (y, logdet)`` (data -> latent), ``inverse(y) -> x``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class AffineCoupling(InvertibleLayer):
    r"""Affine coupling layer (RealNVP / Glow style) on a channel split.

    The channels are split into ``x_a`` (kept) and ``x_b`` (transformed); with
    :math:`(r, m) = \mathrm{NN}(x_a)`,

    .. math::

        y_a = x_a, \qquad y_b = x_b \odot e^{s(r)} + m, \qquad
        \mathrm{logdet} = \textstyle\sum s(r),

    where the log-scale is bounded: ``scale="tanh"`` uses :math:`s = b \tanh(r / b)` with
    ``b = scale_bound``; ``scale="sigmoid"`` uses :math:`e^{s} = 2\,\mathrm{sigmoid}(r)`,
    i.e. a scale in :math:`(0, 2)`.  Both give :math:`s = 0` at :math:`r = 0`, and the
    conditioner's last layer is zero-initialised, so a fresh layer is the identity.

    With ``F = features`` and ``k = F // 2``: ``parity=0`` keeps channels ``[:k]`` and
    transforms ``[k:]``; ``parity=1`` keeps ``[k:]`` and transforms ``[:k]``.

    Args:
        features: number of channels ``F >= 2``.
        hidden: conditioner width.
        kind: ``"mlp"`` for ``(B, F)`` inputs or ``"conv"`` for ``(B, F, H, W)`` inputs
            (3x3 -> 1x1 -> 3x3 convolutions).
        parity: which half is transformed (0 or 1).
        scale: ``"tanh"`` or ``"sigmoid"``.
        scale_bound: ``b`` for ``scale="tanh"``.
        conditioner: optional custom module mapping ``x_a`` to ``2 * n_b`` channels
            (the first ``n_b`` are :math:`r`, the last ``n_b`` are the shift :math:`m`);
            zero-initialise its last layer to start from the identity.
    """

    def __init__(
        self,
        features: int,
        hidden: int = 64,
        kind: str = "mlp",
        parity: int = 0,
        scale: str = "tanh",
        scale_bound: float = 2.0,
        conditioner: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if features < 2:
            raise ValueError("AffineCoupling needs at least 2 features")
        if kind not in ("mlp", "conv"):
            raise ValueError(f"kind must be 'mlp' or 'conv', got {kind!r}")
        if parity not in (0, 1):
            raise ValueError("parity must be 0 or 1")
        if scale not in ("tanh", "sigmoid"):
            raise ValueError(f"scale must be 'tanh' or 'sigmoid', got {scale!r}")
        if scale_bound <= 0:
            raise ValueError("scale_bound must be positive")
        self.features, self.kind, self.parity = features, kind, parity
        self.scale, self.scale_bound = scale, float(scale_bound)
        k = features // 2
        self.split = (k, features - k)  # channel sizes of the first / second part
        n_a, n_b = (self.split[0], self.split[1]) if parity == 0 else self.split[::-1]
        if conditioner is None:
            conditioner = self._default_conditioner(kind, n_a, n_b, hidden)
        self.conditioner = conditioner

    @staticmethod
    def _default_conditioner(kind: str, n_a: int, n_b: int, hidden: int) -> nn.Module:
        if kind == "mlp":
            last = nn.Linear(hidden, 2 * n_b)
            layers = [nn.Linear(n_a, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()]
        else:
            last = nn.Conv2d(hidden, 2 * n_b, 3, padding=1)
            layers = [
                nn.Conv2d(n_a, hidden, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(hidden, hidden, 1),
                nn.SiLU(),
            ]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(*layers, last)

    def _check(self, x: Tensor) -> None:
        want = 2 if self.kind == "mlp" else 4
        if x.ndim != want or x.shape[1] != self.features:
            layout = "(B, F)" if want == 2 else "(B, F, H, W)"
            raise ValueError(
                f"AffineCoupling(kind={self.kind!r}) expects {layout} with F={self.features}, "
                f"got {tuple(x.shape)}"
            )

    def _parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        first, second = torch.split(x, self.split, dim=1)
        return (first, second) if self.parity == 0 else (second, first)

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b] if self.parity == 0 else [b, a], dim=1)

    def _scale_shift(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.conditioner(x_a).chunk(2, dim=1)  # each (B, n_b, ...)
        if self.scale == "tanh":
            log_s = self.scale_bound * torch.tanh(raw / self.scale_bound)
        else:
            log_s = math.log(2.0) + F.logsigmoid(raw)
        return log_s, shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        x_a, x_b = self._parts(x)
        log_s, shift = self._scale_shift(x_a)
        y_b = x_b * torch.exp(log_s) + shift
        return self._join(x_a, y_b), log_s.reshape(x.shape[0], -1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        y_a, y_b = self._parts(y)
        log_s, shift = self._scale_shift(y_a)
        return self._join(y_a, (y_b - shift) * torch.exp(-log_s))


class ActNorm(InvertibleLayer):
    r"""Per-channel affine normalisation with data-dependent initialisation.

    .. math::

        y = (x - \mu) \odot e^{\lambda}, \qquad
        \mathrm{logdet} = N \textstyle\sum_c \lambda_c,

    with :math:`N` the number of positions per channel (``H*W``, or 1 for vectors).
    On the first call of :meth:`forward`, :math:`\mu` and :math:`\lambda` are set from that
    batch so the output has zero mean and unit variance per channel
    (:math:`\mu_c = \mathrm{mean}`, :math:`\lambda_c = -\log(\mathrm{std} + \epsilon)`);
    afterwards they are ordinary parameters.  Before initialisation the layer is the identity.

    Args:
        channels: number of channels ``C`` (axis 1).
        eps: added to the standard deviation.
    """

    initialized: Tensor

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = float(eps)
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``loc`` / ``log_scale`` from the batch ``x`` (done automatically once)."""
        if not bool(torch.isfinite(x).all()):  # it would stay NaN for every later input
            raise ValueError(
                "ActNorm initialises from its first batch, which holds non-finite values "
                "(NaN or inf); it is left uninitialised: pass finite inputs"
            )
        dims = [0, *range(2, x.ndim)]
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False) if x[:, 0].numel() > 1 else torch.ones_like(mean)
        self.loc.copy_(mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim < 2 or x.shape[1] != self.loc.shape[0]:
            raise ValueError(f"expected (B, {self.loc.shape[0]}, ...), got {tuple(x.shape)}")
        if not bool(self.initialized):
            self.initialize(x)
        y = (x - _channel_view(self.loc, x)) * torch.exp(_channel_view(self.log_scale, x))
        logdet = self.log_scale.sum() * _per_sample_size(x)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-_channel_view(self.log_scale, y)) + _channel_view(self.loc, y)


class InvConv1x1(InvertibleLayer):
    r"""Invertible 1x1 convolution (channel mixing) with an LU-parametrised weight.

    .. math::

        W = P\,L\,\big(U + \mathrm{diag}(\mathrm{sign}(s)\, e^{\log|s|})\big), \qquad
        y_{:, i} = \textstyle\sum_j W_{ij}\, x_{:, j}, \qquad
        \mathrm{logdet} = N \textstyle\sum_i \log|s_i|,

    with :math:`P` a fixed permutation, :math:`L` unit lower-triangular, :math:`U` strictly
    upper-triangular and :math:`N` the number of positions per channel.  Initialised from a
    random orthogonal matrix (``|det W| = 1``).  Works on ``(B, C)`` and ``(B, C, H, W)``.

    Args:
        channels: ``C``.
        generator: optional random generator for the initial rotation.
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.log_s.shape[0], dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight(self) -> Tensor:
        """The ``(C, C)`` mixing matrix :math:`W = PLU`."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def inverse_weight(self) -> Tensor:
        r""":math:`W^{-1} = U^{-1} L^{-1} P^\top` via triangular solves."""
        lower, upper = self._factors()
        eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
        l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        u_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return u_inv @ l_inv @ self.perm.T

    @staticmethod
    def _mix(w: Tensor, x: Tensor) -> Tensor:
        return torch.einsum("ij,bj...->bi...", w, x)  # (B, C, ...)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim < 2 or x.shape[1] != self.log_s.shape[0]:
            raise ValueError(f"expected (B, {self.log_s.shape[0]}, ...), got {tuple(x.shape)}")
        logdet = self.log_s.sum() * _per_sample_size(x)
        return self._mix(self.weight(), x), logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return self._mix(self.inverse_weight(), y)


def squeeze2d(x: Tensor, factor: int = 2) -> Tensor:
    """Space-to-depth: ``(B, C, H, W) -> (B, C*f*f, H/f, W/f)``.

    Output channel ``c*f*f + i*f + j`` holds ``x[:, c, i::f, j::f]``.
    """
    b, c, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(f"H and W ({h}, {w}) must be divisible by factor {factor}")
    x = x.reshape(b, c, h // factor, factor, w // factor, factor)
    x = x.permute(0, 1, 3, 5, 2, 4)  # (B, C, f, f, H/f, W/f)
    return x.reshape(b, c * factor * factor, h // factor, w // factor)


def unsqueeze2d(y: Tensor, factor: int = 2) -> Tensor:
    """Depth-to-space, the inverse of :func:`squeeze2d`."""
    b, c, h, w = y.shape
    if c % (factor * factor):
        raise ValueError(f"channels ({c}) must be divisible by factor**2 = {factor * factor}")
    y = y.reshape(b, c // (factor * factor), factor, factor, h, w)
    y = y.permute(0, 1, 4, 2, 5, 3)  # (B, C', H, f, W, f)
    return y.reshape(b, c // (factor * factor), h * factor, w * factor)


class Squeeze(InvertibleLayer):
    """Space-to-depth reshuffle (:func:`squeeze2d`); a permutation, so ``logdet = 0``.

    ``forward``: ``(B, C, H, W) -> (B, 4C, H/2, W/2)`` for ``factor=2``;
    ``inverse`` is :func:`unsqueeze2d`.
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError("factor must be >= 1")
        self.factor = int(factor)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 4:
            raise ValueError(f"Squeeze expects (B, C, H, W), got {tuple(x.shape)}")
        return squeeze2d(x, self.factor), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return unsqueeze2d(y, self.factor)


class InvertibleSequence(InvertibleLayer):
    r"""Composition :math:`f = f_n \circ \dots \circ f_1` of invertible layers.

    ``forward`` applies the layers in order and sums their log-determinants;
    ``inverse`` applies the inverses in reverse order.
    """

    def __init__(self, *layers: InvertibleLayer) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> nn.Module:
        return self.layers[i]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y
