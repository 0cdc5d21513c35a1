"""The training engine: one loop, checkpoints, metrics."""

from __future__ import annotations

from .checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from .trainer import FitResult, evaluate, fit, lr_factor, resolve_device, seed_everything

__all__ = [
    "FitResult",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_model_weights",
    "lr_factor",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
]
