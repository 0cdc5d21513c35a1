"""The training loop behind the CLI, the benchmarks and the Python API."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import _EXECUTION, OptimConfig, TrainConfig, _build
from ..data.datasets import Batches, Split, Splits, random_crop_flip
from ..data.inputs import Inputs, check_inputs, input_tensors, move, num_rows, take, token_ids
from ..distillers.base import IGNORE_INDEX, Distiller, padding_refusal
from ..errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FlowdistillError,
    NonFiniteLossError,
    ShapeMismatchError,
)
from ..taps import LOGITS
from . import distributed
from .checkpoint import (
    atomic_write_text,
    load_checkpoint,
    pack_optimizer,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unpack_optimizer,
)

__all__ = ["FitResult", "evaluate", "fit", "lr_factor", "resolve_device", "seed_everything"]

CHECKPOINT = "last.safetensors"
BEST = "best.safetensors"


@dataclass
class FitResult:
    """What a run reports. Test accuracy and test loss (mean cross-entropy, nats per
    prediction) are given at the last epoch and at the best-*validation* epoch (highest
    validation accuracy, or lowest validation loss with ``train.select_by="val_loss"``); the
    test split never chooses anything. For token targets ``(B, T)`` accuracy and loss are per
    counted token."""

    test_acc_last: float
    test_acc_best_val: float
    best_val_acc: float
    best_val_epoch: int
    mean_step_seconds: float
    extra_params: int
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    test_loss_last: float = float("nan")
    test_loss_best_val: float = float("nan")
    best_val_loss: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available on this machine")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def lr_factor(optim: OptimConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Learning-rate multiplier at global ``step``: linear warm-up, then the schedule."""
    warmup = optim.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    epoch = step / steps_per_epoch
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "step":
        return optim.gamma ** sum(epoch >= m for m in optim.milestones)
    total = max(epochs * steps_per_epoch - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / total))


def _optimizer(
    params: list[torch.nn.Parameter], optim: OptimConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD or AdamW; ``fused`` (on CUDA) takes the single-kernel implementation."""
    extra = {"fused": True} if fused else {}
    if optim.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=optim.lr,
            momentum=optim.momentum,
            weight_decay=optim.weight_decay,
            nesterov=optim.nesterov and optim.momentum > 0,
            **extra,
        )
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, **extra)


def _on_device(data: Splits, device: torch.device) -> Splits:
    """Every split's tensors moved to ``device`` once (batches are then cut there)."""
    there = lambda s: Split(move(s.x, device), s.y.to(device))  # noqa: E731
    return Splits(there(data.train), there(data.val), there(data.test), data.num_classes)


def _wide(device: torch.device) -> torch.dtype:
    """The dtype metrics are summed in on ``device`` (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


@torch.no_grad()
def evaluate(
    distiller: Distiller, data: Split, batch_size: int = 256, device: torch.device | None = None
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``distiller.predict`` on ``data``.

    Targets may be class labels ``(B,)`` or token ids ``(B, T)`` (logits ``(B, T, V)``);
    targets equal to ``IGNORE_INDEX`` (-100, padding) are not counted."""
    was_training = distiller.training
    distiller.eval()
    device = device or next(distiller.student.parameters()).device
    totals = torch.zeros(3, dtype=_wide(device), device=device)  # correct, loss, counted
    for x, y in Batches(data, batch_size, shuffle=False):
        x, y = move(x, device), y.to(device)
        logits = distiller.predict(x).float().flatten(0, -2)  # (N, V)
        y = y.flatten()
        counted = y != IGNORE_INDEX
        hits = ((logits.argmax(-1) == y) & counted).sum()
        nll = F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE_INDEX)
        # summed on the device: one transfer to the host at the end, not one per batch
        totals += torch.stack([hits, nll, counted.sum()]).to(totals.dtype)
    distiller.train(was_training)
    correct, loss, n = totals.tolist()
    return correct / max(n, 1), loss / max(n, 1)


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "metrics.json", json.dumps(history, indent=1))
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def _config(value: Any, cls: type, what: str) -> Any:
    """An ``OptimConfig``/``TrainConfig`` as given, the default for ``None``, or one built
    from a dict of its fields (unknown keys named)."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return _build(cls, value, prefix=f"{what}.")
    if not isinstance(value, cls):
        raise ConfigError(
            f"fit: {what} must be a flowdistill.{cls.__name__} or a dict of its fields, got "
            f"{type(value).__name__}"
        )
    return value


def _check_inputs(distiller: Any, data: Any, batch_size: Any) -> Splits:
    """What ``fit`` is given, checked before anything trains: a distiller, a ``Splits`` of
    inputs (tensors, or dicts of tensors) whose labels are integer class indices in range, a
    positive batch size. Integer labels of another width are widened to int64; the data are
    returned."""
    if not isinstance(distiller, Distiller):
        raise ConfigError(
            f"fit: expected a distiller (flowdistill.make_distiller(method, teacher, student)), "
            f"got {type(distiller).__name__}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"fit: batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(data, Splits):
        raise DataError(
            "fit: data must be a flowdistill.data.Splits (train, val and test Split(x, y) of "
            f"tensors, and num_classes), got {type(data).__name__}"
        )
    parts = {}
    for name in ("train", "val", "test"):
        part = getattr(data, name)
        if not isinstance(part, Split) or not isinstance(part.y, torch.Tensor):
            raise DataError(f"fit: data.{name} must be a Split(x, y) of tensors")
        x, y = check_inputs(part.x, f"fit: data.{name}.x"), part.y
        if num_rows(x) != len(y):
            raise DataError(f"fit: data.{name} has {num_rows(x)} inputs but {len(y)} labels")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise DataError(
                f"fit: data.{name} labels must be integer class indices, got dtype {y.dtype}"
            )
        for key, tensor in input_tensors(x).items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                where = f"inputs[{key!r}]" if key else "inputs"
                raise DataError(
                    f"fit: data.{name} {where} hold {bad} non-finite values (NaN or inf); "
                    "clean or impute them before training"
                )
        y = y.long()
        counted = y[y != IGNORE_INDEX] if y.ndim > 1 else y  # token targets: padding left out
        low, high = (int(counted.min()), int(counted.max())) if counted.numel() else (0, 0)
        if low < 0 or high >= data.num_classes:
            classes = data.num_classes
            raise DataError(
                f"fit: data.{name} labels run from {low} to {high}, outside the "
                f"{classes} classes [0, {classes}) of data.num_classes"
            )
        if name == "train" and y.ndim > 1 and not distiller.masks_padding:
            if bool((y == IGNORE_INDEX).any()):
                raise ConfigError(f"fit: {padding_refusal(distiller.name)}")
        parts[name] = Split(x, y)
    for name, why in (("train", "nothing to train on"), ("val", "no epoch could be chosen"),
                      ("test", "nothing to report")):  # fmt: skip
        if not len(parts[name]):
            raise DataError(f"fit: data.{name} is empty ({why})")
    return Splits(parts["train"], parts["val"], parts["test"], data.num_classes)


def _trains_batch_norm(distiller: Distiller) -> bool:
    """Whether a BatchNorm layer of the student or of the method's own modules trains
    (takes batch statistics); the teacher's run in evaluation mode."""
    teacher = set(map(id, distiller.teacher.modules())) if distiller.teacher is not None else set()
    return any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and id(m) not in teacher
        for m in distiller.modules()
    )


def _check_class_count(distiller: Distiller, data: Splits, device: torch.device) -> None:
    """The student (and the teacher) run on the inputs and predict ``data.num_classes``
    classes, in logits that fit each split's targets."""
    models = [("student", distiller.student_taps)]
    if distiller.teacher_taps is not None:
        models.append(("teacher", distiller.teacher_taps))
    for side, taps in models:
        # one forward pass on two inputs of each split (the teacher's: training inputs
        # only): do they fit the model, and do its logits fit the split's targets?
        for name in ("train", "val", "test") if side == "student" else ("train",):
            part = getattr(data, name)
            logits = _probe_logits(taps, move(take(part.x, slice(0, 2)), device), side, name)
            if not logits or logits[-1] != data.num_classes:
                raise ShapeMismatchError(
                    f"fit: the {side} predicts {logits[-1] if logits else 'no'} classes "
                    f"(logits of per-sample shape {logits}) but data.num_classes is "
                    f"{data.num_classes} (of a model that returns several tensors, the first, "
                    "or the 'logits' entry of a dict, is taken as its logits unless the "
                    "method's option student_output / teacher_output names another: an "
                    "index or a key)"
                )
            if logits[:-1] != tuple(part.y.shape[1:]):
                per = "per token" if part.y.ndim > 1 else "per sample"
                raise ShapeMismatchError(
                    f"fit: data.{name} has targets of per-sample shape "
                    f"{tuple(part.y.shape[1:])}, but the {side}'s logits on its inputs have "
                    f"per-sample shape {logits}: it needs one target {per}, of shape "
                    f"{logits[:-1]}"
                )


def _probe_logits(taps: Any, x: Inputs, side: str, name: str) -> tuple[int, ...]:
    """The per-sample shape of a model's logits on ``x`` (inputs of ``data.<name>``)."""
    try:
        return tuple(taps.probe(x)[LOGITS])
    except FlowdistillError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        shown = ", ".join(
            f"{key + ': ' if key else ''}{t.dtype}, per-sample shape {tuple(t.shape[1:])}"
            for key, t in input_tensors(x).items()
        )
        raise DataError(
            f"fit: the {side} cannot run on data.{name}'s inputs ({shown}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _check_schedule(optim: OptimConfig, epochs: int) -> None:
    """A warm-up shorter than the run, else the rate would never reach ``optim.lr``. (Step
    milestones beyond the run are allowed: a run may time or train the first epochs of a
    longer recipe.)"""
    if optim.warmup_epochs and optim.warmup_epochs >= epochs:
        raise ConfigError(
            f"optim.warmup_epochs ({optim.warmup_epochs}) is not shorter than train.epochs "
            f"({epochs}): the learning rate would never reach optim.lr"
        )


def _check_creatable(out: Path) -> None:
    """``out`` can be created (a folder that cannot, on a read-only or virtual file system,
    is named now rather than after the first epoch); what the check created is removed."""
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out_dir {out} cannot be created: {err.strerror or err}") from None
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass


def _refuse_non_finite_teacher(distiller: Distiller) -> None:
    """The frozen teacher's weights are finite (else every step's loss would be NaN, and
    the message would point at the learning rate)."""
    if distiller.teacher is None:
        return
    bad = [n for n, p in distiller.teacher.named_parameters()
           if not bool(torch.isfinite(p).all())]  # fmt: skip
    if bad:
        raise CheckpointError(
            f"fit: the teacher's weights hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): check the checkpoint it was loaded from"
        )


def _check_token_ids(distiller: Distiller, data: Splits) -> None:
    """Integer inputs of a model with an input embedding (``get_input_embeddings()``, as
    Hugging Face models and the project's GPT have it) lie in that embedding's range, in
    every split the model reads: checked before anything trains, rather than an index
    error deep in a later epoch."""
    sides = [("student", distiller.student, ("train", "val", "test"))]
    if distiller.teacher is not None:
        sides.append(("teacher", distiller.teacher, ("train",)))
    for side, model, names in sides:
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        if not isinstance(embedding, torch.nn.Embedding):
            continue
        vocab = embedding.num_embeddings
        for name in names:
            x = token_ids(getattr(data, name).x)
            if x is None or not x.numel():
                continue
            low, high = int(x.min()), int(x.max())
            if low < 0 or high >= vocab:
                raise DataError(
                    f"fit: data.{name} inputs hold token ids from {low} to {high}, outside "
                    f"the {side}'s vocabulary [0, {vocab}) (its input embedding)"
                )


#: the entries of ``fit``'s ``meta`` that identify a run's configuration: a bench run's key,
#: or ``identity``, the settings of a command-line run that decide what it trains
_RUN_KEYS = ("key_hash", "teacher_key", "identity")


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [f"{prefix or 'value'}: {old!r} -> {new!r}"]
    out = []
    for key in sorted(set(old) | set(new), key=str):
        out += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
    return out


def refuse_other_configuration(path: Path, saved: dict, meta: dict) -> None:
    """A checkpoint resumes only the run that wrote it: the identifying entries of ``meta``
    (a bench run's key, a command-line run's settings) must match those it was saved with."""
    for key in _RUN_KEYS:
        if key in saved and key in meta and saved[key] != meta[key]:
            what = f"{key} differs"
            if key == "identity":
                what = "; ".join(_differences(saved[key], meta[key])[:5])
            elif key == "key_hash" and isinstance(saved.get("key"), dict):  # a bench run's
                what = "; ".join(_differences(saved["key"], meta.get("key") or {})[:5]) or what
            raise CheckpointError(
                f"{path} holds a run of another configuration ({what}); resume it with the "
                "settings it was started with, or choose another output directory"
            )


def fit_identity(
    distiller: Distiller, optim: OptimConfig, train: TrainConfig, batch_size: int
) -> dict[str, Any]:
    """What ``fit`` trains, as its checkpoint records it: the method and its options (as
    :func:`~flowdistill.make_distiller` received them), the optimizer, the batch size and
    the training settings that change the result (not the number of epochs, which a resumed
    run may extend, nor how fast it runs: device, ``amp``, ``compile``, ...)."""
    identity = {
        "method": distiller.name,
        "options": getattr(distiller, "options", None),
        "optim": asdict(optim),
        "train": {k: v for k, v in asdict(train).items() if k not in _EXECUTION},
        "batch_size": batch_size,
    }
    return json.loads(json.dumps(identity, default=str))  # (as the checkpoint holds it)


def refuse_other_fit(path: Path, saved: dict | None, identity: dict) -> None:
    """A checkpoint resumes only under the settings it was trained with
    (:func:`fit_identity`); the first differences are named. Checkpoints written before it
    recorded them are not checked."""
    differ = [] if saved is None else _differences(saved, identity)
    if differ:
        raise CheckpointError(
            f"{path} holds a run trained with other settings ({'; '.join(differ[:5])}); "
            "resume it with the settings it was started with, or choose another output "
            "directory"
        )


def refuse_fewer_epochs(path: Path, state: dict, epochs: int, name: str) -> None:
    """A checkpoint with more epochs done than the run has cannot be resumed by it."""
    if state["epoch"] + 1 > epochs:
        raise ConfigError(
            f"{path} has {state['epoch'] + 1} epochs done; {name}={epochs} cannot resume it "
            "(give at least that many epochs)"
        )


def load_or_refuse(
    module: torch.nn.Module, weights: dict, path: Path, what: str, strict: bool = True
) -> None:
    """``module.load_state_dict(weights)``; a shape that differs (another architecture) is
    a :class:`CheckpointError` naming ``path`` and the first mismatch."""
    try:
        module.load_state_dict(weights, strict=strict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise CheckpointError(f"{path} does not fit {what}: {first[0].strip()}") from None


def spliced_schedules(
    distiller: Distiller,
    optim: OptimConfig,
    planned: int | None,
    epochs: int,
    done: int,
    steps_per_epoch: int,
) -> list[str]:
    """The schedules that a run planned for ``planned`` epochs, resumed after ``done`` of
    them for ``epochs``, splices: the learning rate where its factor over the steps done
    differs between the two plans (a cosine past its warm-up), and the method's own
    schedule where its values over the epochs done differ (:meth:`Distiller.epoch_schedule`).
    Empty when the steps done are those of an ``epochs``-epoch run from the start."""
    if planned is None or planned == epochs:
        return []
    spliced = []
    if any(
        lr_factor(optim, step, steps_per_epoch, planned)
        != lr_factor(optim, step, steps_per_epoch, epochs)
        for step in range(done * steps_per_epoch)
    ):
        spliced.append(f"the {optim.schedule} learning rate")
    moved = sorted({
        key
        for epoch in range(done)
        for key, value in distiller.epoch_schedule(epoch, planned).items()
        if distiller.epoch_schedule(epoch, epochs).get(key) != value
    })  # fmt: skip
    if moved:
        spliced.append(f"{distiller.name}'s own schedule ({', '.join(moved)})")
    return spliced


def refuse_finished_without_checkpoint(out: Path, meta: dict | None) -> None:
    """``resume`` with a finished run's ``result.json`` but no checkpoint: only the same
    run (same key) may be trained again; anything else would overwrite a finished record."""
    result = out / "result.json"
    if not result.exists():
        return
    try:
        saved = json.loads(result.read_text())
    except (OSError, ValueError):
        saved = {}
    keys = [k for k in _RUN_KEYS if k in (meta or {})]  # what identifies the run, if anything
    if not keys or any(saved.get(k) != meta[k] for k in keys):
        raise CheckpointError(
            f"{out} holds a finished run (result.json) without its checkpoint "
            f"({CHECKPOINT}): there is nothing to resume, and starting again would overwrite "
            "it; choose another output directory"
        )


def refuse_unsynchronised_state(distiller: Distiller, world: int) -> None:
    """A method keyed by sample (a memory bank) cannot train data-parallel."""
    if world > 1 and distiller.uses_indices:
        raise ConfigError(
            f"method {distiller.name!r} keeps per-sample state (a memory bank) that "
            "data-parallel training does not synchronise; run it in one process"
        )


def _refuse_non_finite_weights(distiller: Distiller, epoch: int, ckpt: Path | None) -> None:
    """Stop before an epoch whose weights turned non-finite (a non-finite gradient of a
    finite loss) is validated or saved: the last checkpoint stays the last good one. One
    read from the device per epoch."""
    params = [p for p in distiller.parameters() if p.requires_grad]
    if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        return
    names = [n for n, p in distiller.named_parameters()
             if p.requires_grad and not bool(torch.isfinite(p).all())]  # fmt: skip
    kept = ""
    if ckpt is not None:
        kept = (
            f"; the last good checkpoint (epoch {epoch}) is kept at {ckpt}"
            if ckpt.exists()
            else "; no epoch had finished, so there is no checkpoint"
        )
    raise NonFiniteLossError(
        f"the weights became non-finite during epoch {epoch + 1} while the loss stayed finite "
        f"(a non-finite gradient), in {', '.join(names[:3])}"
        f"{', ...' if len(names) > 3 else ''}{kept}. Lower the learning rate, set "
        "train.grad_clip, or look for a square root or a division at zero in the loss"
    )


def _tensorboard(out: Path | None):
    if out is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _keeps_determinism_settings(function):
    """``function`` with torch's global determinism settings (deterministic algorithms,
    cuDNN benchmarking) put back as they were when it returns: ``train.deterministic``
    holds for one run, not for the rest of the caller's process."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        algorithms = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        benchmark = torch.backends.cudnn.benchmark
        try:
            return function(*args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
            torch.backends.cudnn.benchmark = benchmark

    return wrapper


@_keeps_determinism_settings
def fit(
    distiller: Distiller,
    data: Splits,
    optim: OptimConfig | None = None,
    train: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    batch_size: int = 64,
    meta: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``distiller``'s student (and extra modules) on ``data.train``.

    Each epoch ends with a validation pass, an atomic checkpoint (``last.safetensors``), the
    best-validation weights (``best.safetensors``) and ``metrics.csv``/``metrics.json`` in
    ``out_dir``. With ``resume=True`` a run continues exactly from its last checkpoint. A
    non-finite loss stops training with :class:`NonFiniteLossError` and leaves the last good
    checkpoint in place. An ``out_dir`` that already holds a run is never overwritten unless
    ``resume`` is set.
    """
    optim = _config(optim, OptimConfig, "optim")
    train = _config(train, TrainConfig, "train")
    optim.validate()
    train.validate()
    _check_schedule(optim, train.epochs)
    data = _check_inputs(distiller, data, batch_size)
    was_training = distiller.training  # the mode the caller left it in, given back at the end
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ConfigError("fit: resume=True continues the run in out_dir; give out_dir")
    if out is not None:  # a folder it can write, known before the first epoch trains
        blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise ConfigError(f"out_dir {out}: {blocked} is a file, not a folder")
        _check_creatable(out)
    ckpt_path = out / CHECKPOINT if out else None
    if out is not None and not resume and (ckpt_path.exists() or (out / "result.json").exists()):
        raise CheckpointError(
            f"{out} already holds a run; pass resume=True (--resume) to continue it "
            "or choose another output directory"
        )
    device = distributed.setup(resolve_device(train.device))
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    distributed.barrier()  # every process has checked out_dir before rank 0 writes to it
    refuse_unsynchronised_state(distiller, world)
    seed_everything(train.seed + rank, train.deterministic)
    distiller.on_fit_start(len(data.train))
    distiller.on_fit_data(data.train.x)
    distiller.on_fit_targets(data.train.y)
    distiller.to(device)
    if train.channels_last:
        distiller.to(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    if train.data_on_device if train.data_on_device is not None else cuda:
        data = _on_device(data, device)
    _refuse_non_finite_teacher(distiller)
    _check_token_ids(distiller, data)
    _check_class_count(distiller, data, device)
    params = distiller.trainable_parameters()
    if not params:
        raise ConfigError(
            f"fit: nothing to train: no parameter of the student (or of {distiller.name}'s "
            "own modules) has requires_grad=True; unfreeze the student"
        )
    optimizer = _optimizer(params, optim, fused=cuda)
    # a BatchNorm that trains cannot take a batch of one sample: a last batch that would
    # give a process one sample is left out of each epoch
    min_share = 2 if _trains_batch_norm(distiller) else 1
    if batch_size < min_share * world:
        raise ConfigError(
            f"fit: batch_size={batch_size} gives each of {world} process(es) fewer than 2 "
            "samples, on which the BatchNorm layers that train cannot compute batch "
            "statistics; use a larger batch"
        )
    loader = Batches(
        data.train, batch_size, shuffle=True, seed=train.seed, drop_last=False, rank=rank,
        world=world, min_share=min_share,
    )  # fmt: skip
    steps_per_epoch = len(loader)
    identity = fit_identity(distiller, optim, train, batch_size)
    use_amp = train.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    cached = train.cache_teacher_outputs and distiller.uses_teacher
    distiller.cache_teacher(None, 0)  # (none left from an earlier fit)
    if cached:  # the teacher's outputs on the training inputs, as the steps would compute them
        with torch.autocast("cuda", dtype=amp_dtype) if use_amp else nullcontext():
            distiller.cache_teacher(data.train.x, batch_size, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    start_epoch, history = 0, []
    extended: list[dict[str, int]] = []  # resumed with more epochs under a cosine schedule
    best_score, best_epoch, best_state = -math.inf, -1, None
    best_val, best_val_loss = -1.0, math.nan
    if resume and ckpt_path is not None and not ckpt_path.exists():
        refuse_finished_without_checkpoint(out, meta)
    if resume and ckpt_path is not None and ckpt_path.exists():
        tensors, state = load_checkpoint(ckpt_path)
        refuse_other_configuration(ckpt_path, state.get("meta") or {}, meta or {})
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
        missing = set(distiller.trainable_state_dict()) - set(model_state)
        if missing:
            raise CheckpointError(f"checkpoint {ckpt_path} lacks weights {sorted(missing)[:5]}")
        saved_method = state.get("method")
        if saved_method is not None and saved_method != distiller.name:
            raise CheckpointError(
                f"{ckpt_path} is a run of method {saved_method!r}; it cannot resume as "
                f"{distiller.name!r}"
            )
        refuse_fewer_epochs(ckpt_path, state, train.epochs, "train.epochs")
        load_or_refuse(
            distiller, model_state, ckpt_path, "this distiller (another student or method "
            "configuration?)", strict=False,
        )  # fmt: skip
        refuse_other_fit(ckpt_path, state.get("fit"), identity)
        try:
            unpack_optimizer(optimizer, tensors, state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{ckpt_path}: its optimizer state does not fit this run's optimizer "
                f"({optim.name}; another optimizer or parameter set?): {exc}"
            ) from None
        if rank and f"rank{rank}" in state["rng"]:  # this process's own saved stream
            prefix = f"rank{rank}/"
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            set_rng_state(own, state["rng"][f"rank{rank}"])
        else:
            set_rng_state(tensors, state["rng"])
            if rank:  # (a checkpoint of another process count) a stream of this rank's own
                torch.manual_seed(torch.randint(2**62, ()).item() + rank)
        start_epoch, history = state["epoch"] + 1, state["history"]
        extended = list(state.get("schedule_extended", []))
        planned = state.get("epochs")
        spliced = spliced_schedules(
            distiller, optim, planned, train.epochs, start_epoch, steps_per_epoch
        )
        if spliced:
            extended.append({"at_epoch": start_epoch, "from_epochs": planned,
                             "to_epochs": train.epochs, "spliced": spliced})  # fmt: skip
            warnings.warn(
                f"{ckpt_path}: the run was planned for {planned} epochs and is resumed to "
                f"{train.epochs}: {' and '.join(spliced)} followed the {planned}-epoch plan "
                f"for its first {start_epoch} epoch(s), where a {train.epochs}-epoch plan "
                f"sets other values, and from epoch {start_epoch + 1} follow(s) the "
                f"{train.epochs}-epoch one: the two plans are spliced, so the run may end "
                f"elsewhere than a {train.epochs}-epoch run from the start; result.json "
                "records it as schedule_extended",
                stacklevel=3,
            )
        best_val, best_epoch = state["best_val_acc"], state["best_val_epoch"]
        best_val_loss = state.get("best_val_loss", math.nan)
        best_score = state.get("best_val_score", best_val)
        best_tensors, _ = load_checkpoint(out / BEST)
        best_state = {k: v.to(device) for k, v in best_tensors.items()}

    # gradients averaged across processes; flow methods leave some parameters unused on
    # some steps (progressive stages), hence find_unused_parameters
    model = (
        torch.nn.parallel.DistributedDataParallel(distiller, find_unused_parameters=True)
        if world > 1
        else distiller
    )
    if train.compile:
        model = torch.compile(model, mode=train.compile_mode)
    # the host waits for the device only every sync_every steps (finite-loss check, progress
    # bar) and at the epoch's end; on CUDA step times come from events, not waits
    sync_every = train.sync_every or (50 if cuda else 1)
    wide = _wide(device)
    writer = _tensorboard(out) if main else None
    show = train.progress and main
    total = train.epochs
    for epoch in range(start_epoch, total):
        distiller.train()
        distiller.on_epoch_start(epoch, total)
        loader.epoch = epoch
        sums: dict[str, float] = {}
        seen, step_time = 0, 0.0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{total}",
            leave=False,
            disable=not show,
            dynamic_ncols=True,
        )
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        first_unchecked = 0  # the first step whose loss has not been checked yet
        bad = torch.zeros((), dtype=torch.bool, device=device)
        for i, (x, y) in enumerate(bar):
            x, y = move(x, device, non_blocking=True), y.to(device, non_blocking=True)
            if train.augment_padding:
                if not isinstance(x, torch.Tensor) or x.ndim != 4:
                    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else "a dict"
                    raise ConfigError(
                        "train.augment_padding crops and flips images (N, C, H, W); the "
                        f"training inputs are {shape}"
                    )
                x = random_crop_flip(x, train.augment_padding)
            if train.channels_last and isinstance(x, torch.Tensor):
                x = _nhwc(x)
            # the batch's dataset indices, for a method keyed by sample and the cached rows
            index = loader.last_index.to(device) if distiller.uses_indices or cached else None
            if distiller.uses_indices:
                distiller.batch_index = index
            factor = lr_factor(optim, epoch * steps_per_epoch + i, steps_per_epoch, total)
            for group in optimizer.param_groups:
                group["lr"] = optim.lr * factor
            if cuda:
                events.append((torch.cuda.Event(enable_timing=True),
                               torch.cuda.Event(enable_timing=True)))  # fmt: skip
                events[-1][0].record()
            t0 = time.perf_counter()
            autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else nullcontext()
            if cached:
                distiller._teacher_index = index
            try:
                with autocast:
                    terms = model(x, y)
            finally:  # the teacher's cached rows serve this step's forward pass alone
                distiller._teacher_index = None
            loss = terms["loss"]
            bad = bad | ~torch.isfinite(loss.detach()).all()
            check = (i + 1) % sync_every == 0 or i == steps_per_epoch - 1
            if check:
                if world > 1:  # every process stops together
                    bad = distributed.all_reduce_sum(bad.float().reshape(1))[0] > 0
                if bool(bad):
                    where = (f"step {i + 1}" if first_unchecked == i
                             else f"steps {first_unchecked + 1}-{i + 1}")  # fmt: skip
                    terms_now = {k: float(v.detach()) for k, v in terms.items()}
                    kept = ""
                    if ckpt_path is not None:
                        kept = (
                            f"; the last good checkpoint is kept at {ckpt_path}"
                            if ckpt_path.exists()
                            else "; no epoch had finished, so there is no checkpoint"
                        )
                    hint = "Lower the learning rate or check the inputs"
                    if epoch == 0 and i == 0:
                        hint = (  # no update has been made: not the learning rate
                            "No weight had been updated yet, so the learning rate is not the "
                            "cause: check the inputs, the models and the method's options"
                        )
                    raise NonFiniteLossError(
                        f"non-finite loss at epoch {epoch + 1}, {where}: {terms_now}{kept}. {hint}"
                    )
                first_unchecked = i + 1
            optimizer.zero_grad(set_to_none=True)
            if world > 1:  # a share of an uneven global batch weighs as its samples do
                shared = min(batch_size, len(data.train) - i * batch_size)
                loss = loss * (len(y) * world / shared)
            scaler.scale(loss).backward()
            if train.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if cuda:
                events[-1][1].record()
            else:
                step_time += time.perf_counter() - t0
            seen += len(y)
            for k, v in terms.items():  # summed where they are: no wait for the device
                sums[k] = sums.get(k, 0.0) + v.detach().to(wide) * len(y)
            if show and check:
                post = {k: f"{float(s) / seen:.4f}" for k, s in sums.items()}
                if not cuda:
                    post["img/s"] = f"{seen / max(step_time, 1e-9):.0f}"
                bar.set_postfix(post, refresh=False)
        if cuda:
            torch.cuda.synchronize(device)
            step_time = sum(a.elapsed_time(b) for a, b in events) / 1000.0
        sums = {k: float(v) for k, v in sums.items()}
        bar.close()
        if world > 1:  # epoch sums over processes; rank 0's buffers for everyone
            names = sorted(sums)
            total_ = distributed.all_reduce_sum(
                torch.tensor(  # on the device: NCCL reduces CUDA tensors only
                    [seen] + [sums[k] for k in names], dtype=torch.float64, device=device
                )
            ).tolist()
            seen, sums = int(total_[0]), dict(zip(names, total_[1:], strict=True))
            distributed.broadcast_buffers(distiller)
        _refuse_non_finite_weights(distiller, epoch, ckpt_path)
        val_acc, val_loss = evaluate(distiller, data.val, device=device)
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            **{f"train_{k}": s / max(seen, 1) for k, s in sums.items()},
            "val_acc": val_acc,
            "val_loss": val_loss,
            "step_seconds": step_time / max(steps_per_epoch, 1),
            "samples_per_second": seen / max(step_time, 1e-9),
            **distiller.diagnostics(),
        }
        history.append(row)
        if writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    writer.add_scalar(k, v, epoch + 1)
        score = -val_loss if train.select_by == "val_loss" else val_acc
        if best_state is None or score > best_score:  # (a NaN score is never better)
            best_score, best_epoch = score, epoch + 1
            best_val, best_val_loss = val_acc, val_loss
            best_state = {
                k: v.detach().clone() for k, v in distiller.trainable_state_dict().items()
            }
            if out is not None and main:
                save_checkpoint(out / BEST, best_state, {"epoch": epoch + 1, "val_acc": val_acc})
        # every process's random state, so that a resumed run continues each one's stream
        ranks_rng = distributed.gather_objects(rng_state()) if out is not None else []
        if out is not None and main:
            model_t = {f"model/{k}": v for k, v in distiller.trainable_state_dict().items()}
            optim_t, optim_meta = pack_optimizer(optimizer)
            rng_t, rng_meta = ranks_rng[0]
            for r, (tensors_r, meta_r) in enumerate(ranks_rng[1:], start=1):
                rng_t.update({f"rank{r}/{k}": v for k, v in tensors_r.items()})
                rng_meta[f"rank{r}"] = meta_r
            save_checkpoint(
                ckpt_path,
                {**model_t, **optim_t, **rng_t},
                {
                    "epoch": epoch,
                    "epochs": total,
                    "schedule_extended": extended,
                    "optimizer": optim_meta,
                    "scheduler": {"step": (epoch + 1) * steps_per_epoch},
                    "rng": rng_meta,
                    "history": history,
                    "best_val_acc": best_val,
                    "best_val_loss": best_val_loss,
                    "best_val_score": best_score,
                    "best_val_epoch": best_epoch,
                    "method": distiller.name,
                    "fit": identity,
                    "meta": meta or {},
                },
            )
            _write_metrics(out, history)
        distributed.barrier()
    if writer is not None:
        writer.close()
    distiller.cache_teacher(None, 0)  # (its memory given back)

    test_last, test_loss_last = evaluate(distiller, data.test, device=device)
    last_state = {k: v.detach().clone() for k, v in distiller.trainable_state_dict().items()}
    distiller.load_state_dict(best_state, strict=False)
    test_best, test_loss_best = evaluate(distiller, data.test, device=device)
    distiller.load_state_dict(last_state, strict=False)
    steps = [r["step_seconds"] for r in history]
    result = FitResult(
        test_acc_last=test_last,
        test_acc_best_val=test_best,
        best_val_acc=best_val,
        best_val_epoch=best_epoch,
        mean_step_seconds=float(np.mean(steps)) if steps else float("nan"),
        extra_params=distiller.num_extra_params(),
        epochs=total,
        history=history,
        test_loss_last=test_loss_last,
        test_loss_best_val=test_loss_best,
        best_val_loss=best_val_loss,
    )
    if out is not None and main:
        save_checkpoint(out / "model.safetensors", last_state, {"epoch": total})
        atomic_write_text(
            out / "result.json",
            json.dumps(
                {
                    **result.to_dict(),
                    **({"schedule_extended": extended} if extended else {}),
                    **(meta or {}),
                },
                indent=1,
            ),  # fmt: skip
        )
    distributed.barrier()
    distiller.train(was_training)
    return result
