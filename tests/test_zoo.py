"""The CIFAR-100 distillation model zoo: published parameter counts, forward shapes, and
declared feature stages that probe to the declared channels and strides."""

from __future__ import annotations

import inspect

import pytest
import torch

from flowdistill.models import MODELS, create_model, feature_stages, list_models
from flowdistill.models.cifar import VGG, CifarResNet, WideResNet
from flowdistill.models.imagenet import ResNet
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


@pytest.mark.parametrize("name", ZOO)
def test_pre_activation_taps(name: str) -> None:
    """Each declared pre-activation tap holds its stage's feature before the stage's last
    ReLU (ResNets, VGGs: the ReLU of it is the stage's output) or, for the pre-activation
    wide ResNets, the BatchNorm that the next ReLU follows applied to the stage's output."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    preact = model.preact_taps()
    assert bool(preact) == isinstance(model, (CifarResNet, WideResNet, VGG, ResNet))
    if not preact:
        return
    stages = [stage["name"] for stage in model.feature_info()]
    assert sorted(preact) == sorted(stages)
    for m in model.modules():  # running statistics other than (0, 1): BN is not identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    size = 64 if name in IMAGENET else 32
    taps = FeatureTaps(model, [*stages, *preact.values()])
    with torch.no_grad():
        _, feats = taps(torch.randn(2, 3, size, size))
    taps.remove()
    for stage, path in preact.items():
        before, after = feats[path], feats[stage]
        assert before.shape == after.shape, stage
        assert (before < 0).any(), stage  # values a ReLU has not yet clipped
        if isinstance(model, WideResNet):
            with torch.no_grad():
                expected = model.get_submodule(path)(after)
            torch.testing.assert_close(before, expected)
        else:
            torch.testing.assert_close(torch.relu(before), after)


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


# ------------------------------------------------------------------- declared stages of any model
class _TimmStyleNet(torch.nn.Module):
    """A stand-in written to timm's documented convention: a ``feature_info`` *list* of
    ``{"module", "num_chs", "reduction"}`` entries, set in ``__init__``."""

    def __init__(self, width: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.stages = torch.nn.Sequential(
            torch.nn.Conv2d(width, width, 3, padding=1),
            torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        )
        self.head = torch.nn.Linear(2 * width, num_classes)
        self.feature_info = [
            {"module": "stem", "num_chs": width, "reduction": 2},
            {"module": "stages.1", "num_chs": 2 * width, "reduction": 4},
        ]

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def _check_stages_probe(model, size):
    stages = feature_stages(model)
    taps = FeatureTaps(model, [s["name"] for s in stages])
    shapes = taps.probe(torch.randn(2, 3, size, size))
    taps.remove()
    for stage in stages:
        side = size // stage["stride"]
        assert shapes[stage["name"]] == (stage["channels"], side, side), stage
    return stages


def test_feature_stages_of_zoo_and_timm_style_models():
    import flowdistill

    zoo = create_model("resnet8", num_classes=5)
    assert feature_stages(zoo) == zoo.feature_info()
    teacher, student = _TimmStyleNet(16), _TimmStyleNet(4)
    stages = _check_stages_probe(student, 16)
    assert stages == [
        {"name": "stem", "channels": 4, "stride": 2},
        {"name": "stages.1", "channels": 8, "stride": 4},
    ]
    # the declared stages serve as taps of a feature method, which trains a step
    deepest = lambda m: [feature_stages(m)[-1]["name"]]  # noqa: E731
    x = torch.randn(4, 3, 16, 16)
    d = flowdistill.make_distiller(
        "flowdistill", teacher, student, example_input=x,
        student_taps=deepest(student), teacher_taps=deepest(teacher),
    )  # fmt: skip
    assert d.student_shapes["stages.1"] == (8, 4, 4) and d.teacher_shapes["stages.1"] == (32, 4, 4)
    out = d(x, torch.tensor([0, 1, 2, 3]))
    out["loss"].backward()
    assert "feature" in out and student.stem.weight.grad.abs().sum() > 0


def test_feature_stages_refuses_a_model_without_them():
    from flowdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="Linear declares no feature stages"):
        feature_stages(torch.nn.Linear(2, 2))
    bad = _TimmStyleNet()
    bad.feature_info = [{"module": "stem", "num_chs": 8}]
    with pytest.raises(ConfigError, match=r"without \['reduction'\]"):
        feature_stages(bad)


def test_timm_models_as_teacher_and_student():
    """timm models built through a config's factory path, their declared stages as taps."""
    pytest.importorskip("timm")
    import flowdistill
    from flowdistill.models import build_model

    teacher = build_model("timm:create_model", model_name="resnet18", num_classes=10)
    student = build_model("timm:create_model", model_name="resnet10t", num_classes=10)
    t_stages, s_stages = _check_stages_probe(teacher, 64), _check_stages_probe(student, 64)
    x = torch.randn(2, 3, 64, 64)
    d = flowdistill.make_distiller(
        "flowdistill", teacher, student, example_input=x,
        student_taps=[s_stages[-1]["name"]], teacher_taps=[t_stages[-1]["name"]],
    )  # fmt: skip
    out = d(x, torch.tensor([1, 2]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and "feature" in out


@pytest.mark.parametrize("name", ZOO)
def test_the_declared_classifier_input_is_what_the_classifier_reads(name: str) -> None:
    """``classifier_input()`` names the module whose output, average-pooled, is exactly the
    input of the model's last linear layer (caught there by a pre-hook): FM-KT's learned
    head reads that feature in place of the classifier."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen = {}
    handle = classifier.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    taps = FeatureTaps(model, [model.classifier_input()])
    with torch.no_grad():
        _, feats = taps(torch.randn(2, 3, 32, 32))
    handle.remove()
    pooled = feats[model.classifier_input()].mean(dim=(2, 3))
    torch.testing.assert_close(pooled, seen["x"])
