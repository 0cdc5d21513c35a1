"""Benchmark suites: data, a teacher/student pair and a training recipe each."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig, OptimConfig
from ..data.datasets import Splits, digits_splits
from ..errors import ConfigError

__all__ = ["SUITES", "Suite", "get_suite", "register_suite"]


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
