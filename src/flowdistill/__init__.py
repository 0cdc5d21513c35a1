"""flowdistill: knowledge distillation through flows, and the classic baselines beside it.

>>> import torch, flowdistill
>>> teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
>>> student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
>>> distiller = flowdistill.make_distiller("kd", teacher, student, temperature=4.0)
>>> terms = distiller(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
>>> sorted(terms)
['ce', 'kd', 'loss']
"""

from __future__ import annotations

from .config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, load_config
from .distillers import (
    Distiller,
    get_method,
    list_methods,
    list_variants,
    make_distiller,
    method_options,
)
from .engine import FitResult, evaluate, fit
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FlowdistillError,
    NonFiniteLossError,
    ShapeMismatchError,
    TapError,
    UnknownMethodError,
)
from .taps import FeatureTaps

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "Distiller",
    "FeatureTaps",
    "FitResult",
    "FlowdistillError",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "RunConfig",
    "ShapeMismatchError",
    "TapError",
    "TrainConfig",
    "UnknownMethodError",
    "__version__",
    "evaluate",
    "fit",
    "get_method",
    "list_methods",
    "list_variants",
    "load_config",
    "make_distiller",
    "method_options",
]
