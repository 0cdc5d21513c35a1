r"""Multi-scale normalizing flows (RealNVP / Glow style) as density models of images.

Direction convention (as in :mod:`flowdistill.flows.layers`): ``encode`` maps data to
latents, ``decode`` maps latents back to data.

Data are images ``y`` in ``[0, 1]`` of shape ``(B, C, H, W)`` (dequantised pixels, see
:func:`dequantize`).  With ``logit=True`` (the default) they first pass through
:class:`LogitTransform`.  Then, for each of the ``L`` levels ``l = 0 .. L-1``:

.. math::

    x \xrightarrow{\text{squeeze}} (4C_l, H_l/2, W_l/2)
      \xrightarrow{K \times [\text{ActNorm}, \text{1x1 conv}, \text{coupling}]} h_l,

and, except at the last level, ``h_l`` is split channel-wise into ``(x_{l+1}, z_l)``:
``x_{l+1}`` goes on to the next level, ``z_l`` is *factored out* with a conditional
Gaussian prior :math:`z_l \sim \mathcal N(\mu_l(x_{l+1}), e^{2 s_l(x_{l+1})})` (or a
standard normal with ``split_prior=False``).  The last level's ``h_{L-1}`` is standard normal.
Writing every factored-out latent as standard noise
:math:`\varepsilon_l = (z_l - \mu_l) e^{-s_l}` makes the whole map
``y -> (eps_0, ..., eps_{L-1})`` one bijection with a standard-normal base, so

.. math::

    \log p(y) = \sum_l \log \mathcal N(\varepsilon_l; 0, I)
      + \log\left|\det \frac{\partial \varepsilon}{\partial y}\right|

and sampling with temperature ``T`` decodes :math:`\varepsilon \sim \mathcal N(0, T^2 I)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError, ShapeMismatchError
from ..flows.layers import (
    ActNorm,
    AffineCoupling,
    InvConv1x1,
    InvertibleLayer,
    InvertibleSequence,
    squeeze2d,
    unsqueeze2d,
)

__all__ = [
    "FlowOutput",
    "FlowStep",
    "LogitTransform",
    "MultiScaleFlow",
    "SplitPrior",
    "bits_per_dim",
    "dequantize",
]

_LOG_2PI = math.log(2 * math.pi)


def dequantize(values: Tensor, n_bins: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation: integer pixels ``v`` in ``{0, .., n_bins-1}`` to
    ``y = (v + u) / n_bins`` with ``u ~ U[0, 1)``, a float image in ``[0, 1)``."""
    v = values.float()
    u = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
    return (v + u) / n_bins


def bits_per_dim(log_prob: Tensor, dims: int, n_bins: int | None) -> Tensor:
    r"""Bits per dimension of discrete data from the log-density of its dequantised version
    ``y = (v + u) / n_bins``: :math:`(-\log p(y) + D \log n_{bins}) / (D \ln 2)`, the
    standard variational bound on :math:`-\log_2 P(v) / D`.  With ``n_bins=None`` the data
    are continuous and the result is :math:`-\log p(y) / (D \ln 2)`."""
    nll = -log_prob
    if n_bins is not None:
        nll = nll + dims * math.log(n_bins)
    return nll / (dims * math.log(2.0))


def _normal_log_prob(x: Tensor) -> Tensor:
    # log N(x; 0, I) summed per sample -> (B,)
    return -0.5 * (x.pow(2) + _LOG_2PI).flatten(1).sum(1)


class LogitTransform(InvertibleLayer):
    r"""``y`` in ``[0, 1]`` to :math:`x = \mathrm{logit}(\alpha + (1 - 2\alpha) y)`, elementwise.

    .. math::

        \mathrm{logdet} = \sum_i \big[\log(1 - 2\alpha) - \log p_i - \log(1 - p_i)\big],
        \qquad p = \alpha + (1 - 2\alpha) y.
    """

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ConfigError(f"alpha must lie in [0, 0.5), got {alpha}")
        self.alpha = float(alpha)

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        p = self.alpha + (1.0 - 2.0 * self.alpha) * y
        log_p, log_q = torch.log(p), torch.log1p(-p)
        logdet = (math.log(1.0 - 2.0 * self.alpha) - log_p - log_q).flatten(1).sum(1)
        return log_p - log_q, logdet

    def inverse(self, x: Tensor) -> Tensor:
        return (torch.sigmoid(x) - self.alpha) / (1.0 - 2.0 * self.alpha)


class FlowStep(InvertibleSequence):
    """One Glow step: ActNorm, invertible 1x1 convolution, affine coupling (conv conditioner,
    sigmoid scale; identity at initialisation apart from the rotation)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__(
            ActNorm(channels),
            InvConv1x1(channels),
            AffineCoupling(channels, hidden=hidden, kind="conv", scale="sigmoid"),
        )


class SplitPrior(nn.Module):
    """Conditional Gaussian prior of a factored-out half: ``(mean, log_std)`` of ``z`` from
    the kept half by a 3x3 convolution, zero-initialised (a standard normal at first)."""

    def __init__(self, keep_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(keep_channels, 2 * out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, keep: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self.conv(keep).chunk(2, dim=1)
        return mean, log_std


@dataclass
class FlowOutput:
    """What :meth:`MultiScaleFlow.encode` returns.

    Attributes:
        noise: standard-normal latents ``eps_l``, one per level (the base point of ``y``).
        levels: the activation ``h_l`` at the end of each level's steps, before the split
            (the "intermediate latents"; their shapes depend on the image shape and the level
            only, not on the steps or widths, so two flows of the same levels align).
        log_prob: ``log p(y)`` per sample, ``(B,)``.
    """

    noise: list[Tensor]
    levels: list[Tensor]
    log_prob: Tensor


class MultiScaleFlow(nn.Module):
    """A multi-scale normalizing flow over ``(C, H, W)`` images (see the module docstring).

    Args:
        image_shape: ``(C, H, W)``; ``H`` and ``W`` must be divisible by ``2 ** levels``.
        levels: number of levels ``L`` (one squeeze each).
        steps: flow steps per level ``K`` (an int, or one int per level).
        hidden: width of the coupling conditioners.
        split_prior: learned conditional prior for the factored-out halves.
        logit: pass ``[0, 1]`` data through :class:`LogitTransform` first.
        alpha: the logit transform's margin.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        levels: int = 2,
        steps: int | list[int] = 4,
        hidden: int = 64,
        split_prior: bool = True,
        logit: bool = True,
        alpha: float = 0.05,
    ) -> None:
        super().__init__()
        c, h, w = (int(v) for v in image_shape)
        if levels < 1:
            raise ConfigError(f"levels must be >= 1, got {levels}")
        if h % 2**levels or w % 2**levels:
            raise ConfigError(
                f"image {h}x{w} cannot be squeezed {levels} times: H and W must be divisible "
                f"by 2**levels = {2**levels}"
            )
        per_level = [steps] * levels if isinstance(steps, int) else list(steps)
        if len(per_level) != levels or min(per_level) < 1:
            raise ConfigError(f"steps must be >= 1 per level ({levels} levels), got {steps}")
        if hidden < 1:
            raise ConfigError(f"hidden must be >= 1, got {hidden}")
        self.image_shape = (c, h, w)
        self.num_levels, self.steps, self.hidden = levels, per_level, hidden
        self.preprocess = LogitTransform(alpha) if logit else None
        self.flows = nn.ModuleList()
        self.priors = nn.ModuleList()
        self._noise_shapes: list[tuple[int, int, int]] = []
        for level in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            steps_here = (FlowStep(c, hidden) for _ in range(per_level[level]))
            self.flows.append(InvertibleSequence(*steps_here))
            if level < levels - 1:
                keep = c // 2
                self.priors.append(SplitPrior(keep, c - keep) if split_prior else nn.Identity())
                self._noise_shapes.append((c - keep, h, w))
                c = keep
            else:
                self._noise_shapes.append((c, h, w))
        self.split_prior = split_prior

    @property
    def dims(self) -> int:
        """Dimensions per sample ``C * H * W``."""
        return math.prod(self.image_shape)

    def noise_shapes(self) -> list[tuple[int, int, int]]:
        """Shapes (without batch) of the per-level latents ``eps_l``."""
        return list(self._noise_shapes)

    def _prior(self, level: int, keep: Tensor) -> tuple[Tensor, Tensor]:
        if not self.split_prior:
            zero = keep.new_zeros(keep.shape[0], *self._noise_shapes[level])
            return zero, zero
        return self.priors[level](keep)

    def _check(self, y: Tensor) -> None:
        """Images of the model's shape, dequantised: floating point and, where the logit
        transform reads them, in ``[0, 1]`` (checked where it costs no wait for a device:
        on the CPU, or in evaluation mode)."""
        if y.ndim != 4 or tuple(y.shape[1:]) != self.image_shape:
            raise ShapeMismatchError(
                f"MultiScaleFlow expects images (B, {', '.join(map(str, self.image_shape))}), "
                f"got {tuple(y.shape)}"
            )
        if not y.is_floating_point():
            raise DataError(
                f"MultiScaleFlow takes dequantised images (floating point in [0, 1]: "
                f"flowdistill.nf.dequantize(images, n_bins)), got dtype {y.dtype}"
            )
        if self.preprocess is not None and (y.device.type == "cpu" or not self.training):
            low, high = torch.aminmax(y.detach())
            if not (float(low) >= 0.0 and float(high) <= 1.0):  # (NaN fails too)
                raise DataError(
                    f"MultiScaleFlow's logit transform takes images in [0, 1], got values "
                    f"from {float(low):g} to {float(high):g}: dequantise integer pixels with "
                    "flowdistill.nf.dequantize(images, n_bins)"
                )

    def encode(self, y: Tensor) -> FlowOutput:
        """Data ``(B, C, H, W)`` to latents, per-level activations and ``log p(y)``."""
        self._check(y)
        if self.preprocess is not None:
            x, logdet = self.preprocess(y)
        else:
            x, logdet = y, y.new_zeros(y.shape[0])
        log_prob = logdet
        noise, levels = [], []
        for level, flow in enumerate(self.flows):
            x, ld = flow(squeeze2d(x))  # (B, 4C_l, H_l/2, W_l/2)
            log_prob = log_prob + ld
            levels.append(x)
            if level < self.num_levels - 1:
                keep, z = x.split([x.shape[1] // 2, x.shape[1] - x.shape[1] // 2], dim=1)
                mean, log_std = self._prior(level, keep)
                eps = (z - mean) * torch.exp(-log_std)
                log_prob = log_prob - log_std.flatten(1).sum(1)
                x = keep
            else:
                eps = x
            noise.append(eps)
            log_prob = log_prob + _normal_log_prob(eps)
        return FlowOutput(noise=noise, levels=levels, log_prob=log_prob)

    def forward(self, y: Tensor) -> FlowOutput:
        return self.encode(y)

    def log_prob(self, y: Tensor) -> Tensor:
        """``log p(y)`` per sample."""
        return self.encode(y).log_prob

    def decode(self, noise: list[Tensor]) -> Tensor:
        """Latents ``eps_l`` (one tensor per level) back to data ``y``."""
        if len(noise) != self.num_levels:
            raise ShapeMismatchError(f"decode needs {self.num_levels} latents, got {len(noise)}")
        x = noise[-1]
        for level in reversed(range(self.num_levels)):
            if level < self.num_levels - 1:
                mean, log_std = self._prior(level, x)
                z = mean + torch.exp(log_std) * noise[level]
                x = torch.cat([x, z], dim=1)
            x = unsqueeze2d(self.flows[level].inverse(x))
        return self.preprocess.inverse(x) if self.preprocess is not None else x

    def sample_noise(
        self,
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        """Base latents for ``n`` samples, ``eps ~ N(0, T^2 I)``."""
        ref = next(self.parameters())
        return [
            temperature
            * torch.randn(n, *shape, generator=generator, device=ref.device, dtype=ref.dtype)
            for shape in self._noise_shapes
        ]

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` samples at ``temperature`` (``y`` may leave ``[0, 1]`` slightly: clamp for
        display)."""
        return self.decode(self.sample_noise(n, temperature, generator))

    def bits_per_dim(self, y: Tensor, n_bins: int | None) -> Tensor:
        """Per-sample bits/dim of dequantised data ``y`` (see :func:`bits_per_dim`)."""
        return bits_per_dim(self.log_prob(y), self.dims, n_bins)
