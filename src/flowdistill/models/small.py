"""Small CNNs and MLPs for the CPU suites (scikit-learn digits, MNIST-sized images)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .cifar import FeatureInfo
from .registry import register_model

__all__ = ["MLP", "SmallCNN"]


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Three 3×3 conv stages (BN, ReLU; max-pool after the first two), global pool, linear.

    Taps: ``stage1`` ``(w1, H/2, W/2)``, ``stage2`` ``(w2, H/4, W/4)``, ``stage3``
    ``(w3, H/4, W/4)``, ``pool`` ``(w3,)``, logits ``(num_classes,)``.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128)
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stage1 = _block(in_channels, w1, pool=True)
        self.stage2 = _block(w1, w2, pool=True)
        self.stage3 = _block(w2, w3, pool=False)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(w3, num_classes)
        self.widths = (w1, w2, w3)

    def feature_info(self) -> list[FeatureInfo]:
        """The three stages, shallow to deep (the last is the map the classifier pools)."""
        return [
            FeatureInfo(name=f"stage{i + 1}", channels=w, stride=s)
            for i, (w, s) in enumerate(zip(self.widths, (2, 4, 4), strict=True))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))  # (B, w3, H/4, W/4)
        return self.fc(self.pool(x))  # (B, num_classes)


class MLP(nn.Module):
    """Flatten, then ``len(hidden)`` Linear+ReLU layers named ``layers.i``, then ``fc``."""

    def __init__(
        self, in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (64,)
    ) -> None:
        super().__init__()
        dims = [in_features, *hidden]
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU())
            for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.fc = nn.Linear(dims[-1], num_classes)
        self.widths = tuple(hidden)

    def feature_info(self) -> list[FeatureInfo]:
        """The hidden layers, shallow to deep (vectors: stride 1)."""
        return [FeatureInfo(name=f"layers.{i}", channels=w, stride=1)
                for i, w in enumerate(self.widths)]  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = layer(x)
        return self.fc(x)


@register_model("small_cnn")
def small_cnn(
    in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128)
) -> SmallCNN:
    """A :class:`SmallCNN` with the given stage widths."""
    return SmallCNN(in_channels, num_classes, tuple(widths))


@register_model("digits_teacher")
def digits_teacher(in_channels: int = 1, num_classes: int = 10) -> SmallCNN:
    """The digits suite's teacher CNN (8,254 parameters)."""
    return SmallCNN(in_channels, num_classes, (12, 24, 24))


@register_model("digits_student")
def digits_student(in_channels: int = 1, num_classes: int = 10) -> SmallCNN:
    """The digits suite's student CNN (745 parameters, 11× fewer than the teacher)."""
    return SmallCNN(in_channels, num_classes, (3, 6, 8))


@register_model("mlp")
def mlp(in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (64,)) -> MLP:
    """An :class:`MLP` over flattened inputs."""
    return MLP(in_features, num_classes, tuple(hidden))
