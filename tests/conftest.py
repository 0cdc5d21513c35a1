"""Shared fixtures: tiny models and data so every test runs in seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowdistill.data.datasets import Split, Splits
from flowdistill.models.small import SmallCNN

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def tiny_data() -> Splits:
    """A 4-class problem on 1×8×8 inputs: class k brightens rows 2k, 2k+1 (fixed seed)."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> Split:
        y = torch.randint(0, 4, (n,), generator=g)
        x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
        for k in range(4):
            x[y == k, 0, 2 * k : 2 * k + 2, :] += 1.5
        return Split(x, y)

    return Splits(make(96), make(48), make(48), num_classes=4)


@pytest.fixture
def pair():
    """A tiny CNN teacher and student (4 classes) and an example batch."""
    torch.manual_seed(0)
    teacher = SmallCNN(1, 4, (8, 8, 16))
    student = SmallCNN(1, 4, (4, 4, 8))
    return teacher, student, torch.randn(4, 1, 8, 8)


@pytest.fixture
def shared_file():
    """``shared_file(*parts)``: a file of the shared data folder beside the repository;
    the calling test is skipped when it is absent."""

    def get(*parts: str) -> Path:
        path = SHARED_DATA.joinpath(*parts)
        if not path.is_file():
            pytest.skip(f"shared data file {'/'.join(parts)} is absent")
        return path

    return get


@pytest.fixture
def fake_bench(tmp_path, monkeypatch):
    """``flowdistill.bench.run_bench`` replaced by a stand-in that records its keyword
    arguments (returned dict) and writes the ``results.md`` the CLI prints, in
    ``tmp_path / "o"``; ``BENCH_ARGV`` of the tests runs it on digits there."""
    import flowdistill.bench

    seen: dict = {}

    def fake_run_bench(suite, **kw):
        seen.update(kw, suite=suite)
        (tmp_path / "o").mkdir(exist_ok=True)
        (tmp_path / "o" / "results.md").write_text("|t|\n")
        return {"ok": True}

    monkeypatch.setattr(flowdistill.bench, "run_bench", fake_run_bench)
    seen["argv"] = ["bench", "--suite", "digits", "--out", str(tmp_path / "o"), "--no-progress"]
    return seen


@pytest.fixture
def small_corpus(tmp_path, monkeypatch):
    """``small_corpus(repeats)``: a one-line text repeated, as the shakespeare-char suites'
    ``tinyshakespeare/input.txt`` under a ``FLOWDISTILL_DATA`` of the test's own."""

    def write(repeats: int) -> None:
        folder = tmp_path / "data" / "tinyshakespeare"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "input.txt").write_text("To be, or not to be: that is the question.\n" * repeats)
        monkeypatch.setenv("FLOWDISTILL_DATA", str(tmp_path / "data"))

    return write


@pytest.fixture
def teacher_scoring(monkeypatch):
    """``teacher_scoring(module)`` → a dict whose ``"metric"`` replaces the score that
    ``module._teacher`` (a bench's teacher, trained or cached as usual) reports."""

    def patch(module) -> dict:
        real, reported = module._teacher, {}

        def teacher(*args, **kwargs):
            model, info = real(*args, **kwargs)
            return model, {**info, "metric": reported["metric"]}

        monkeypatch.setattr(module, "_teacher", teacher)
        return reported

    return patch
