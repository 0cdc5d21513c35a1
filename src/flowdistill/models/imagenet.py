"""ImageNet-style ResNet-18/34/50 (He et al., 2016) in the common torchvision layout.

A 7×7 stride-2 stem with 3×3 max-pooling, four stages at strides 4, 8, 16, 32, adaptive
average pooling and a linear classifier; bottleneck blocks carry their stride on the 3×3
convolution. Parameter counts and names match torchvision's ``resnet18/34/50`` (11,689,512,
21,797,672 and 25,557,032 at 1000 classes), so its state dicts load key by key. Adaptive
pooling lets them run on smaller images too (64×64 gives a 2×2 last stage).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .cifar import BasicBlock, Bottleneck, ZooNet, init_weights, resnet_stage
from .registry import register_model

__all__ = ["ResNet"]


class ResNet(ZooNet):
    """ResNet with ``block`` units and ``depths`` blocks per stage.

    Taps (strides relative to the input): ``layer1`` ``(64e, H/4)``, ``layer2``
    ``(128e, H/8)``, ``layer3`` ``(256e, H/16)``, ``layer4`` ``(512e, H/32)``, where
    ``e`` is the block's expansion (1 basic, 4 bottleneck); their pre-activation features:
    ``layer<k>.<last block>.preact``.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: Sequence[int],
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in, stages = 64, []
        for k, depth in enumerate(depths):
            planes = 64 * 2**k
            stages.append(resnet_stage(block, c_in, planes, depth, 1 if k == 0 else 2))
            c_in = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self._declare(*((f"layer{k + 1}", 64 * 2**k * block.expansion, 4 * 2**k) for k in range(4)))
        self._preact = {f"layer{k}": f"layer{k}.{d - 1}.preact" for k, d in enumerate(depths, 1)}
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512e, H/32, W/32)
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


@register_model("resnet18")
def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18: basic blocks, 2-2-2-2 (11,689,512 parameters at 1000 classes)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model("resnet34")
def resnet34(num_classes: int = 1000) -> ResNet:
    """ResNet-34: basic blocks, 3-4-6-3 (21,797,672 parameters at 1000 classes)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes)


@register_model("resnet50")
def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50: bottleneck blocks, 3-4-6-3 (25,557,032 parameters at 1000 classes)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)
