"""train.cache_teacher_outputs: the teacher runs once over the training inputs, not in every
step, and every method that allows it trains as it does with the live teacher."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import flowdistill
from flowdistill.config import OptimConfig, TrainConfig
from flowdistill.distillers import REGISTRY, VARIANTS, get_method
from flowdistill.errors import ConfigError

ALL = sorted(REGISTRY) + sorted(VARIANTS)
FEATURE_TAPS = {"student_taps": ["stage2"], "teacher_taps": ["stage2"]}


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _build(name, teacher, student, x):
    options = FEATURE_TAPS if get_method(name).uses_feature_taps else {}
    return flowdistill.make_distiller(name, teacher, student, example_input=x, **options)


@pytest.mark.parametrize("name", ALL)
def test_a_step_on_cached_teacher_outputs_is_the_step_on_the_live_teacher(name, pair):
    """Every method: the terms of a training step that reads the teacher's cached rows equal
    those of the same step that runs the teacher (same random draws), and the teacher does
    not run in it; a method that reads its teacher otherwise refuses the cache."""
    teacher, student, _ = pair
    g = torch.Generator().manual_seed(1)
    inputs, labels = torch.randn(16, 1, 8, 8, generator=g), torch.arange(16) % 4
    live = _build(name, teacher, student, inputs[:4])
    if not live.uses_teacher:
        return
    live.on_fit_start(16)
    live.on_fit_targets(labels)
    cached = copy.deepcopy(live)
    if not get_method(name).caches_teacher:
        with pytest.raises(ConfigError, match=rf"method '{name}' reads its teacher outside"):
            cached.cache_teacher(inputs, 5)
        return
    cached.cache_teacher(inputs, 5)  # (rows computed 5 at a time, the step takes 4 others)
    calls = _count_calls(cached.teacher)
    index = torch.tensor([3, 0, 7, 12])
    for d in (live, cached):
        d.train()
        d.batch_index = index
    cached._teacher_index = index
    torch.manual_seed(0)
    want = live(inputs[index], labels[index])
    torch.manual_seed(0)
    got = cached(inputs[index], labels[index])
    assert calls == [0]
    assert set(got) == set(want)
    for term in want:
        torch.testing.assert_close(got[term], want[term], rtol=1e-5, atol=1e-6, msg=term)
    cached._teacher_index = None  # outside a training step the teacher runs
    cached.teacher_forward(inputs[:2])
    assert calls == [1]


def test_fit_runs_the_teacher_once_over_the_training_set(tiny_data):
    torch.manual_seed(0)
    from flowdistill.models.small import SmallCNN

    teacher, student = SmallCNN(1, 4, (8, 8, 16)), SmallCNN(1, 4, (4, 4, 8))
    optim = OptimConfig(lr=0.05)
    runs = {}
    for cache in (False, True):
        torch.manual_seed(1)
        d = flowdistill.make_distiller(
            "fitnet", teacher, copy.deepcopy(student), example_input=tiny_data.train.x[:2],
            **FEATURE_TAPS,
        )  # fmt: skip
        calls = _count_calls(teacher)
        train = TrainConfig(epochs=2, progress=False, cache_teacher_outputs=cache)
        result = flowdistill.fit(d, tiny_data, optim, train, batch_size=16)
        runs[cache] = (result, d.student.state_dict(), calls[0])
        assert d._teacher_rows is None and d._teacher_index is None  # given back
    (live, live_weights, live_calls), (fast, fast_weights, fast_calls) = runs[False], runs[True]
    batches = math.ceil(len(tiny_data.train) / 16)
    checks = live_calls - 2 * batches  # (fit's checks before training: one call at most)
    assert 0 <= checks <= 1  # the live run: every step of both epochs
    assert fast_calls == checks + batches  # once over the training inputs, in batches
    for key, value in live_weights.items():
        torch.testing.assert_close(fast_weights[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert fast.history[-1]["val_acc"] == live.history[-1]["val_acc"]


def test_the_cache_refuses_augmentation_and_a_method_that_reads_its_teacher_otherwise(
    tiny_data, pair
):
    with pytest.raises(ConfigError, match="augment_padding changes them every step"):
        TrainConfig(cache_teacher_outputs=True, augment_padding=4).validate()
    teacher, student, x = pair
    d = flowdistill.make_distiller("nd", teacher, student, example_input=x)
    train = TrainConfig(epochs=1, progress=False, cache_teacher_outputs=True)
    with pytest.raises(ConfigError, match="leave train.cache_teacher_outputs off"):
        flowdistill.fit(d, tiny_data, OptimConfig(), train, batch_size=16)


def test_the_cache_changes_no_run_identity(tiny_data, pair, tmp_path):
    """How a run gets its teacher outputs is how fast it trains, not what it trains: a run
    started without the cache resumes with it."""
    teacher, student, x = pair
    d = flowdistill.make_distiller("kd", teacher, student, example_input=x)
    flowdistill.fit(d, tiny_data, OptimConfig(), TrainConfig(epochs=1, progress=False),
                    out_dir=tmp_path, batch_size=16)  # fmt: skip
    again = TrainConfig(epochs=2, progress=False, cache_teacher_outputs=True)
    result = flowdistill.fit(d, tiny_data, OptimConfig(), again, out_dir=tmp_path,
                             resume=True, batch_size=16)  # fmt: skip
    assert result.epochs == 2


def test_bench_flag_sets_the_cache_for_its_runs(fake_bench):
    from flowdistill.cli import main

    assert main([*fake_bench["argv"], "--cache-teacher-outputs"]) == 0
    assert fake_bench["train_options"] == {"cache_teacher_outputs": True}


def test_a_bench_with_the_cache_runs_a_method_that_refuses_it_on_the_live_teacher(tmp_path):
    """``--cache-teacher-outputs`` with ``nd`` in the bench: ND trains on the live teacher,
    the others on the cached rows, and every run scores as it does without the cache."""
    from flowdistill.bench import run_bench

    kw = {"methods": ["kd", "nd"], "seeds": 1, "epochs": 1, "budget": 0.3, "progress": False,
          "cache": tmp_path / "cache", "log": lambda *_: None}  # fmt: skip
    live = run_bench("digits", out=tmp_path / "live", **kw)
    fast = run_bench(
        "digits", out=tmp_path / "fast", train_options={"cache_teacher_outputs": True}, **kw
    )
    assert fast["provenance"]["config"]["train_options"] == {"cache_teacher_outputs": True}
    for method in ("student", "kd", "nd"):
        assert fast["summary"][method]["mean"] == pytest.approx(
            live["summary"][method]["mean"], abs=0.01
        )
