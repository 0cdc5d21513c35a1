"""Benchmark suites, their runner, tables and plots."""

from __future__ import annotations

from ..nf import bench as _nf_bench  # noqa: F401  (registers the flow suites)
from .report import compact_table, markdown_table, plot_results
from .runner import method_config, run_bench
from .suites import SUITES, Suite, get_suite, register_suite

__all__ = [
    "SUITES",
    "Suite",
    "compact_table",
    "get_suite",
    "markdown_table",
    "method_config",
    "plot_results",
    "register_suite",
    "run_bench",
]
