"""CIFAR-100 mobile students of the standard distillation tables: MobileNetV2 (width 0.5)
and ShuffleNet V1/V2, as sized in the benchmark of "Contrastive Representation
Distillation" (Tian et al., 2020). Parameter names follow that release's module layout.

Like :mod:`flowdistill.models.cifar`, every model takes 3×32×32 inputs, returns logits and
declares its feature stages with ``feature_info()`` (strides relative to 32×32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cifar import ZooNet, init_weights
from .registry import register_model

__all__ = ["MobileNetV2", "ShuffleNetV1", "ShuffleNetV2", "channel_shuffle"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups: ``(B, g·n, H, W)`` viewed as
    ``(B, g, n, H, W)``, the two group axes swapped, and flattened back."""
    if groups == 1:
        return x
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


# -------------------------------------------------------------------------- MobileNetV2


class _InvertedResidual(nn.Module):
    """1×1 expansion by ``expand``, 3×3 depthwise (carrying the stride), linear 1×1
    projection, each with BatchNorm; a residual sum when stride and width are unchanged.
    The expansion convolution is kept even when ``expand == 1``, as in the reference."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(ZooNet):
    """MobileNetV2 (Sandler et al., 2018) for 32×32 inputs: a stride-2 3×3 stem, seven
    groups of inverted residuals (``blocks.0`` ... ``blocks.6``; expansion ``expand``
    except 1 in the first; strides 1, 1, 2, 2, 1, 2, 1), a 1×1 conv to 1280 channels,
    global average pooling and a linear classifier (``classifier.0``).

    Channel widths are scaled by ``width`` (the distillation tables' "MobileNetV2" is
    ``width=0.5``, 812,836 parameters at 100 classes); the 1280-channel head is only
    widened, never narrowed.

    Taps at ``width=0.5``: ``blocks.1`` ``(12, 16, 16)``, ``blocks.2`` ``(16, 8, 8)``,
    ``blocks.4`` ``(48, 4, 4)``, ``blocks.6`` ``(160, 2, 2)``.
    """

    _SETTINGS: tuple[tuple[int, int, int], ...] = (  # (channels, repeats, stride)
        (16, 1, 1),
        (24, 2, 1),
        (32, 3, 2),
        (64, 4, 2),
        (96, 3, 1),
        (160, 3, 2),
        (320, 1, 1),
    )

    def __init__(self, width: float = 0.5, expand: int = 6, num_classes: int = 100) -> None:
        super().__init__()
        c_in = int(32 * width)
        self.conv1 = _conv_bn_relu(3, c_in, 3, stride=2)
        groups: list[nn.Module] = []
        widths: list[int] = []
        strides: list[int] = []
        total_stride = 2
        for i, (c, repeats, stride) in enumerate(self._SETTINGS):
            c_out = int(c * width)
            t = 1 if i == 0 else expand
            units = []
            for j in range(repeats):
                units.append(_InvertedResidual(c_in, c_out, stride if j == 0 else 1, t))
                c_in = c_out
            groups.append(nn.Sequential(*units))
            total_stride *= stride
            widths.append(c_out)
            strides.append(total_stride)
        self.blocks = nn.ModuleList(groups)
        head = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(c_in, head, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(head, num_classes))
        self._declare(*((f"blocks.{i}", widths[i], strides[i]) for i in (1, 2, 4, 6)))
        self._classifier_input = "conv2"  # (the 1×1 conv-BN-ReLU head)
        init_weights(self)
        nn.init.normal_(self.classifier[0].weight, std=0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)  # last: (B, 320·width, H/16, W/16)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 at width 0.5, expansion 6 (812,836 parameters at 100 classes)."""
    return MobileNetV2(0.5, 6, num_classes)


# ------------------------------------------------------------------------- ShuffleNetV1


class _ShuffleV1Unit(nn.Module):
    """ShuffleNet V1 unit: grouped 1×1 reduce to ``c_out / 4``, channel shuffle, 3×3
    depthwise (carrying the stride), grouped 1×1 expand, each with BatchNorm (ReLU after
    the first two, as in the reference). Stride 1 adds the input; stride 2 concatenates a
    3×3 average-pooled input, so the unit then emits ``c_out + c_in`` channels."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        mid = c_out // 4
        self.stride = stride
        self.first_groups = first_groups
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(ZooNet):
    """ShuffleNet V1 (Zhang et al., 2018) for 32×32 inputs: a 1×1 stem to 24 channels,
    three stages (``layer1``-``layer3``) of ``depths`` units whose first unit halves the
    resolution, global average pooling and a linear classifier (``linear``). The first
    1×1 convolution of the network is ungrouped.

    Taps with the default ``widths=(240, 480, 960)``: ``layer1`` ``(240, 16, 16)``,
    ``layer2`` ``(480, 8, 8)``, ``layer3`` ``(960, 4, 4)``.
    """

    def __init__(
        self,
        widths: Sequence[int] = (240, 480, 960),
        depths: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in = 24
        stages = []
        for k, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            units = []
            for i in range(depth):
                if i == 0:  # concatenation unit: the branch supplies width - c_in channels
                    first = 1 if k == 0 else groups
                    units.append(_ShuffleV1Unit(c_in, width - c_in, 2, groups, first))
                else:
                    units.append(_ShuffleV1Unit(width, width, 1, groups, groups))
            stages.append(nn.Sequential(*units))
            c_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_in, num_classes)
        self._declare(*((f"layer{k + 1}", w, 2 ** (k + 1)) for k, w in enumerate(widths)))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, widths[2], H/8, W/8)
        return self.linear(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


@register_model("shufflenetv1")
def shufflenetv1(num_classes: int = 100) -> ShuffleNetV1:
    """ShuffleNet V1, 3 groups, widths 240/480/960 (949,258 parameters at 100 classes)."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes)


# ------------------------------------------------------------------------- ShuffleNetV2


class _ShuffleV2Unit(nn.Module):
    """ShuffleNet V2 basic unit: split the channels in two halves, pass the first through
    and the second through 1×1-BN-ReLU, 3×3 depthwise-BN, 1×1-BN-ReLU; concatenate and
    shuffle with two groups."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, branch = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([keep, out], 1), 2)


class _ShuffleV2Down(nn.Module):
    """ShuffleNet V2 down-sampling unit: two stride-2 branches of ``c_out / 2`` channels
    each (3×3 depthwise-BN, 1×1-BN-ReLU; and 1×1-BN-ReLU, 3×3 depthwise-BN, 1×1-BN-ReLU),
    concatenated and shuffled with two groups."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(ZooNet):
    """ShuffleNet V2 (Ma et al., 2018) for 32×32 inputs: a 1×1 stem to 24 channels, three
    stages (``layer1``-``layer3``) of one down-sampling unit and ``depths`` basic units,
    a 1×1 conv-BN-ReLU to ``head`` channels, global average pooling and a linear
    classifier (``linear``). The defaults are the 1× network of the distillation tables.

    Taps with the defaults: ``layer1`` ``(116, 16, 16)``, ``layer2`` ``(232, 8, 8)``,
    ``layer3`` ``(464, 4, 4)``.
    """

    def __init__(
        self,
        widths: Sequence[int] = (116, 232, 464),
        depths: Sequence[int] = (3, 7, 3),
        head: int = 1024,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in = 24
        stages = []
        for width, depth in zip(widths, depths, strict=True):
            units = [_ShuffleV2Down(c_in, width), *(_ShuffleV2Unit(width) for _ in range(depth))]
            stages.append(nn.Sequential(*units))
            c_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(c_in, head, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head)
        self.relu2 = nn.ReLU()  # (a module, so that the head's output can be tapped)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(head, num_classes)
        self._declare(*((f"layer{k + 1}", w, 2 ** (k + 1)) for k, w in enumerate(widths)))
        self._classifier_input = "relu2"  # (the 1×1 conv-BN-ReLU head)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, widths[2], H/8, W/8)
        x = self.relu2(self.bn2(self.conv2(x)))  # (B, head, H/8, W/8)
        return self.linear(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


@register_model("shufflenetv2")
def shufflenetv2(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNet V2 1×, widths 116/232/464, head 1024 (1,355,528 parameters)."""
    return ShuffleNetV2((116, 232, 464), (3, 7, 3), 1024, num_classes)
