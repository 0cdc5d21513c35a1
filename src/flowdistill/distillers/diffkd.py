r"""DiffKD: Huang et al., "Knowledge Diffusion for Distillation" (NeurIPS 2023).

The teacher's feature is treated as a clean sample of a diffusion model and the student's
feature as a noisy version of it. A small denoiser learns the teacher's feature distribution
by noise prediction; the projected student feature is then *denoised* by a few DDIM steps
and matched to the teacher. Written after the authors' public code
(``hunto/image_classification_sota``, ``lib/models/losses/diffkd``); per distilled pair:

* **Autoencoder.** A linear autoencoder (1×1 conv + BN encoder, 1×1 conv decoder) compresses
  the teacher feature :math:`t` to a latent :math:`z` (``ae_channels``, half the teacher's
  channels by default); :math:`\mathcal{L}_\mathrm{ae} = \lVert D(E(t)) - t\rVert^2` and
  :math:`\bar z = \mathrm{sg}(E(t))` is the target of everything else.
* **Diffusion.** DDPM forward process with ``num_train_timesteps`` = 1000 steps and a linear
  :math:`\beta` schedule from 1e-4 to 0.02, :math:`\bar\alpha_t = \prod_{s\le t}(1-\beta_s)`.
  The denoiser :math:`\epsilon_\theta` (time embedding added to the input, then two
  bottleneck-residual conv blocks for maps, a 1×1 MLP C→4C→C→4C→C for vectors and tokens) is
  trained on :math:`\mathcal{L}_\mathrm{diff} = \lVert\epsilon_\theta(\sqrt{\bar\alpha_t}\bar
  z + \sqrt{1-\bar\alpha_t}\epsilon, t) - \epsilon\rVert^2`, :math:`t\sim\mathcal U\{0..999\}`.
* **Noise adapter and denoising.** The student feature is projected to the latent's shape,
  :math:`s' = P(s)`; a noise adapter predicts a per-sample weight :math:`\gamma\in(0,1)` and
  mixes :math:`x = \gamma s' + (1-\gamma)\epsilon`. Deterministic DDIM (:math:`\eta=0`) then
  runs the last ``inference_steps`` steps of a ``2 × inference_steps``-step schedule
  (t = 400, 300, 200, 100, 0 by default) and a 1×1 conv + BN gives :math:`\hat s`.
* **Losses.** :math:`\mathcal{L}_\mathrm{feat} = \mathrm{MSE}(\hat s, \bar z)` on features;
  the logits get their own branch (no autoencoder, an MLP denoiser, KL at temperature
  ``tau`` between the denoised student logits and the teacher's). Gradients reach the
  student through the projection, the denoiser and the DDIM chain.

Total loss (the reference's default weights, all 1): ``ce + feat + logit + diff_feat +
diff_logit + ae``. Options and defaults: ``inference_steps=5``, ``num_train_timesteps=1000``,
``use_ae=True``, ``ae_channels=None`` (half the teacher's channels), ``tau=1.0``,
``distill_logits=True``, ``time_embedding="sinusoidal"``, ``feat_weight=1.0``,
``logit_weight=1.0``, ``diff_weight=1.0``, ``ae_weight=1.0``, ``ce_weight=1.0``.
Feature pairs are ``student_taps[i]`` ↔ ``teacher_taps[i]`` (maps ``(C, H, W)``, the main
case; vectors ``(D,)``; tokens ``(N, D)``, denoised per token). The method is
training-only: :meth:`predict` is the plain student.

Departures from the reference: the learned time embedding (one vector per training
timestep, 1000 rather than the reference's 1280 rows) starts from sinusoidal codes instead
of N(0, 1) unless ``time_embedding="random"``; the noise adapter of the MLP kind
average-pools over positions (a no-op for vectors, needed for tokens); the student
projection is the library's :class:`~flowdistill.adapters.Adapter` (1×1 conv plus a
bilinear resize when the spatial sizes differ, linear for vectors and tokens); batch norm
falls back to running statistics on a training batch of a single vector; ``ae_channels``
defaults to half the teacher's channels (the reference module's default; its ImageNet
configs fix 1024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..adapters import Adapter, feature_kind
from ..errors import ConfigError, ShapeMismatchError
from ..taps import LOGITS
from .base import Distiller
from .registry import register

__all__ = [
    "BETA_END",
    "BETA_START",
    "DiffKD",
    "DiffusionBranch",
    "add_noise",
    "alphas_cumprod",
    "ddim_step",
    "ddim_timesteps",
    "linear_betas",
    "mix_noise",
    "sinusoidal_embedding",
]

Shape = tuple[int, ...]

#: the reference's linear β schedule (DDPM's): β_1 = 1e-4 … β_T = 0.02
BETA_START = 1e-4
BETA_END = 0.02


# ---------------------------------------------------------------------- schedule math
def linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> torch.Tensor:
    """β_t for t = 0 … T-1, evenly spaced from ``beta_start`` to ``beta_end`` (float64)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s ≤ t} (1 − β_s): the signal fraction left after t + 1 noising steps."""
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(num_train_timesteps: int, inference_steps: int) -> list[int]:
    """The timesteps DiffKD denoises the student at: the last ``inference_steps`` of an evenly
    spaced ``2 × inference_steps``-step DDIM schedule, ``[(n-1)·r, …, r, 0]`` with
    ``r = T // (2n)`` (``[400, 300, 200, 100, 0]`` for T = 1000, n = 5): the student is
    taken as a feature already half-way denoised."""
    if inference_steps < 1 or 2 * inference_steps > num_train_timesteps:
        raise ConfigError(
            f"diffkd: inference_steps must be in 1..{num_train_timesteps // 2} "
            f"(num_train_timesteps={num_train_timesteps}), got {inference_steps}"
        )
    ratio = num_train_timesteps // (2 * inference_steps)
    return [ratio * i for i in reversed(range(inference_steps))]


def sinusoidal_embedding(num_timesteps: int, channels: int) -> torch.Tensor:
    """Transformer-style codes of t = 0 … T-1: ``sin(t·ω_k)`` then ``cos(t·ω_k)``,
    ``ω_k = 10000^(−k/⌈C/2⌉)``, ``(T, C)``; the initial value of DiffKD's learned time
    embedding (neighbouring timesteps start with similar codes)."""
    half = (channels + 1) // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(num_timesteps, dtype=torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)[:, :channels].float()


def _per_sample(a: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """A per-sample coefficient ``(B,)`` viewed to broadcast over ``x`` (scalars as they are)."""
    if isinstance(a, torch.Tensor) and a.dim() == 1:
        return a.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return a


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor | float
) -> torch.Tensor:
    """The DDPM forward process: x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε (ᾱ_t scalar or ``(B,)``)."""
    a = _per_sample(alpha_bar, x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def mix_noise(feat: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The noise adapter's mixing, as in the reference: γ · feat + (1 − γ) · ε, γ ``(B,)``."""
    g = _per_sample(weight, feat)
    return g * feat + (1 - g) * noise


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: torch.Tensor | float,
    alpha_bar_prev: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step (η = 0, Song et al. 2021, eq. 12): ``(x_prev, x0_pred)``.

    x0_pred = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t and x_prev = √ᾱ_prev · x0_pred + √(1 − ᾱ_prev) ε;
    ᾱ_prev = 1 past the first timestep, so the final step returns x0_pred.
    """
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
    return alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps, x0


# ---------------------------------------------------------------------- layouts and layers
def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """The common ``(B, C, H, W)`` layout: vectors ``(B, D)`` → ``(B, D, 1, 1)``, tokens
    ``(B, N, D)`` → ``(B, D, N, 1)`` (so 1×1 convolutions act per token), maps unchanged."""
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() == 3:
        return x.transpose(1, 2).unsqueeze(-1)
    if x.dim() == 4:
        return x
    raise ShapeMismatchError(f"diffkd: cannot use a feature of shape {tuple(x.shape)}")


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that uses its running statistics when a training batch has a single value
    per channel (a batch of one vector), where plain batch norm is undefined."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() == x.shape[1]:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def _conv_bn(c_in: int, c_out: int, kernel: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), _BatchNorm(c_out)]


class Bottleneck(nn.Module):
    """Residual 1×1 → 3×3 → 1×1 conv block (BN after each, ReLU between), width C / reduction."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(1, channels // reduction)
        self.block = nn.Sequential(
            *_conv_bn(channels, mid),
            nn.ReLU(inplace=True),
            *_conv_bn(mid, mid, 3),
            nn.ReLU(inplace=True),
            *_conv_bn(mid, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Denoiser(nn.Module):
    """Noise predictor ε_θ(x_t, t): a learned time embedding is added to x_t, then two
    bottleneck blocks and a 1×1 conv + BN (``kind="conv"``, maps) or a 1×1 MLP
    C → 4C → C → 4C → C (``kind="mlp"``, vectors, tokens and logits). The embedding starts
    from :func:`sinusoidal_embedding` (``time_embedding="sinusoidal"``) or, as in the
    reference, from N(0, 1) (``"random"``)."""

    def __init__(
        self, channels: int, kind: str, num_train_timesteps: int, time_embedding: str
    ) -> None:
        super().__init__()
        self.time_embedding = nn.Embedding(num_train_timesteps, channels)
        if time_embedding == "sinusoidal":
            with torch.no_grad():
                self.time_embedding.weight.copy_(
                    sinusoidal_embedding(num_train_timesteps, channels)
                )
        c = channels
        if kind == "conv":
            self.net = nn.Sequential(Bottleneck(c), Bottleneck(c), *_conv_bn(c, c))
        else:
            self.net = nn.Sequential(
                *_conv_bn(c, 4 * c),
                nn.ReLU(inplace=True),
                *_conv_bn(4 * c, c),
                *_conv_bn(c, 4 * c),
                nn.ReLU(inplace=True),
                nn.Conv2d(4 * c, c, 1),
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=torch.long)
        return self.net(x + self.time_embedding(t)[..., None, None].to(x.dtype))


class NoiseAdapter(nn.Module):
    """Predicts the per-sample weight γ ∈ (0, 1) of the student feature in the noisy start:
    a bottleneck (``kind="conv"``) or 1×1 MLP, global average pool, linear to 2, softmax[0]."""

    def __init__(self, channels: int, kind: str) -> None:
        super().__init__()
        c = channels
        if kind == "conv":
            body: list[nn.Module] = [Bottleneck(c, reduction=8)]
        else:
            body = [*_conv_bn(c, 2 * c), nn.ReLU(inplace=True), *_conv_bn(2 * c, c)]
        self.feat = nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.pred = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pred(self.feat(x)).softmax(dim=1)[:, 0]


class AutoEncoder(nn.Module):
    """Linear autoencoder over channels: encoder 1×1 conv + BN, decoder 1×1 conv."""

    def __init__(self, channels: int, latent: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*_conv_bn(channels, latent))
        self.decoder = nn.Conv2d(latent, channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)


def _channels(shape: Shape) -> int:
    return shape[0] if len(shape) != 2 else shape[1]


def _with_channels(shape: Shape, c: int) -> Shape:
    return (c, *shape[1:]) if len(shape) != 2 else (shape[0], c)


class DiffusionBranch(nn.Module):
    """DiffKD for one pair: projection, optional autoencoder, denoiser, noise adapter, DDIM.

    ``forward(s, t)`` takes the student and teacher features in their own layouts and
    returns ``(denoised student, target, diffusion loss, reconstruction loss or None,
    noise-adapter weights γ)``, the first two in the ``(B, C, H, W)`` layout of
    :func:`to_nchw`.
    """

    def __init__(
        self,
        student_shape: Shape,
        teacher_shape: Shape,
        *,
        kind: str,
        use_ae: bool,
        ae_channels: int | None,
        num_train_timesteps: int,
        inference_steps: int,
        time_embedding: str = "sinusoidal",
    ) -> None:
        super().__init__()
        c_t = _channels(teacher_shape)
        latent = c_t
        self.ae: AutoEncoder | None = None
        if use_ae:
            latent = ae_channels if ae_channels is not None else max(1, c_t // 2)
            self.ae = AutoEncoder(c_t, latent)
        self.latent_shape = _with_channels(teacher_shape, latent)
        self.trans = Adapter(student_shape, self.latent_shape)
        self.denoiser = Denoiser(latent, kind, num_train_timesteps, time_embedding)
        self.noise_adapter = NoiseAdapter(latent, kind)
        self.proj = nn.Sequential(*_conv_bn(latent, latent))
        self.num_train_timesteps = num_train_timesteps
        self.timesteps = ddim_timesteps(num_train_timesteps, inference_steps)
        abar = alphas_cumprod(linear_betas(num_train_timesteps)).float()
        self.register_buffer("alphas_cumprod", abar, persistent=False)

    def noise_loss(self, x0: torch.Tensor) -> torch.Tensor:
        """Noise-prediction MSE on clean ``x0`` (``(B, C, H, W)``) at uniform random t."""
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = add_noise(x0, noise, self.alphas_cumprod[t])
        return F.mse_loss(self.denoiser(x_t, t), noise)

    def denoise(self, x: torch.Tensor, timesteps: Sequence[int] | None = None) -> torch.Tensor:
        """Deterministic DDIM from x at ``timesteps[0]`` down through ``timesteps[-1]``
        (each step goes to the next listed timestep, the last to ᾱ = 1); by default the
        method's ``inference_steps`` steps."""
        steps = list(self.timesteps if timesteps is None else timesteps)
        for t, prev in zip(steps, [*steps[1:], -1], strict=True):
            abar_prev = self.alphas_cumprod[prev] if prev >= 0 else 1.0
            x, _ = ddim_step(x, self.denoiser(x, t), self.alphas_cumprod[t], abar_prev)
        return x

    def forward(
        self, s: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        s = to_nchw(self.trans(s))
        t = to_nchw(t)
        rec = None
        if self.ae is not None:
            z, t_rec = self.ae(t)
            rec = F.mse_loss(t_rec, t)
            t = z.detach()
        gamma = self.noise_adapter(s)
        x = mix_noise(s, torch.randn_like(s), gamma)
        refined = self.proj(self.denoise(x))
        return refined, t, self.noise_loss(t), rec, gamma


# ---------------------------------------------------------------------- the method
@register("diffkd")
class DiffKD(Distiller):
    """DiffKD (Huang et al., NeurIPS 2023): diffusion-denoised student features and logits.

    The student's features are denoised by a diffusion model trained on the teacher's,
    then matched to them (MSE on features, KL on logits); the module docstring gives the
    algorithm and the defaults. Each ``student_taps[i]`` is distilled from
    ``teacher_taps[i]`` by its own :class:`DiffusionBranch` (feature maps use the conv
    denoiser, vectors and tokens the MLP one); with ``distill_logits`` the logits get a
    branch too (no autoencoder, MLP denoiser, KL at ``tau``). Loss terms: ``ce``, ``feat``,
    ``diff_feat``, ``ae`` (with ``use_ae``), ``logit``, ``diff_logit`` (with
    ``distill_logits``). Training-only: :meth:`predict` is the plain student.
    """

    tune_grid = {"inference_steps": [3, 5], "feat_weight": [1.0, 2.0]}

    needs_shapes = True
    uses_feature_taps = True

    def __init__(
        self,
        teacher,
        student,
        *,
        inference_steps: int = 5,
        num_train_timesteps: int = 1000,
        use_ae: bool = True,
        ae_channels: int | None = None,
        tau: float = 1.0,
        distill_logits: bool = True,
        time_embedding: str = "sinusoidal",
        feat_weight: float = 1.0,
        logit_weight: float = 1.0,
        diff_weight: float = 1.0,
        ae_weight: float = 1.0,
        ce_weight: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        if tau <= 0:
            raise ConfigError(f"diffkd: tau must be positive, got {tau}")
        if num_train_timesteps < 2:
            raise ConfigError(
                f"diffkd: num_train_timesteps must be at least 2, got {num_train_timesteps}"
            )
        if ae_channels is not None and ae_channels < 1:
            raise ConfigError(f"diffkd: ae_channels must be positive, got {ae_channels}")
        ddim_timesteps(num_train_timesteps, inference_steps)  # validates inference_steps
        if time_embedding not in ("sinusoidal", "random"):
            raise ConfigError(
                f"diffkd: time_embedding must be 'sinusoidal' or 'random', got {time_embedding!r}"
            )
        self.tau = float(tau)
        self.feat_weight = float(feat_weight)
        self.logit_weight = float(logit_weight)
        self.diff_weight = float(diff_weight)
        self.ae_weight = float(ae_weight)
        self.use_ae = bool(use_ae)
        s_taps = list(base.get("student_taps", (LOGITS,)))
        t_taps = list(base.get("teacher_taps", (LOGITS,)))
        if len(s_taps) != len(t_taps):
            raise ConfigError(
                f"diffkd: student_taps {s_taps} and teacher_taps {t_taps} must pair up one to "
                "one (student_taps[i] is distilled from teacher_taps[i])"
            )
        self.pairs = [
            (s, t) for s, t in zip(s_taps, t_taps, strict=True) if (s, t) != (LOGITS,) * 2
        ]
        common = {
            "num_train_timesteps": num_train_timesteps,
            "inference_steps": inference_steps,
            "time_embedding": time_embedding,
        }
        self.branches = nn.ModuleList()
        for s_tap, t_tap in self.pairs:
            s_shape, t_shape = self.student_shapes[s_tap], self.teacher_shapes[t_tap]
            kind = "conv" if feature_kind(t_shape) == "map" else "mlp"
            try:
                branch = DiffusionBranch(
                    s_shape, t_shape, kind=kind, use_ae=use_ae, ae_channels=ae_channels, **common
                )
            except ShapeMismatchError as err:
                raise ShapeMismatchError(
                    f"diffkd: cannot distill student tap {s_tap!r} {s_shape} from teacher tap "
                    f"{t_tap!r} {t_shape}: {err}"
                ) from None
            self.branches.append(branch)
        self.logit_branch: DiffusionBranch | None = None
        if distill_logits:
            shape = self.teacher_shapes[LOGITS]
            self.logit_branch = DiffusionBranch(
                shape, shape, kind="mlp", use_ae=False, ae_channels=None, **common
            )
        if not self.pairs and self.logit_branch is None:
            raise ConfigError(
                "diffkd: nothing to distill: give feature taps (student_taps / teacher_taps) "
                "or keep distill_logits=True"
            )
        self._gamma_sum: torch.Tensor | float = 0.0
        self._gamma_count = 0

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self._gamma_sum, self._gamma_count = 0.0, 0

    def diagnostics(self) -> dict[str, float]:
        """``diffkd_gamma``: the epoch's mean noise-adapter weight of the student feature
        (1: the student is taken as clean, 0: as pure noise), over all branches."""
        if not self._gamma_count:
            return {}
        return {"diffkd_gamma": float(self._gamma_sum) / self._gamma_count}

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t_out = self.teacher_forward(inputs)
        s_out = self.student_forward(inputs)
        terms = {"ce": self.ce_weight * self.cross_entropy(s_out[LOGITS], targets)}
        gammas = []
        if self.pairs:
            feat, diff, rec = [], [], []
            for (s_tap, t_tap), branch in zip(self.pairs, self.branches, strict=True):
                refined, target, diff_loss, rec_loss, gamma = branch(s_out[s_tap], t_out[t_tap])
                feat.append(F.mse_loss(refined, target))
                diff.append(diff_loss)
                if rec_loss is not None:
                    rec.append(rec_loss)
                gammas.append(gamma.detach().mean())
            terms["feat"] = self.feat_weight * sum(feat)
            terms["diff_feat"] = self.diff_weight * sum(diff)
            if rec:
                terms["ae"] = self.ae_weight * sum(rec)
        if self.logit_branch is not None:
            t_logits = t_out[LOGITS]
            refined, _, diff_loss, _, gamma = self.logit_branch(s_out[LOGITS], t_logits)
            kl = losses.kd(refined.movedim(1, -1), to_nchw(t_logits).movedim(1, -1), self.tau)
            terms["logit"] = self.logit_weight * kl
            terms["diff_logit"] = self.diff_weight * diff_loss
            gammas.append(gamma.detach().mean())
        if self.training:
            self._gamma_sum = self._gamma_sum + torch.stack(gammas).mean()  # no host sync
            self._gamma_count += 1
        return self.total(terms)
