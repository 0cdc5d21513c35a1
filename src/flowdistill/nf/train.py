"""Training a flow by maximum likelihood, alone or distilled from a teacher flow."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import keyword_checked
from ..engine.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    pack_optimizer,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unpack_optimizer,
)
from ..engine.trainer import (
    load_or_refuse,
    refuse_fewer_epochs,
    refuse_finished_without_checkpoint,
    refuse_other_configuration,
    resolve_device,
    seed_everything,
)
from ..errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from .data import ImageData
from .losses import check_pair, final_latent_kd, intermediate_latent_kd, synthesized_kd
from .model import MultiScaleFlow, bits_per_dim, dequantize

__all__ = [
    "FlowDistiller",
    "FlowFitResult",
    "FlowKDConfig",
    "FlowTrainConfig",
    "evaluate_bpd",
    "fit_flow",
    "sampling_throughput",
]

EVAL_SEED = 12345  # dequantisation noise of validation/test passes: the same for every run


@keyword_checked
@dataclass
class FlowKDConfig:
    """Weights of the distillation terms added to the student's NLL (bits/dim); all zero is
    the student trained alone.

    Attributes:
        intermediate: weight of :func:`~flowdistill.nf.losses.intermediate_latent_kd`.
        final: weight of :func:`~flowdistill.nf.losses.final_latent_kd`.
        synth: weight of :func:`~flowdistill.nf.losses.synthesized_kd`.
        synth_temperature: temperature of the teacher samples.
        synth_target: ``"latent"`` or ``"sample"``.
        synth_batch: teacher samples per step (``None``: the batch size).
        anneal: ``"constant"`` weights, or ``"linear"``: every weight decays linearly from
            its value at the first step to zero at the last (guidance early, the student's
            own likelihood at the end).
    """

    intermediate: float = 0.0
    final: float = 0.0
    synth: float = 0.0
    synth_temperature: float = 0.7
    synth_target: str = "latent"
    synth_batch: int | None = None
    anneal: str = "constant"

    def validate(self) -> FlowKDConfig:
        for name in ("intermediate", "final", "synth"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"kd.{name} must be a finite number >= 0, got {value!r}")
        if not self.synth_temperature > 0:
            raise ConfigError(f"kd.synth_temperature must be > 0, got {self.synth_temperature}")
        if self.synth_target not in ("latent", "sample"):
            raise ConfigError(f"kd.synth_target must be 'latent' or 'sample', got "
                              f"{self.synth_target!r}")  # fmt: skip
        if self.anneal not in ("constant", "linear"):
            raise ConfigError(f"kd.anneal must be 'constant' or 'linear', got {self.anneal!r}")
        if self.synth_batch is not None and self.synth_batch < 1:
            raise ConfigError(f"kd.synth_batch must be >= 1, got {self.synth_batch}")
        return self

    @property
    def uses_teacher(self) -> bool:
        return self.intermediate > 0 or self.final > 0 or self.synth > 0


@dataclass
class FlowTrainConfig:
    """Recipe: Adam with a linear warm-up, then cosine decay; gradient-norm clipping."""

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    warmup_steps: int = 100
    grad_clip: float | None = 50.0
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def validate(self) -> FlowTrainConfig:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        return self


class FlowDistiller(nn.Module):
    """A student flow, optionally a frozen teacher flow, and the loss terms that train the
    student: ``forward(y)`` returns ``{"nll", ["intermediate", "final", "synth"], "loss"}``
    (``nll`` in bits/dim of the dequantised batch ``y``)."""

    def __init__(
        self,
        student: MultiScaleFlow,
        teacher: MultiScaleFlow | None = None,
        kd: FlowKDConfig | None = None,
        n_bins: int | None = 256,
    ) -> None:
        super().__init__()
        self.kd = (kd or FlowKDConfig()).validate()
        if self.kd.uses_teacher and teacher is None:
            raise ConfigError("the distillation terms need a teacher flow")
        if teacher is not None:
            check_pair(student, teacher)
            teacher.eval()
            teacher.requires_grad_(False)
        self.student = student
        self.teacher = teacher if self.kd.uses_teacher else None
        self.n_bins = n_bins
        #: fraction of training done, in [0, 1] (set by :func:`fit_flow` before each step)
        self.progress = 0.0

    def kd_scale(self) -> float:
        """Factor on every distillation weight at the current :attr:`progress`."""
        return 1.0 - self.progress if self.kd.anneal == "linear" else 1.0

    def train(self, mode: bool = True) -> FlowDistiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, y: Tensor) -> dict[str, Tensor]:
        out = self.student.encode(y)
        terms = {"nll": bits_per_dim(out.log_prob, self.student.dims, self.n_bins).mean()}
        loss = terms["nll"]
        kd, scale = self.kd, self.kd_scale()
        if kd.intermediate > 0 or kd.final > 0:
            with torch.no_grad():
                t_out = self.teacher.encode(y)
            if kd.intermediate > 0:
                terms["intermediate"] = intermediate_latent_kd(out, t_out)
                loss = loss + scale * kd.intermediate * terms["intermediate"]
            if kd.final > 0:
                terms["final"] = final_latent_kd(out, t_out)
                loss = loss + scale * kd.final * terms["final"]
        if kd.synth > 0:
            n = kd.synth_batch or y.shape[0]
            terms["synth"] = synthesized_kd(
                self.student, self.teacher, n, kd.synth_temperature, kd.synth_target
            )
            loss = loss + scale * kd.synth * terms["synth"]
        terms["loss"] = loss
        return terms


@torch.no_grad()
def evaluate_bpd(
    model: MultiScaleFlow, images: Tensor, n_bins: int, batch_size: int = 500
) -> float:
    """Mean bits/dim of ``images`` (integer pixels) under ``model``, with a fixed
    dequantisation noise (the same for every model, so numbers compare)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(EVAL_SEED)
    total, count = 0.0, 0
    for i in range(0, len(images), batch_size):
        y = dequantize(images[i : i + batch_size], n_bins, generator).to(device)
        total += float(model.bits_per_dim(y, n_bins).double().sum())
        count += len(y)
    model.train(was_training)
    if not count:
        raise DataError("evaluate_bpd: no images to score")
    return total / count


@torch.no_grad()
def sampling_throughput(
    model: MultiScaleFlow, n: int = 256, repeats: int = 5, temperature: float = 0.7
) -> float:
    """Samples per second: ``n`` samples per call, median over ``repeats`` timed calls
    after one warm-up call."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model.sample(n, temperature, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return n / float(np.median(times))


@dataclass
class FlowFitResult:
    """Test bits/dim at the last epoch and at the epoch of best *validation* bits/dim."""

    test_bpd_last: float
    test_bpd_best_val: float
    best_val_bpd: float
    best_val_epoch: int
    mean_step_seconds: float
    epochs: int
    params: int
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def fit_flow(
    distiller: FlowDistiller,
    data: ImageData,
    train: FlowTrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    log=None,
) -> FlowFitResult:
    """Train ``distiller.student`` on ``data.train`` (a fresh dequantisation each step).

    Every epoch ends with validation bits/dim, an atomic checkpoint (``last.safetensors``),
    the best-validation weights (``best.safetensors``) and ``metrics.json``; ``resume=True``
    continues from the checkpoint. A non-finite loss stops training with
    :class:`NonFiniteLossError` and keeps the last good checkpoint.
    """
    train = (train or FlowTrainConfig()).validate()
    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / "last.safetensors" if out else None
    if out is not None and not resume and (ckpt.exists() or (out / "result.json").exists()):
        raise CheckpointError(f"{out} already holds a run; pass resume=True to continue it")
    if distiller.n_bins != data.n_bins:
        raise ConfigError(f"the distiller counts {distiller.n_bins} intensity levels, the data "
                          f"{data.n_bins}")  # fmt: skip
    device = resolve_device(train.device)
    seed_everything(train.seed)
    distiller.to(device)
    student = distiller.student
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    n = len(data.train)
    steps_per_epoch = math.ceil(n / train.batch_size)
    total_steps = steps_per_epoch * train.epochs

    start, history = 0, []
    best_val, best_epoch, best_state = math.inf, -1, None
    kd_config = asdict(distiller.kd)
    if resume and ckpt is not None and not ckpt.exists():
        refuse_finished_without_checkpoint(out, meta)
    if resume and ckpt is not None and ckpt.exists():
        tensors, state = load_checkpoint(ckpt)
        refuse_other_configuration(ckpt, state.get("meta") or {}, meta or {})
        if state.get("kd", kd_config) != kd_config:
            raise CheckpointError(
                f"{ckpt} is a run of distillation terms {state['kd']}; it cannot resume as "
                f"{kd_config}"
            )
        refuse_fewer_epochs(ckpt, state, train.epochs, "epochs")
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
        load_or_refuse(student, weights, ckpt, "this student flow")
        unpack_optimizer(optimizer, tensors, state["optimizer"])
        set_rng_state(tensors, state["rng"])
        start, history = state["epoch"] + 1, state["history"]
        best_val, best_epoch = state["best_val_bpd"], state["best_val_epoch"]
        best_state, _ = load_checkpoint(out / "best.safetensors")
    else:  # ActNorm's data-dependent initialisation on a large first batch
        with torch.no_grad():
            first = data.train[torch.randperm(n)[: max(train.batch_size, 256)]]
            student.encode(dequantize(first, data.n_bins).to(device))

    for epoch in range(start, train.epochs):
        distiller.train()
        order = torch.randperm(n)
        sums: dict[str, float] = {}
        seen, step_time = 0, 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{train.epochs}",
                   leave=False, disable=not train.progress, dynamic_ncols=True)  # fmt: skip
        for i in bar:
            idx = order[i * train.batch_size : (i + 1) * train.batch_size]
            y = dequantize(data.train[idx], data.n_bins).to(device)
            factor = _lr_factor(epoch * steps_per_epoch + i, train.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = train.lr * factor
            distiller.progress = (epoch * steps_per_epoch + i) / max(total_steps - 1, 1)
            t0 = time.perf_counter()
            terms = distiller(y)
            loss = terms["loss"]
            if not torch.isfinite(loss.detach()):
                bad = {k: float(v.detach()) for k, v in terms.items()}
                kept = f"; the last good checkpoint is kept at {ckpt}" if ckpt else ""
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch + 1}, step {i + 1}: {bad}{kept}. "
                    "Lower the learning rate or check the inputs"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_time += time.perf_counter() - t0
            seen += len(idx)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
            if train.progress:
                bar.set_postfix({k: f"{s / seen:.3f}" for k, s in sums.items()}, refresh=False)
        bar.close()
        val = evaluate_bpd(student, data.val, data.n_bins)
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            **{f"train_{k}": s / max(seen, 1) for k, s in sums.items()},
            "val_bpd": val,
            "step_seconds": step_time / steps_per_epoch,
        }
        history.append(row)
        if log is not None:
            log(f"  epoch {epoch + 1}: train nll {row['train_nll']:.4f}, val bpd {val:.4f}")
        if val < best_val:
            best_val, best_epoch = val, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
            if out is not None:
                save_checkpoint(out / "best.safetensors", best_state, {"epoch": epoch + 1})
        if out is not None:
            model_t = {f"model/{k}": v for k, v in student.state_dict().items()}
            optim_t, optim_meta = pack_optimizer(optimizer)
            rng_t, rng_meta = rng_state()
            save_checkpoint(
                ckpt,
                {**model_t, **optim_t, **rng_t},
                {
                    "epoch": epoch,
                    "optimizer": optim_meta,
                    "rng": rng_meta,
                    "history": history,
                    "best_val_bpd": best_val,
                    "best_val_epoch": best_epoch,
                    "kd": kd_config,
                    "meta": meta or {},
                },
            )
            atomic_write_text(out / "metrics.json", json.dumps(history, indent=1))

    test_last = evaluate_bpd(student, data.test, data.n_bins)
    best_model = copy.deepcopy(student)
    best_model.load_state_dict(best_state)
    test_best = evaluate_bpd(best_model, data.test, data.n_bins)
    result = FlowFitResult(
        test_bpd_last=test_last,
        test_bpd_best_val=test_best,
        best_val_bpd=best_val,
        best_val_epoch=best_epoch,
        mean_step_seconds=float(np.mean([r["step_seconds"] for r in history])),
        epochs=train.epochs,
        params=sum(p.numel() for p in student.parameters()),
        history=history,
    )
    if out is not None:
        save_checkpoint(out / "model.safetensors", student.state_dict(), {"epoch": train.epochs})
        atomic_write_text(
            out / "result.json", json.dumps({**result.to_dict(), **(meta or {})}, indent=1)
        )
    return result
