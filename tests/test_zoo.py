"""The CIFAR-100 distillation model zoo: published parameter counts, forward shapes, and
declared feature stages that probe to the declared channels and strides."""

from __future__ import annotations

import inspect

import pytest
import torch

from flowdistill.models import MODELS, create_model, list_models
from flowdistill.models.cifar import VGG, CifarResNet, WideResNet
from flowdistill.models.mobile import channel_shuffle
from flowdistill.taps import FeatureTaps

SMALL = {"small_cnn", "digits_teacher", "digits_student", "mlp"}
IMAGENET = {"resnet18", "resnet34", "resnet50"}
LANGUAGE = {"gpt"}  # token models: tests/test_gpt.py
ZOO = [name for name in list_models() if name not in SMALL | LANGUAGE]

# the CIFAR-100 tables of Tian et al. (2020) and torchvision's ImageNet ResNets
PARAMS = {
    "resnet8x4": (100, 1_233_540),
    "resnet32x4": (100, 7_433_860),
    "wrn_40_2": (100, 2_255_156),
    "wrn_16_2": (100, 703_284),
    "resnet56": (100, 861_620),
    "resnet20": (100, 278_324),
    "vgg13": (100, 9_462_180),
    "vgg8": (100, 3_965_028),
    "mobilenetv2": (100, 812_836),
    "shufflenetv1": (100, 949_258),
    "shufflenetv2": (100, 1_355_528),
    "resnet18": (1000, 11_689_512),
    "resnet34": (1000, 21_797_672),
    "resnet50": (1000, 25_557_032),
}


def test_zoo_is_registered() -> None:
    expected = {
        *(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)),
        "resnet8x4",
        "resnet32x4",
        *(f"wrn_{d}_{k}" for d in (16, 40) for k in (1, 2)),
        *(f"vgg{d}" for d in (8, 11, 13, 16, 19)),
        "mobilenetv2",
        "shufflenetv1",
        "shufflenetv2",
        *IMAGENET,
    }
    assert set(ZOO) == expected


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count(name: str) -> None:
    num_classes, count = PARAMS[name]
    model = create_model(name, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name", ZOO)
def test_default_num_classes(name: str) -> None:
    params = inspect.signature(MODELS[name]).parameters
    assert all(p.default is not inspect.Parameter.empty for p in params.values())
    assert params["num_classes"].default == (1000 if name in IMAGENET else 100)


@pytest.mark.parametrize("name", ZOO)
def test_forward_and_feature_taps(name: str) -> None:
    torch.manual_seed(0)
    size = 64 if name in IMAGENET else 32
    model = create_model(name, num_classes=7)
    info = model.feature_info()  # declared before any forward pass
    assert info and all(set(stage) == {"name", "channels", "stride"} for stage in info)
    strides = [stage["stride"] for stage in info]
    assert strides == sorted(strides)

    x = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert type(out) is torch.Tensor and out.shape == (2, 7)
    assert torch.isfinite(out).all()

    taps = FeatureTaps(model, [stage["name"] for stage in info])
    shapes = taps.probe(x)
    taps.remove()
    for stage in info:
        side = size // stage["stride"]
        assert shapes[stage["name"]] == (stage["channels"], side, side), stage


def test_feature_info_is_a_copy() -> None:
    model = create_model("resnet8")
    model.feature_info()[0]["channels"] = -1
    assert model.feature_info()[0] == {"name": "layer1", "channels": 16, "stride": 1}


def test_vgg_pools_before_last_block_on_64px_inputs() -> None:
    model = create_model("vgg8", num_classes=5).eval()
    taps = FeatureTaps(model, ["block3", "block4"])
    assert taps.probe(torch.randn(2, 3, 64, 64)) == {
        "block3": (512, 8, 8),
        "block4": (512, 4, 4),
    }


def test_channel_shuffle_interleaves_groups() -> None:
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    # shuffling with g groups is undone by shuffling with C / g groups
    y = torch.randn(2, 12, 3, 3)
    torch.testing.assert_close(channel_shuffle(channel_shuffle(y, 3), 4), y)


@pytest.mark.parametrize(
    "build",
    [
        lambda: CifarResNet(9, (16, 16, 32, 64)),
        lambda: WideResNet(12, 1),
        lambda: VGG(10),
    ],
    ids=["resnet", "wrn", "vgg"],
)
def test_invalid_depth_is_rejected(build) -> None:
    with pytest.raises(ValueError, match="depth"):
        build()
