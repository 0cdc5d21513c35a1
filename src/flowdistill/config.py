"""Typed run configurations, read from YAML with ``key=value`` overrides and validated.

A wrong key or value fails before anything trains, with a message that names it::

    >>> load_config({"optim": {"lrr": 0.1}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    flowdistill.errors.ConfigError: unknown key 'optim.lrr' (did you mean 'optim.lr'?)...
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def keyword_checked(cls: type) -> type:
    """A dataclass whose constructor names an unknown keyword as a :class:`ConfigError`
    with the closest field, rather than Python's bare ``TypeError``."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{cls.__name__} has no field {unknown[0]!r}{hint}; its fields: {', '.join(names)}"
            )
        init(self, *args, **kwargs)

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
]


@keyword_checked
@dataclass
class ModelConfig:
    """A zoo model name or ``package.module:function``, its kwargs, an optional checkpoint,
    and ``output``: which element of the model's output holds its logits, for a model that
    returns several tensors (an index into a tuple or a key; by default the first tensor,
    or a dict's ``logits`` entry)."""

    name: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    output: int | str | None = None


@keyword_checked
@dataclass
class DataConfig:
    """``digits`` (embedded), ``npz`` (``path``), ``idx`` (the four IDX file paths),
    ``text`` (``path`` to a plain-text corpus, read as next-character windows of
    ``block_size`` characters: its last ``test_fraction`` is the held-out split, and the
    last ``val_fraction`` of the rest the validation split that epochs are chosen on) or
    ``lines`` (``path`` to a corpus of documents, one per line, shuffled by ``split_seed``
    into those fractions, each padded on ``padding_side`` to ``block_size`` characters
    with an attention mask; see :func:`flowdistill.data.line_splits`)."""

    name: str = "digits"
    path: str | None = None
    train_images: str | None = None
    train_labels: str | None = None
    test_images: str | None = None
    test_labels: str | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0
    batch_size: int = 64
    block_size: int = 64
    padding_side: str = "right"

    def validate(self) -> None:
        if self.name not in ("digits", "npz", "idx", "text", "lines"):
            raise ConfigError(
                f"data.name must be 'digits', 'npz', 'idx', 'text' or 'lines', got {self.name!r}"
            )
        if self.padding_side not in ("right", "left"):
            raise ConfigError(
                f"data.padding_side must be 'right' or 'left', got {self.padding_side!r}"
            )
        if self.name in ("npz", "text", "lines") and not self.path:
            raise ConfigError(f"data.path is required when data.name is {self.name!r}")
        if self.block_size < 1:
            raise ConfigError(f"data.block_size must be >= 1, got {self.block_size}")
        if self.split_seed < 0:
            raise ConfigError(f"data.split_seed must be >= 0, got {self.split_seed}")
        if self.name == "idx":
            for key in ("train_images", "train_labels", "test_images", "test_labels"):
                if not getattr(self, key):
                    raise ConfigError(f"data.{key} is required when data.name is 'idx'")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 < self.test_fraction < 1.0 - self.val_fraction:
            raise ConfigError(
                f"data.test_fraction must be in (0, 1 - val), got {self.test_fraction}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")


@keyword_checked
@dataclass
class OptimConfig:
    """Optimizer (``sgd``/``adamw``) and schedule (``cosine``/``step``/``constant``)."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1

    def validate(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise ConfigError(f"optim.name must be 'sgd' or 'adamw', got {self.name!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ConfigError(
                f"optim.schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}"
            )
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"optim.lr must be positive and finite, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.milestones):
            raise ConfigError(f"optim.milestones must be epochs >= 1, got {list(self.milestones)}")
        if self.milestones and self.schedule != "step":
            raise ConfigError(
                f"optim.milestones {list(self.milestones)} are for schedule 'step'; the "
                f"{self.schedule!r} schedule would ignore them"
            )
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"optim.gamma must be in (0, 1], got {self.gamma}")
        if self.schedule == "step" and not self.milestones:
            raise ConfigError(
                "optim.schedule='step' needs optim.milestones (the epochs where the rate "
                "decays); without them the rate would stay constant"
            )


@keyword_checked
@dataclass
class TrainConfig:
    """Epochs, seed, determinism, mixed precision (CUDA only), device, progress bar,
    ``augment_padding``: when > 0, every training batch of images gets the standard random
    crop (zero padding of that many pixels) and horizontal flip, on its device, and
    ``select_by``: which validation number picks the best epoch (``"val_acc"``, highest, or
    ``"val_loss"``, lowest: the choice for language models).

    The fast path, for GPUs: ``channels_last`` stores image batches and every 4-D weight in
    NHWC order (faster convolutions under bf16); ``compile`` wraps the training step's
    forward in :func:`torch.compile` (``compile_mode`` ``"default"``, ``"reduce-overhead"``
    or ``"max-autotune"``); ``data_on_device`` keeps the whole dataset on the training
    device, batches and augmentation included (``None``: on CUDA only). The loop waits for the
    device only every ``sync_every`` steps, to check that the loss is finite and to update
    the progress bar, and once at the epoch's end (``None``: every step on the CPU, where
    waiting costs nothing, every 50 on CUDA); on CUDA the optimizers are the fused ones and
    step times come from CUDA events. ``cache_teacher_outputs`` computes the teacher's outputs on
    the training inputs once before training (the frozen teacher in eval mode gives each
    sample the same outputs every epoch, when no augmentation changes the inputs), so that
    the training steps do not run the teacher; they are held in memory beside the data,
    every tap of every training sample."""

    epochs: int = 20
    seed: int = 0
    deterministic: bool = False
    amp: bool = True
    device: str = "auto"
    progress: bool = True
    grad_clip: float | None = None
    augment_padding: int = 0
    select_by: str = "val_acc"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    data_on_device: bool | None = None
    sync_every: int | None = None
    cache_teacher_outputs: bool = False

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.augment_padding < 0:
            raise ConfigError(f"train.augment_padding must be >= 0, got {self.augment_padding}")
        if self.cache_teacher_outputs and self.augment_padding:
            raise ConfigError(
                "train.cache_teacher_outputs keeps the teacher's outputs on the training inputs as "
                "they are, but train.augment_padding changes them every step: set one of them"
            )
        if self.device != "auto" and not re.fullmatch(r"(cpu|mps|cuda)(:\d+)?", self.device):
            raise ConfigError(
                f"train.device must be 'auto', 'cpu', 'mps' or 'cuda[:i]', got {self.device!r}"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"train.grad_clip must be positive, got {self.grad_clip}")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune"):
            raise ConfigError(
                "train.compile_mode must be 'default', 'reduce-overhead' or 'max-autotune', "
                f"got {self.compile_mode!r}"
            )
        if self.sync_every is not None and self.sync_every < 1:
            raise ConfigError(f"train.sync_every must be >= 1, got {self.sync_every}")
        if self.select_by not in ("val_acc", "val_loss"):
            raise ConfigError(
                f"train.select_by must be 'val_acc' or 'val_loss', got {self.select_by!r}"
            )


@keyword_checked
@dataclass
class RunConfig:
    """One training run: ``train-teacher`` trains ``teacher``; ``distill`` trains ``student``."""

    method: str = "kd"
    method_options: dict[str, Any] = field(default_factory=dict)
    teacher: ModelConfig | None = None
    student: ModelConfig = field(default_factory=lambda: ModelConfig("digits_student"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/run"

    def validate(self) -> None:
        from .distillers import get_method

        get_method(self.method)  # raises UnknownMethodError listing the registered ones
        for role, model in (("teacher", self.teacher), ("student", self.student)):
            if model is not None and not model.name:
                raise ConfigError(
                    f"{role}.name is required: a zoo model (flowdistill.models.list_models()) "
                    "or your own factory as 'package.module:function'"
                )
        for part in (self.data, self.optim, self.train):
            part.validate()


# ---------------------------------------------------------------------------- parsing
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"invalid value for {key!r}: {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key!r} must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key!r} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key!r} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key!r}: unsupported type {_type_name(tp)}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown key {prefix + str(key)!r}{hint}; valid keys: "
                + ", ".join(prefix + n for n in names)
            )
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` pairs (values parsed as YAML) into a nested dict."""
    values = dict(values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse the value of override {item!r}: {err}") from None
        node = values
        parts = dotted.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is not None and not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: {where!r} must be a mapping, got {child!r}")
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return values


def load_config(
    source: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    cls: type = RunConfig,
) -> Any:
    """A validated ``cls`` from a YAML file (or a dict) plus ``key=value`` overrides."""
    if source is None:
        values: dict[str, Any] = {}
    elif isinstance(source, dict):
        values = source
    else:
        path = Path(source)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        if path.suffix.lower() in (".toml", ".ini", ".cfg"):
            raise ConfigError(
                f"config file {path}: configs are YAML (or JSON), not {path.suffix[1:]}; "
                "write it as a .yaml file"
            )
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping at its top level")
    values = apply_overrides(values, list(overrides or []))
    config = _build(cls, values)
    if hasattr(config, "validate"):
        config.validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain, JSON- and YAML-serialisable dict of a config dataclass."""
    return dataclasses.asdict(config)


#: settings of ``train`` that say how a run executes, not what it trains: a resumed run may
#: change them (more epochs extend a run; fewer are refused by the checkpoint itself)
_EXECUTION = frozenset(
    {"epochs", "progress", "device", "amp", "channels_last", "compile", "compile_mode",
     "data_on_device", "sync_every", "deterministic", "cache_teacher_outputs"}
)  # fmt: skip


def run_identity(config: RunConfig, teacher_mode: bool = False) -> dict[str, Any]:
    """The settings of a run that decide what it trains (method and options, models, data,
    optimizer, seed, ...): a checkpoint is resumed only under the same ones. Training the
    teacher (``teacher_mode``) depends on neither the method nor the student."""
    values = config_to_dict(config)
    drop = ("out_dir", "method", "method_options", "student") if teacher_mode else ("out_dir",)
    for key in drop:
        values.pop(key, None)
    values["train"] = {k: v for k, v in values["train"].items() if k not in _EXECUTION}
    if values["data"].get("name") != "lines":  # (it pads nothing else: runs of other data
        values["data"].pop("padding_side", None)  # saved before it existed still resume)
    return values
