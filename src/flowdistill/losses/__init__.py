"""Distillation losses as plain functions on tensors.

Each registered distiller calls the function of the same name here, so a user's own
training loop gets exactly the numbers the engine gets. Every function documents its formula
and takes its authors' defaults as keyword defaults.
"""

from __future__ import annotations

from . import feature, lm, logit, logit_space
from .feature import *  # noqa: F403
from .lm import *  # noqa: F403
from .logit import *  # noqa: F403
from .logit_space import *  # noqa: F403

__all__ = sorted([*logit.__all__, *logit_space.__all__, *feature.__all__, *lm.__all__])
