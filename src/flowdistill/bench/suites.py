"""Benchmark suites: data, a teacher/student pair and a training recipe each."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ModelConfig, OptimConfig
from ..data.datasets import (
    Splits,
    cifar_splits,
    digits_splits,
    idx_holdout_splits,
    npz_splits,
    npz_subset_splits,
)
from ..data.readers import read_text
from ..data.text import CharTokenizer, char_splits
from ..errors import ConfigError, DataError
from ..models import create_model

__all__ = ["STANDARD_PAIRS", "SUITES", "Suite", "data_dir", "get_suite", "register_suite"]


def data_dir() -> str:
    """Folder of the shared datasets: ``$FLOWDISTILL_DATA``, else ``../shared/data``."""
    return os.environ.get("FLOWDISTILL_DATA", os.path.join("..", "shared", "data"))


def _shakespeare_text() -> str:
    path = os.path.join(data_dir(), "tinyshakespeare", "input.txt")
    if not os.path.isfile(path):
        raise DataError(
            f"the shakespeare-char suite reads {path}, which is absent; set FLOWDISTILL_DATA "
            "to the folder holding tinyshakespeare/input.txt"
        )
    return read_text(path)


def _shakespeare(block_size: int = 64, select_fraction: float = 0.0) -> Splits:
    data, _ = char_splits(
        _shakespeare_text(), block_size=block_size, select_fraction=select_fraction
    )
    return data


def _shakespeare_decode(ids: list[int]) -> str:
    return CharTokenizer.from_text(_shakespeare_text()).decode(ids)


def _lm_method_options(student_tap: str, teacher_tap: str) -> dict[str, dict[str, Any]]:
    """Options of the language-model suites: the hidden states to pair, temperature 1 for
    every method that softens logits (chosen for ``kd`` on the selection split of
    ``shakespeare-char``: ``benchmarks/shakespeare-char/tune_kd.json``), and per-position
    flow fields (attention across positions would let a position see later tokens, and
    FM-KT's module stays in the deployed model). FlowDistill matches its hidden states
    through the flow but not its logits (``logit_weight=0``, chosen on the same split:
    ``tune_flowdistill.json``); its ablation without the flow runs with the same options."""
    flowdistill = {"field": "pointwise", "hidden": 64, "temperature": 1.0, "logit_weight": 0.0}
    return {
        "_features": {"student_taps": [student_tap], "teacher_taps": [teacher_tap]},
        "kd": {"temperature": 1.0},
        "fmkt": {"encoder": "mlp", "temperature": 1.0},
        "flowdistill": flowdistill,
        "flowdistill-noinv": {"temperature": 1.0, "logit_weight": 0.0},
    }


def _cifar10_cpu() -> Splits:
    path = os.path.join(data_dir(), "cifar10.npz")
    if not os.path.isfile(path):
        raise DataError(
            f"the cifar10-cpu suite reads {path}, which is absent; set FLOWDISTILL_DATA to "
            "the folder holding cifar10.npz"
        )
    cache = os.path.join("runs", "cache", "data")
    return npz_subset_splits(path, train_size=20000, val_size=5000, seed=0, cache_dir=cache)


def _mnist_cpu() -> Splits:
    """MNIST's official test files alone (the training images are not at hand): their
    10,000 images cut 60/20/20 into train/validation/test (stratified, seed 0)."""
    folder = os.path.join(data_dir(), "mnist")
    images = os.path.join(folder, "t10k-images-idx3-ubyte.gz")
    labels = os.path.join(folder, "t10k-labels-idx1-ubyte.gz")
    missing = [f for f in (images, labels) if not os.path.isfile(f)]
    if missing:
        raise DataError(
            f"the mnist-cpu suite reads {' and '.join(missing)}, absent; set FLOWDISTILL_DATA "
            "to the folder holding mnist/"
        )
    return idx_holdout_splits(images, labels, fractions=(0.6, 0.2, 0.2), seed=0)


def _standard_cifar(classes: int) -> Splits:
    """The user's CIFAR-10/100 in the official python-pickle layout under
    :func:`data_dir` (``cifar-10-batches-py`` / ``cifar-100-python``; for CIFAR-10 the
    shared ``cifar10.npz`` also serves): 45,000 training and 5,000 validation images (a
    stratified, seeded split of the official training set) and the official 10,000 test
    images, standardised per channel with the training split's statistics."""
    name = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    folder = os.path.join(data_dir(), name)
    if os.path.isdir(folder):
        return cifar_splits(folder, val_fraction=0.1, seed=0)
    npz = os.path.join(data_dir(), "cifar10.npz")
    if classes == 10 and os.path.isfile(npz):
        return npz_splits(npz, val_fraction=0.1, seed=0)
    also = f" (or {npz})" if classes == 10 else ""
    raise DataError(
        f"the cifar{classes} suites read the official python version of CIFAR-{classes} "
        f"from {folder}{also}, which is absent; set FLOWDISTILL_DATA to the folder that "
        f"holds {os.path.basename(folder)}"
    )


#: The teacher → student pairs of the standard CIFAR-100 distillation tables (same
#: architecture family, so that both share their stage names): the stages from shallow to
#: deep, and the pooled feature (the global-average-pooling module, a 1×1 map).
STANDARD_PAIRS = {
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4", ("layer1", "layer2", "layer3"), "avgpool"),
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2", ("block1", "block2", "block3"), "avgpool"),
    "resnet56-resnet20": ("resnet56", "resnet20", ("layer1", "layer2", "layer3"), "avgpool"),
    "vgg13-vgg8": ("vgg13", "vgg8", ("block1", "block2", "block3", "block4"), "pool4"),
}

#: Per-pair loss weights of the authors' published CIFAR-100 runs where they differ from a
#: method's defaults: ReviewKD's (dvlab-research/ReviewKD, CIFAR-100/script/reviewKD.sh;
#: vgg13 → vgg8 is not among them: mdistiller's 5.0) and KD++'s (ND's train_cifar.sh;
#: wrn_40_2 → wrn_16_2 is not among them: its wrn_40_2 → wrn_40_1 weights).
STANDARD_WEIGHTS = {
    "resnet32x4-resnet8x4": {"reviewkd": {"review_weight": 5.0},
                             "nd": {"kd_weight": 3.5, "nd_weight": 2.0}},
    "wrn_40_2-wrn_16_2": {"reviewkd": {"review_weight": 5.0},
                          "nd": {"kd_weight": 1.0, "nd_weight": 1.5}},
    "resnet56-resnet20": {"reviewkd": {"review_weight": 0.6},
                          "nd": {"kd_weight": 1.0, "nd_weight": 2.0}},
    "vgg13-vgg8": {"reviewkd": {"review_weight": 5.0}},
}  # fmt: skip


def standard_method_options(pair: str) -> dict[str, dict[str, Any]]:
    """The feature taps of each method on a standard pair, as the authors' CIFAR code takes
    them (RepDistiller, mdistiller): FitNet the second stage (its hint layer), AT and VID
    every stage, RKD, PKT and CRD the pooled feature, ReviewKD every stage and the pooled
    feature (the teacher's stages before their last ReLU, its ``preact=True`` features,
    :meth:`~flowdistill.models.cifar.ZooNet.preact_taps`), SP and every other feature
    method the last stage; plus the per-pair weights of :data:`STANDARD_WEIGHTS`."""
    teacher, _, stages, pooled = STANDARD_PAIRS[pair]
    with torch.device("meta"):  # (the module layout only: no weights)
        preact = create_model(teacher).preact_taps()

    def taps(names) -> dict[str, list[str]]:
        return {"student_taps": list(names), "teacher_taps": list(names)}

    options: dict[str, dict[str, Any]] = {
        "_features": taps([stages[-1]]),
        "fitnet": taps([stages[1]]),
        "at": taps(stages),
        "vid": taps(stages),
        "rkd": taps([pooled]),
        "pkt": taps([pooled]),
        "crd": taps([pooled]),
        "reviewkd": {
            "student_taps": [*stages, pooled],
            "teacher_taps": [*(preact[stage] for stage in stages), pooled],
        },
    }
    for method, weights in STANDARD_WEIGHTS[pair].items():
        options[method] = {**options.get(method, {}), **weights}
    return options


def _standard_recipe() -> OptimConfig:
    """The standard recipe: SGD (momentum 0.9, weight decay 5e-4), lr 0.05, ×0.1 at epochs
    150, 180 and 210 of 240."""
    return OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="step",
                       milestones=[150, 180, 210], gamma=0.1)  # fmt: skip


@dataclass
class Suite:
    """A side-by-side comparison: every method distils ``teacher`` into ``student`` on the
    same data, recipe and seeds. ``method_options`` holds per-method defaults for this pair
    (feature taps, for instance)."""

    name: str
    description: str
    load_data: Callable[[], Splits]
    teacher: ModelConfig
    student: ModelConfig
    teacher_optim: OptimConfig
    teacher_epochs: int
    optim: OptimConfig
    epochs: int
    batch_size: int = 64
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str = "test_acc"
    higher_is_better: bool = True
    #: ``"classification"``, or ``"lm"``: causal language models over the data's tokens,
    #: scored in bits per token on the held-out split at the last epoch
    task: str = "classification"
    #: for ``task="lm"``: ids -> text, for the generated samples of ``results.md``
    decode: Callable[[list[int]], str] | None = None
    #: for ``task="lm"``: the data hold a selection split apart from the held-out one, so
    #: the table also reports each run at its best-validation epoch
    select_split: bool = False
    #: names the data layout in the teacher's cache key (for suites whose splits changed)
    data_key: str = ""
    #: > 0: the standard random crop (zero padding of that many pixels) and horizontal
    #: flip of every training batch, teacher's and students' (``TrainConfig.augment_padding``)
    augment_padding: int = 0
    #: further ``TrainConfig`` fields of every run, teacher's included (the fast path:
    #: ``{"channels_last": True, "compile": True}``); speed only, not part of a run's key
    train_options: dict[str, Any] = field(default_factory=dict)
    #: the methods ``flowdistill bench`` runs when ``--methods`` is left out: the comparison
    #: the suite is sized for; empty: every registered method the suite's models and data
    #: admit (what ``--methods all`` runs)
    methods: tuple[str, ...] = ()


SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    SUITES[suite.name] = suite
    return suite


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        close = difflib.get_close_matches(name, SUITES, n=2)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(f"unknown suite {name!r}{hint}; suites: {', '.join(sorted(SUITES))}")
    return SUITES[name]


register_suite(
    Suite(
        name="digits",
        description="scikit-learn 8×8 digits (embedded): CNN teacher (8.3k params) → "
        "CNN student (745 params), 60/20/20 seeded split",
        load_data=digits_splits,
        teacher=ModelConfig("digits_teacher"),
        student=ModelConfig("digits_student"),
        teacher_optim=OptimConfig(lr=0.05, schedule="cosine"),
        teacher_epochs=30,
        optim=OptimConfig(lr=0.05, schedule="cosine"),
        epochs=20,
        batch_size=64,
        method_options={
            "_features": {"student_taps": ["stage2"], "teacher_taps": ["stage2"]},
        },
    )
)


#: the default comparison of a suite too slow for every method in half an hour on two CPU
#: cores: the student alone, KD, FlowDistill and its flow peer FM-KT (DiffKD's training
#: step costs about twice FlowDistill's there; the README's cifar10-cpu tables hold it)
CPU_COMPARISON = ("student", "kd", "fmkt", "flowdistill")
#: the default comparison of the language-model suites
LM_COMPARISON = ("student", "kd", "reverse_kl", "taid", "fmkt", "flowdistill")


def _cpu_cnn_suite(
    name: str,
    description: str,
    load_data: Callable[[], Splits],
    teacher: list,
    student: list,
    methods: tuple[str, ...] = (),
) -> Suite:
    """A CPU image suite: :class:`~flowdistill.models.small.SmallCNN` teacher and student of
    the given stage widths, 15 teacher and 10 student epochs of SGD at lr 0.1 with a cosine
    schedule, batch 128, the middle stage as the feature tap; ``methods``: its default
    comparison (every method it admits when empty)."""
    return Suite(
        name=name,
        description=description,
        load_data=load_data,
        teacher=ModelConfig("small_cnn", kwargs={"widths": teacher}),
        student=ModelConfig("small_cnn", kwargs={"widths": student}),
        teacher_optim=OptimConfig(lr=0.1, schedule="cosine"),
        teacher_epochs=15,
        optim=OptimConfig(lr=0.1, schedule="cosine"),
        epochs=10,
        batch_size=128,
        method_options={
            "_features": {"student_taps": ["stage2"], "teacher_taps": ["stage2"]},
        },
        methods=methods,
    )


register_suite(
    _cpu_cnn_suite(
        "cifar10-cpu",
        "CIFAR-10 (JPEG-decoded copy): a stratified 20,000-image training subset, 5,000 "
        "validation images, the full 10,000-image test split; CNN teacher (94.8k params) → "
        "CNN student (6.4k params); sized for 2 CPU cores",
        _cifar10_cpu,
        teacher=[32, 64, 128],
        student=[8, 16, 32],
        methods=CPU_COMPARISON,
    )
)

register_suite(
    _cpu_cnn_suite(
        "mnist-cpu",
        "MNIST's official 10,000 test images (the training images are not at hand), cut "
        "60/20/20 into train/validation/test (stratified, seeded); CNN teacher (24.1k "
        "params) → CNN student (1.0k params); sized for 2 CPU cores",
        _mnist_cpu,
        teacher=[16, 32, 64],
        student=[4, 8, 8],
    )
)

register_suite(
    Suite(
        name="shakespeare-char",
        description="Tiny Shakespeare, characters (65), first 90% trains (its last 5% held "
        "back to choose on), last 10% is held out and scored; "
        "64-character windows; GPT teacher (4 layers, width 128) → GPT student (2 layers, "
        "width 48), about 13× fewer parameters; sized for 2 CPU cores",
        load_data=lambda: _shakespeare(64, select_fraction=0.05),
        teacher=ModelConfig(
            "gpt", kwargs={"block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128}
        ),
        student=ModelConfig(
            "gpt", kwargs={"block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 48}
        ),
        teacher_optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=0.01, schedule="cosine"),
        teacher_epochs=4,
        optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=0.01, schedule="cosine"),
        epochs=2,
        batch_size=32,
        method_options=_lm_method_options("blocks.1", "blocks.3"),
        metric="val_bpc",
        higher_is_better=False,
        task="lm",
        decode=_shakespeare_decode,
        select_split=True,
        data_key="select-0.05",
        methods=LM_COMPARISON,
    )
)

register_suite(
    Suite(
        name="shakespeare-char-gpu",
        description="Tiny Shakespeare, characters, 90/10 (the last 5% of the 90 held back to "
        "choose on), 256-character windows: the usual "
        "6-layer, 384-wide character GPT (dropout 0.2) as teacher → a 3-layer, 160-wide GPT, "
        "about 11× fewer parameters; for a GPU",
        load_data=lambda: _shakespeare(256, select_fraction=0.05),
        teacher=ModelConfig(
            "gpt",
            kwargs={"block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2},
        ),
        student=ModelConfig(
            "gpt", kwargs={"block_size": 256, "n_layer": 3, "n_head": 4, "n_embd": 160}
        ),
        teacher_optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, schedule="cosine"),
        teacher_epochs=10,
        optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=0.1, schedule="cosine"),
        epochs=5,
        batch_size=64,
        method_options=_lm_method_options("blocks.2", "blocks.5"),
        metric="val_bpc",
        higher_is_better=False,
        task="lm",
        decode=_shakespeare_decode,
        select_split=True,
        data_key="select-0.05",
        methods=LM_COMPARISON,
    )
)


for _classes in (100, 10):
    for _pair, (_teacher, _student, _, _) in STANDARD_PAIRS.items():
        _default = _pair == "resnet32x4-resnet8x4"
        register_suite(
            Suite(
                name=f"cifar{_classes}" + ("" if _default else f"-{_pair}"),
                description=f"CIFAR-{_classes}, the standard recipe (240 epochs, SGD lr 0.05 "
                "×0.1 at 150/180/210, batch 64, weight decay 5e-4, random crop and flip): "
                f"{_teacher} → {_student}; 45,000/5,000 train/validation split of the official "
                "training set, the official test set; reads the official python version "
                "under FLOWDISTILL_DATA; for a GPU (--epochs, --teacher-epochs and --budget "
                "shorten it)",
                load_data=lambda c=_classes: _standard_cifar(c),
                teacher=ModelConfig(_teacher),
                student=ModelConfig(_student),
                teacher_optim=_standard_recipe(),
                teacher_epochs=240,
                optim=_standard_recipe(),
                epochs=240,
                batch_size=64,
                method_options=standard_method_options(_pair),
                augment_padding=4,
            )
        )
