"""CIFAR-100 ResNets, wide ResNets and VGGs of the standard distillation tables.

The architectures (depths, widths, where the shortcuts and poolings sit) are those of the
CIFAR-100 benchmark of "Contrastive Representation Distillation" (Tian et al., 2020) that
most later distillation papers reuse, so parameter counts agree with the published tables
(``resnet32x4`` 7,433,860, ``wrn_40_2`` 2,255,156, ``vgg13`` 9,462,180, ...). Parameter
names follow that release's module layout (``layer1.0.conv1``, ``block2.layer.0.bn1``,
``block3.4``, ``fc``/``classifier``), so its state dicts map onto these models key by key.

Every model here takes 3×32×32 inputs, returns logits, and lists its feature stages with
:meth:`ZooNet.feature_info` before any forward pass: each entry names a module path for
:class:`flowdistill.taps.FeatureTaps` with its channel count and its stride relative to a
32×32 input, the last entry being the last feature map before global pooling.
:meth:`ZooNet.preact_taps` names, for each stage, the module whose output is that stage's
feature before its last ReLU: the ``preact=True`` features of the reference release (the
teacher features of ReviewKD).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
from torch import nn

from ..errors import ConfigError
from .registry import register_model

__all__ = [
    "VGG",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "FeatureInfo",
    "WideResNet",
    "ZooNet",
    "init_weights",
    "resnet_stage",
]


class FeatureInfo(TypedDict):
    """One feature stage: module path (a :class:`~flowdistill.taps.FeatureTaps` name),
    output channels, and stride relative to the model's nominal input size."""

    name: str
    channels: int
    stride: int


class ZooNet(nn.Module):
    """Base of the zoo models: a module that declares its feature stages up front."""

    def __init__(self) -> None:
        super().__init__()
        self._stages: tuple[FeatureInfo, ...] = ()
        self._preact: dict[str, str] = {}
        self._classifier_input: str | None = None  # (default: the deepest stage)

    def feature_info(self) -> list[FeatureInfo]:
        """The feature stages, shallow to deep (a fresh list of fresh dicts)."""
        return [FeatureInfo(**stage) for stage in self._stages]

    def classifier_input(self) -> str:
        """The module path whose output the classifier reads (after global average pooling):
        the deepest stage, or the head layers after it where the model has them."""
        return self._classifier_input or self._stages[-1]["name"]

    def preact_taps(self) -> dict[str, str]:
        """``{stage tap: module path}`` of each stage's pre-activation feature (same
        channels and stride as the stage; its values before the ReLU that ends it, or, for
        the pre-activation wide ResNets, after the BatchNorm that the next ReLU follows);
        empty where the model declares none."""
        return dict(self._preact)

    def _declare(self, *stages: tuple[str, int, int]) -> None:
        self._stages = tuple(FeatureInfo(name=n, channels=c, stride=s) for n, c, s in stages)


def init_weights(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions with zero biases, unit/zero BatchNorm affine;
    linear layers keep PyTorch's default initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """A bias-free ``kernel``×``kernel`` convolution ("same" padding) and BatchNorm."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


# ----------------------------------------------------------------------------- ResNets


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm; identity shortcut, or a strided 1×1 projection
    (``downsample``) when the shape changes; ReLU after the sum (``preact``, an identity,
    outputs the sum before it)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(self.preact(out + shortcut))  # (not in place: preact is tapped)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand to ``4 * planes``, each with
    BatchNorm; projection shortcut when the shape changes; ReLU after the sum (``preact``,
    an identity, outputs the sum before it)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(self.preact(out + shortcut))  # (not in place: preact is tapped)


def resnet_stage(
    block: type[BasicBlock] | type[Bottleneck], c_in: int, planes: int, depth: int, stride: int
) -> nn.Sequential:
    """``depth`` residual blocks; the first carries ``stride`` and the channel change."""
    c_out = planes * block.expansion
    blocks = [
        block(c_in if i == 0 else c_out, planes, stride if i == 0 else 1) for i in range(depth)
    ]
    return nn.Sequential(*blocks)


class CifarResNet(ZooNet):
    """The CIFAR ResNet of He et al. (2016): a 3×3 stem, three stages of ``(depth - 2) / 6``
    basic blocks at strides 1, 2, 2, global average pooling and a linear classifier.

    ``widths`` are the stem and the three stage widths: ``(16, 16, 32, 64)`` for
    ``resnet8`` ... ``resnet110``, ``(32, 64, 128, 256)`` for the ×4 variants.

    Taps: ``layer1`` ``(w1, 32, 32)``, ``layer2`` ``(w2, 16, 16)``, ``layer3`` ``(w3, 8, 8)``;
    their pre-activation features: ``layer<k>.<last block>.preact``.
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n + 2 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        w0, w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(3, w0, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = resnet_stage(BasicBlock, w0, w1, n, stride=1)
        self.layer2 = resnet_stage(BasicBlock, w1, w2, n, stride=2)
        self.layer3 = resnet_stage(BasicBlock, w2, w3, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        self._declare(("layer1", w1, 1), ("layer2", w2, 2), ("layer3", w3, 4))
        self._preact = {f"layer{k}": f"layer{k}.{n - 1}.preact" for k in (1, 2, 3)}
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w0, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, w3, H/4, W/4)
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-8, widths 16/32/64 (83,892 parameters at 100 classes)."""
    return CifarResNet(8, _THIN, num_classes)


@register_model("resnet14")
def resnet14(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-14, widths 16/32/64 (181,108 parameters at 100 classes)."""
    return CifarResNet(14, _THIN, num_classes)


@register_model("resnet20")
def resnet20(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-20, widths 16/32/64 (278,324 parameters at 100 classes)."""
    return CifarResNet(20, _THIN, num_classes)


@register_model("resnet32")
def resnet32(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-32, widths 16/32/64 (472,756 parameters at 100 classes)."""
    return CifarResNet(32, _THIN, num_classes)


@register_model("resnet44")
def resnet44(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-44, widths 16/32/64 (667,188 parameters at 100 classes)."""
    return CifarResNet(44, _THIN, num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-56, widths 16/32/64 (861,620 parameters at 100 classes)."""
    return CifarResNet(56, _THIN, num_classes)


@register_model("resnet110")
def resnet110(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-110, widths 16/32/64 (1,736,564 parameters at 100 classes)."""
    return CifarResNet(110, _THIN, num_classes)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-8 at four times the width, 64/128/256 (1,233,540 parameters)."""
    return CifarResNet(8, _WIDE, num_classes)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-32 at four times the width, 64/128/256 (7,433,860 parameters)."""
    return CifarResNet(32, _WIDE, num_classes)


# ------------------------------------------------------------------------ wide ResNets


class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3×3 twice. When the shape changes, the
    shortcut is a 1×1 projection (``convShortcut``) of the pre-activated input."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()  # (not in place: bn1 is a tapped pre-activation feature)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        # camelCase kept so that state dicts of the reference release load unchanged
        self.convShortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if c_in != c_out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + shortcut


class _WideStage(nn.Module):
    """``depth`` pre-activation blocks held in ``layer``; the first carries the stride."""

    def __init__(self, c_in: int, c_out: int, depth: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                _WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                for i in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(ZooNet):
    """WRN-``depth``-``widen`` (Zagoruyko & Komodakis, 2016): a 3×3 stem of 16 channels,
    three stages of ``(depth - 4) / 6`` pre-activation blocks of widths ``16k, 32k, 64k``
    at strides 1, 2, 2, then BN-ReLU, global average pooling and a linear classifier.

    Taps: ``block1`` ``(16k, 32, 32)``, ``block2`` ``(32k, 16, 16)``, ``block3``
    ``(64k, 8, 8)`` (stage outputs, before the following stage's or the final BN-ReLU);
    their pre-activation features are those after that BN: ``block2.layer.0.bn1``,
    ``block3.layer.0.bn1``, ``bn1``.
    """

    def __init__(self, depth: int, widen: int, num_classes: int = 100) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"wide ResNet depth must be 6n + 4 (10, 16, 22, ...), got {depth}")
        n = (depth - 4) // 6
        w1, w2, w3 = 16 * widen, 32 * widen, 64 * widen
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.block1 = _WideStage(16, w1, n, stride=1)
        self.block2 = _WideStage(w1, w2, n, stride=2)
        self.block3 = _WideStage(w2, w3, n, stride=2)
        self.bn1 = nn.BatchNorm2d(w3)
        self.relu = nn.ReLU()  # (not in place: bn1 is a tapped pre-activation feature)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        self._declare(("block1", w1, 1), ("block2", w2, 2), ("block3", w3, 4))
        self._preact = {"block1": "block2.layer.0.bn1", "block2": "block3.layer.0.bn1",
                        "block3": "bn1"}  # fmt: skip
        self._classifier_input = "relu"  # (the final BN-ReLU)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))  # (B, 64k, H/4, W/4)
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    """WRN-16-1: two blocks per stage, widths 16/32/64 (180,916 parameters)."""
    return WideResNet(16, 1, num_classes)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2: two blocks per stage, widths 32/64/128 (703,284 parameters)."""
    return WideResNet(16, 2, num_classes)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    """WRN-40-1: six blocks per stage, widths 16/32/64 (569,780 parameters)."""
    return WideResNet(40, 1, num_classes)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2: six blocks per stage, widths 32/64/128 (2,255,156 parameters)."""
    return WideResNet(40, 2, num_classes)


# --------------------------------------------------------------------------------- VGG

_VGG_LAYOUTS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(ZooNet):
    """VGG with BatchNorm for 32×32 inputs: five blocks of 3×3 conv-BN-ReLU (convolutions
    with biases), 2×2 max-pooling after the first three, global average pooling and a
    single linear classifier (no fully connected stack).

    A fourth max-pool between ``block3`` and ``block4`` is applied only to inputs larger
    than 32×32 (64×64 Tiny-ImageNet), as in the reference code; at 32×32 the last two
    blocks both run at 4×4.

    Taps: ``block1`` ``(128, 16, 16)``, ``block2`` ``(256, 8, 8)``, ``block3``
    ``(512, 4, 4)``, ``block4`` ``(512, 4, 4)`` (post-ReLU block outputs); their
    pre-activation features are those of each block's last BatchNorm.
    """

    def __init__(self, depth: int, num_classes: int = 100) -> None:
        super().__init__()
        if depth not in _VGG_LAYOUTS:
            raise ConfigError(f"VGG depth must be one of {sorted(_VGG_LAYOUTS)}, got {depth}")
        layout = _VGG_LAYOUTS[depth]
        c_in = 3
        for i, widths in enumerate(layout):
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(True)]
                c_in = w
            layers[-1] = nn.ReLU()  # (not in place: the BatchNorm before it is tapped)
            self.add_module(f"block{i}", nn.Sequential(*layers))
            self._preact[f"block{i}"] = f"block{i}.{len(layers) - 2}"
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3 = nn.MaxPool2d(2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        self._declare(
            ("block1", layout[1][-1], 2),
            ("block2", layout[2][-1], 4),
            ("block3", layout[3][-1], 8),
            ("block4", layout[4][-1], 8),
        )
        del self._preact["block0"]  # (not a declared stage)
        init_weights(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        large = x.shape[-2] > 32
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)  # (B, 512, H/8, W/8)
        if large:
            x = self.pool3(x)
        x = self.block4(x)
        return self.classifier(torch.flatten(self.pool4(x), 1))  # (B, num_classes)


@register_model("vgg8")
def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8 with BatchNorm, one conv per block (3,965,028 parameters at 100 classes)."""
    return VGG(8, num_classes)


@register_model("vgg11")
def vgg11(num_classes: int = 100) -> VGG:
    """VGG-11 with BatchNorm (configuration A; 9,277,284 parameters at 100 classes)."""
    return VGG(11, num_classes)


@register_model("vgg13")
def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13 with BatchNorm (configuration B; 9,462,180 parameters at 100 classes)."""
    return VGG(13, num_classes)


@register_model("vgg16")
def vgg16(num_classes: int = 100) -> VGG:
    """VGG-16 with BatchNorm (configuration D; 14,774,436 parameters at 100 classes)."""
    return VGG(16, num_classes)


@register_model("vgg19")
def vgg19(num_classes: int = 100) -> VGG:
    """VGG-19 with BatchNorm (configuration E; 20,086,692 parameters at 100 classes)."""
    return VGG(19, num_classes)
