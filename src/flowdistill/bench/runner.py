"""``flowdistill bench``: a cached teacher, then every method over seeds, side by side."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, OptimConfig, TrainConfig
from ..data.datasets import Split, Splits
from ..distillers import get_method, list_methods, make_distiller
from ..distillers.registry import method_options, resolve, tune_points
from ..engine import distributed
from ..engine.checkpoint import (
    atomic_write_text,
    checkpoint_meta,
    digest,
    load_checkpoint,
    load_model_weights,
)
from ..engine.trainer import BEST, CHECKPOINT, fit, refuse_unsynchronised_state
from ..errors import ConfigError, DataError, FlowdistillError, NonFiniteLossError
from ..models import MODELS, build_model, data_kwargs
from ..taps import first_tensor
from .provenance import provenance
from .report import gap_closed, gap_scale, markdown_table, plot_diagnostics, plot_results
from .suites import Suite, get_suite

__all__ = ["method_config", "run_bench"]

DEFAULT_CACHE = Path("runs") / "cache" / "teachers"
#: ``methods=ALL`` (``--methods all``): every registered method the suite admits
ALL = "all"


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _build(spec: ModelConfig, data: Splits, task: str = "classification") -> torch.nn.Module:
    if task == "lm":  # a causal language model over the data's token vocabulary
        return build_model(spec.name, **{"vocab_size": data.num_classes, **spec.kwargs})
    if spec.name in MODELS:  # the data's classes (and input channels where it takes them)
        kwargs = {**data_kwargs(spec.name, data.num_classes, data.input_shape[0]), **spec.kwargs}
    else:  # a user factory: num_classes and in_channels as before
        kwargs = {"num_classes": data.num_classes, "in_channels": data.input_shape[0]}
        kwargs.update(spec.kwargs)
    return build_model(spec.name, **kwargs)


def _read_record(path: Path) -> dict[str, Any]:
    """A run's JSON record; a damaged one (a cut write, a merge conflict) is named."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise DataError(
            f"{path} is damaged ({err}); remove its run folder to train that run again"
        ) from None
    if not isinstance(record, dict):
        raise DataError(f"{path} is damaged (not a JSON object); remove its run folder")
    return record


def _other_configuration(run_dir: Path, record: dict, key: dict) -> ConfigError:
    """The error for a run folder holding a run of another configuration, naming the
    entries of its key that differ from this run's."""
    old = record.get("key") if isinstance(record.get("key"), dict) else {}
    differ = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    what = f" ({', '.join(differ)} differ)" if old and differ else ""
    return ConfigError(
        f"{run_dir} holds a run of another configuration{what}; choose another --out directory"
    )


def _check_buildable(
    suite: Suite, data: Splits, methods: list[str], grids: dict[str, list[dict]], example
) -> None:
    """Build every method (at every grid point) around untrained copies of the suite's
    models, so that an option value a method refuses stops the bench before anything
    trains rather than after the runs before it."""
    teacher = _build(suite.teacher, data, suite.task)
    for method in methods:
        for point in grids.get(method) or [{}]:
            _check_method(suite, data, teacher, method, point, example)


def _check_method(
    suite: Suite, data: Splits, teacher: torch.nn.Module, method: str, point: dict, example
) -> None:
    """Build ``method`` at ``point`` around ``teacher`` and an untrained student, and check
    what ``fit`` checks of it before training: padded token targets for a method that
    would count them, the training targets a method indexes (CRD's classes)."""
    student = _build(suite.student, data, suite.task)
    options = {**method_config(suite, method), **point}
    built = make_distiller(method, teacher, student, example_input=example, **options)
    refuse_unsynchronised_state(built, distributed.world_size())
    built.check_targets(data.train.y)
    built.on_fit_targets(data.train.y)


def applicable_methods(
    suite: Suite, data: Splits, example: Any, tune: bool = False
) -> tuple[list[str], dict[str, str]]:
    """Every registered method that ``suite`` admits, and, by name, why each other one is
    left out: a method whose construction or pre-training checks refuse the suite's models
    or data (ND's per-sample embedding under per-token logits, say) with a
    :class:`~flowdistill.errors.FlowdistillError`, at its options in ``suite`` or, with
    ``tune``, at any point of its grid. Any other exception is a defect and propagates."""
    teacher = _build(suite.teacher, data, suite.task)
    able, skipped = [], {}
    for method in list_methods():
        for point in tune_points(method) if tune else [{}]:
            try:
                _check_method(suite, data, teacher, method, point, example)
            except FlowdistillError as err:
                skipped[method] = f"{err} (at {point})" if point else str(err)
                break
        else:
            able.append(method)
    return able, skipped


def _train_config(suite: Suite, **kw: Any) -> TrainConfig:
    if suite.task == "lm":  # the best epoch by validation loss (bits per character)
        kw.setdefault("select_by", "val_loss")
    kw.setdefault("augment_padding", suite.augment_padding)
    return TrainConfig(**{**suite.train_options, **kw})


def _rescaled(optim: OptimConfig, epochs: int, planned: int) -> OptimConfig:
    """``optim`` for a schedule of ``epochs`` instead of ``planned``: a step schedule's
    milestones (and the warm-up) move in proportion, so a shortened run keeps the shape of
    its recipe (240 epochs decayed at 150/180/210 become 24 epochs decayed at 15/18/21)."""
    if epochs == planned:
        return optim
    scale = epochs / planned
    return dataclasses.replace(
        optim,
        milestones=sorted({max(1, round(m * scale)) for m in optim.milestones}),
        warmup_epochs=round(optim.warmup_epochs * scale),
    )


def with_epochs(suite: Suite, epochs: int | None, teacher_epochs: int | None = None) -> Suite:
    """``suite`` with its student (``epochs``) and teacher (``teacher_epochs``) schedules
    shortened or lengthened; ``None`` keeps the suite's own. See :func:`_rescaled`."""
    for name, value in (("--epochs", epochs), ("--teacher-epochs", teacher_epochs)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    epochs = epochs or suite.epochs
    teacher_epochs = teacher_epochs or suite.teacher_epochs
    return dataclasses.replace(
        suite,
        epochs=epochs,
        optim=_rescaled(suite.optim, epochs, suite.epochs),
        teacher_epochs=teacher_epochs,
        teacher_optim=_rescaled(suite.teacher_optim, teacher_epochs, suite.teacher_epochs),
    )


def _bits(loss_nats: float) -> float:
    return loss_nats / math.log(2.0)


def _run_metrics(suite: Suite, result: dict) -> tuple[float, float | None]:
    """(metric at the last epoch, metric at the best-validation epoch or None)."""
    if suite.task == "lm":  # bits per token on the held-out split
        if not suite.select_split:  # the held-out split is the validation split
            return _bits(result["test_loss_last"]), None
        return _bits(result["test_loss_last"]), _bits(result["test_loss_best_val"])
    return result["test_acc_last"], result["test_acc_best_val"]


def method_config(suite: Suite, method: str) -> dict[str, Any]:
    """The options ``method`` runs with in ``suite``: the suite's feature taps for methods
    that use features, then any per-method defaults of the suite. A variant with no
    defaults of its own takes its method's, except the options its preset sets."""
    options: dict[str, Any] = {}
    if get_method(method).uses_feature_taps:
        options.update(suite.method_options.get("_features", {}))
    base, preset = resolve(method)
    if method not in suite.method_options and base != method:
        inherited = suite.method_options.get(base, {})
        options.update({k: v for k, v in inherited.items() if k not in preset})
    options.update(suite.method_options.get(method, {}))
    return options


def _run_key(
    suite: Suite, method: str, options: dict, seed: int, epochs: int, teacher_info: dict,
    budget: float,
) -> dict[str, Any]:  # fmt: skip
    """What makes a run: a finished run of the same key is reused."""
    key = {
        "suite": suite.name,
        "method": method,
        "options": options,
        "seed": seed,
        "epochs": epochs,
        "optim": dataclasses.asdict(suite.optim),
        "student": _model_key(suite.student),
        "teacher": teacher_info["checkpoint"],
        "batch_size": suite.batch_size,
    }
    if budget < 1.0:
        key["budget"] = budget
    if "weights" in teacher_info:  # the teacher's weights, not only its path
        key["teacher_weights"] = teacher_info["weights"]
    _add_processes(key)
    return key


def same_run(record: dict[str, Any], key: dict[str, Any]) -> bool:
    """Whether a saved run (its record holds ``key_hash`` and ``key``) is the run of
    ``key``: the same key, or one that differs only by feature taps saved in the options of
    a method that takes none (suites once passed every method their taps, which such a
    method ignored; ``make_distiller`` now refuses them), so that those runs stay reused.
    Runs saved before keys held the teacher's weights (``teacher_weights``) are compared
    without them; :func:`_refuse_another_teacher` compares their table's teacher score."""
    if record.get("key_hash") == _hash(key):
        return True
    saved = record.get("key")
    if not isinstance(saved, dict):
        return False
    if "teacher_weights" not in saved:
        key = {k: v for k, v in key.items() if k != "teacher_weights"}
    return _hash(_without_ignored_taps(saved)) == _hash(_without_ignored_taps(key))  # (as JSON)


def _without_ignored_taps(key: dict[str, Any]) -> dict[str, Any]:
    try:
        takes_taps = get_method(key.get("method", "")).uses_feature_taps
    except FlowdistillError:  # a method no longer registered: its key as it is
        return key
    if takes_taps or not isinstance(key.get("options"), dict):
        return key
    options = {k: v for k, v in key["options"].items()
               if k not in ("student_taps", "teacher_taps")}  # fmt: skip
    return {**key, "options": options}


def _add_processes(key: dict[str, Any]) -> None:
    """A data-parallel run's key holds its number of processes (BatchNorm normalises each
    process's share alone, so its numbers differ from one process's); single-process keys
    stay as they were."""
    world = distributed.world_size()
    if world > 1:
        key["processes"] = world


def _val_score(suite: Suite, result: dict) -> float:
    """The validation metric of a run's last epoch: accuracy, or bits per token for a
    language model (the selection split's); the test split is not looked at."""
    last = result["history"][-1]
    return _bits(last["val_loss"]) if suite.task == "lm" else last["val_acc"]


def budgeted(data: Splits, budget: float) -> Splits:
    """``data`` with its training split cut to its first ``budget`` fraction."""
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"--budget must lie in (0, 1], got {budget}")
    if budget == 1.0:
        return data
    n = max(1, int(round(budget * len(data.train))))
    train = Split(data.train.x[:n], data.train.y[:n])
    return Splits(train, data.val, data.test, data.num_classes)


def _model_key(model: ModelConfig) -> dict[str, Any]:
    """A model's entry in a run's key: its configuration, without the fields added to
    :class:`ModelConfig` after runs were first keyed while they hold their defaults (the
    logits' ``output``), so that the keys of earlier runs, and the runs committed under
    ``benchmarks/``, stay valid."""
    config = dataclasses.asdict(model)
    if config.get("output") is None:
        config.pop("output", None)
    return config


def teacher_key(suite: Suite, budget: float = 1.0) -> dict[str, Any]:
    """What makes a suite's teacher: a cached teacher of the same key is reused (its folder
    is ``<cache>/<suite>-<hash of the key>``)."""
    key = {
        "suite": suite.name,
        "model": _model_key(suite.teacher),
        "optim": dataclasses.asdict(suite.teacher_optim),
        "epochs": suite.teacher_epochs,
        "batch_size": suite.batch_size,
        "seed": 0,
    }
    if budget < 1.0:  # (keys of full runs stay as they were)
        key["budget"] = budget
    if suite.data_key:
        key["data"] = suite.data_key
    _add_processes(key)
    return key


def teacher_folder(suite: Suite, cache: Path, budget: float = 1.0) -> Path:
    """Where ``suite``'s teacher (at ``budget``) is cached under ``cache``."""
    return cache / f"{suite.name}-{_hash(teacher_key(suite, budget))}"


def _teacher(
    suite: Suite, data: Splits, cache: Path, progress: bool, log, budget: float = 1.0
) -> tuple[torch.nn.Module, dict]:
    key = teacher_key(suite, budget)
    folder = teacher_folder(suite, cache, budget)
    torch.manual_seed(0)
    teacher = _build(suite.teacher, data, suite.task)
    result_file = folder / "result.json"
    if result_file.exists():
        log(f"teacher: reusing the cached teacher in {folder}")
        result = _read_record(result_file)
    else:
        log(f"teacher: training {suite.teacher.name} for {suite.teacher_epochs} epochs → {folder}")
        train = _train_config(suite, epochs=suite.teacher_epochs, seed=0, progress=progress)
        fit_result = fit(
            make_distiller("student", None, teacher),
            data,
            suite.teacher_optim,
            train,
            out_dir=folder,
            resume=True,
            batch_size=suite.batch_size,
            meta={"teacher_key": key},
        )
        result = fit_result.to_dict()
    load_model_weights(teacher, folder / BEST)
    teacher.eval()
    last, at_best = _run_metrics(suite, result)
    if suite.task == "lm":  # the last epoch's weights, like every reported run
        load_model_weights(teacher, folder / "model.safetensors")
    return teacher, {
        "name": suite.teacher.name,
        "params": _params(teacher),
        "metric": last if at_best is None or suite.task == "lm" else at_best,
        "metric_last_epoch": last,
        "checkpoint": str(folder / ("model.safetensors" if suite.task == "lm" else BEST)),
        "weights": digest(teacher.state_dict())[:16],
    }


def run_bench(
    suite_name: str,
    methods: list[str] | None = None,
    seeds: int = 3,
    epochs: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    cache: str | Path | None = None,
    command: str | None = None,
    log=print,
    budget: float = 1.0,
    tune: bool = False,
    tune_seeds: int = 1,
    teacher_epochs: int | None = None,
    workers: int = 1,
    train_options: dict[str, Any] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run a suite; write ``results.json``, ``results.md`` and PNG plots into ``out``.

    With ``tune``, each method first trains every point of its grid
    (:func:`~flowdistill.distillers.tune_points`, the same budget for every method) for
    ``tune_seeds`` seeds into ``out/tune``; each point is scored by its validation metric
    at the last epoch (mean over those seeds), never by the test split, and the table's
    runs use each method's best point. The grids and their scores go into ``results.json``.

    ``budget`` < 1 trains the teacher and every run on that fraction of the training split
    (its first samples) for quick runs; validation and test splits are unchanged.
    ``epochs`` and ``teacher_epochs`` replace the suite's schedules, a step schedule's
    milestones moved in proportion (:func:`with_epochs`).

    ``workers`` > 1 trains that many runs at once, each in a process of its own (on one GPU
    they share it; on CPUs they share the cores), once the teacher is trained: the results
    are those of one run after another, but step and inference times are then measured
    under each other's load.

    ``options`` sets methods' options (``{"kd": {"temperature": 1.0}}``) over the suite's
    defaults; they are part of each run's key, so a run with other options trains anew, and
    with ``tune`` they may not name an option of the method's grid.

    ``train_options`` sets further :class:`~flowdistill.config.TrainConfig` fields of every
    run (``channels_last``, ``compile``, ``amp``, ...): how fast runs train, not what they
    are, so a finished run is reused whatever they were; they are recorded in the provenance.

    Finished runs (``out/runs/<method>/seed<k>/result.json`` of the same configuration) are
    reused, and interrupted ones resume from their checkpoint, so a bench that stopped
    loses nothing.
    """
    suite = get_suite(suite_name)
    started = time.perf_counter()
    nf = getattr(suite, "kind", None) == "nf"
    if methods is None:  # the comparison the suite is sized for, else every method it admits
        methods = None if nf else list(suite.methods) or [ALL]
    else:
        methods = [methods] if isinstance(methods, str) else list(dict.fromkeys(methods))
        if not methods:
            raise ConfigError("methods names no method; leave it out to run the suite's own")
        if ALL in methods and len(methods) > 1:
            raise ConfigError(
                f"methods {', '.join(methods)}: {ALL!r} runs every method the suite admits; "
                "name no other method beside it"
            )
    if nf:  # a normalizing flow distilled into a smaller one
        from ..nf.bench import run_nf_bench

        if tune:
            raise ConfigError(
                f"--tune is for classification and language-model suites; {suite.name} "
                "distils a normalizing flow (benchmarks/nf_tune.py chooses its options)"
            )
        if options:
            raise ConfigError(
                f"--set is for classification and language-model suites; {suite.name} "
                "distils a normalizing flow with its suite's options"
            )

        if methods == [ALL]:  # a flow suite's methods are all its own
            methods = None
        return run_nf_bench(
            suite, methods, seeds, epochs, out, progress, cache, command, log, budget,
            teacher_epochs,
        )  # fmt: skip
    if not distributed.is_main():  # under torchrun rank 0 alone logs and writes
        log = _quiet
        progress = False
    every = methods == [ALL]
    for m in methods if not every else (options or {}):
        get_method(m)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    suite = with_epochs(suite, epochs, teacher_epochs)
    epochs = suite.epochs
    if train_options:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        wrong = sorted(set(train_options) - names)
        if wrong:
            raise ConfigError(f"unknown train options {wrong}; TrainConfig has {sorted(names)}")
        suite = dataclasses.replace(suite, train_options={**suite.train_options, **train_options})
        _train_config(suite, epochs=1).validate()
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if workers > 1 and distributed.world_size() > 1:
        raise ConfigError(
            "--workers runs several single-process runs; it does not go with torchrun"
        )
    if tune:
        if suite.task == "lm" and not suite.select_split:
            raise ConfigError(
                f"--tune chooses on a validation split; suite {suite.name} scores its only "
                "held-out split, so there is none to choose on"
            )
        if tune_seeds < 1:
            raise ConfigError(f"--tune-seeds must be >= 1, got {tune_seeds}")
    out = Path(out or Path("runs") / "bench" / suite.name)
    cache = Path(cache) if cache else DEFAULT_CACHE
    data = budgeted(suite.load_data(), budget)
    example = data.train.x[:8]
    skipped: dict[str, str] = {}
    if every:  # each at the options it would run with (--set, every grid point)
        given = _with_options(suite, list_methods(), options, {}) if options else suite
        methods, skipped = applicable_methods(given, data, example, tune)
        for m, why in skipped.items():
            log(f"{m}: left out, {suite.name} does not admit it: {why}")
        named = sorted(set(options or {}) & set(skipped))
        if named:
            raise ConfigError(
                f"options are set for {', '.join(named)}, which {suite.name} leaves out: "
                + "; ".join(f"{m}: {skipped[m]}" for m in named)
            )
    if "student" in methods:
        methods.remove("student")
    methods.insert(0, "student")  # the reference row is always run, and first
    grids = {m: tune_points(m) for m in methods} if tune else {}  # checked before training
    if options:
        suite = _with_options(suite, methods, options, grids)
    _check_buildable(suite, data, methods, grids, example)  # before any run trains
    teacher_cached = (teacher_folder(suite, cache, budget) / "result.json").exists()
    teacher_started = time.perf_counter()
    teacher, teacher_info = _teacher(suite, data, cache, progress, log, budget)
    teacher_seconds = time.perf_counter() - teacher_started
    _refuse_another_teacher(out, teacher_info)

    rows, curves, extra, deployed, diags = [], {}, {}, {}, {}
    student_params = _params(_build(suite.student, data, suite.task))
    tuning: dict[str, Any] = {}
    chosen: dict[str, dict[str, Any]] = {}
    pool = _Pool(suite, epochs, teacher_epochs, budget, cache, workers, log)
    if tune:  # every grid point of every method, scored on the validation split
        pool.run([
            (method, {**method_config(suite, method), **point}, seed,
             _tune_dir(out, method, point, seed), False)
            for method in methods for point in grids[method] for seed in range(tune_seeds)
        ], teacher_info)  # fmt: skip
        for method in methods:
            tuning[method], chosen[method] = _tune_method(
                suite, method, grids[method], data, teacher, teacher_info, example, epochs,
                budget, out, tune_seeds, progress, log,
            )  # fmt: skip
    run_options = {m: {**method_config(suite, m), **chosen.get(m, {})} for m in methods}
    reused = sum(  # table runs that an earlier bench had finished
        (out / "runs" / m / f"seed{seed}" / "inference.json").exists()
        and _finished(out / "runs" / m / f"seed{seed}",
                      _run_key(suite, m, run_options[m], seed, epochs, teacher_info, budget))
        for m in methods for seed in range(seeds)
    )  # fmt: skip
    pool.run([
        (m, run_options[m], seed, out / "runs" / m / f"seed{seed}", True)
        for m in methods for seed in range(seeds)
        if not (tune and _finished(_tune_dir(out, m, chosen.get(m, {}), seed),
                                   _run_key(suite, m, run_options[m], seed, epochs, teacher_info,
                                            budget)))  # (taken from its tuning run below)
    ], teacher_info)  # fmt: skip
    failed: list[str] = []
    for method in methods:
        options = run_options[method]
        for seed in range(seeds):
            key = _run_key(suite, method, options, seed, epochs, teacher_info, budget)
            run_dir = out / "runs" / method / f"seed{seed}"
            result_file = run_dir / "result.json"
            cached = _read_record(result_file) if result_file.exists() else None
            cost_file = run_dir / "inference.json"
            same = cached is not None and same_run(cached, key)
            if same and cost_file.exists():
                log(f"{method} seed {seed}: reusing {run_dir}")
                result = cached
                cost = _read_record(cost_file)
            else:
                if cached is not None and not same:  # another configuration: keep it aside
                    raise _other_configuration(run_dir, cached, key)
                tuned = _tune_dir(out, method, chosen.get(method, {}), seed)
                if tune and not run_dir.exists() and _finished(tuned, key):
                    log(f"{method} seed {seed}: the tuning run {tuned} is this run")
                    if distributed.is_main():
                        shutil.copytree(tuned, run_dir)
                    distributed.barrier()
                try:
                    result, cost = _train_run(
                        suite, method, options, teacher, data, example, key, seed, run_dir,
                        progress, with_cost=True,
                    )  # fmt: skip
                except Exception as err:  # the other runs go on; under torchrun only
                    # a non-finite loss, which every process raises alike
                    if distributed.world_size() > 1 and not isinstance(err, NonFiniteLossError):
                        raise
                    log(f"{method} seed {seed}: failed: {err}")
                    failed.append(f"{method} seed {seed} ({run_dir}): {err}")
                    continue
                last, at_best = _run_metrics(suite, result)
                if at_best is None:
                    log(f"{method} seed {seed}: {suite.metric} {last:.4f}")
                elif suite.task == "lm":
                    log(f"{method} seed {seed}: {suite.metric} {last:.4f} "
                        f"(at best val {at_best:.4f})")  # fmt: skip
                else:
                    log(f"{method} seed {seed}: test acc {100 * last:.2f} "
                        f"(at best val {100 * at_best:.2f})")  # fmt: skip
            extra[method] = result["extra_params"]
            deployed.setdefault(method, []).append(cost)
            for row in result["history"]:
                for name, value in row.items():
                    if "/" in name:  # per-epoch flow diagnostics, e.g. stage2/transport_error
                        diags.setdefault(method, {}).setdefault(name, []).append(value)
            curve = [_bits(r["val_loss"]) if suite.task == "lm" else r["val_acc"]
                     for r in result["history"]]  # fmt: skip
            curves.setdefault(method, []).append(curve)
            last, at_best = _run_metrics(suite, result)
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "metric": last,
                    "best_val_metric": at_best,
                    "best_val_epoch": result["best_val_epoch"],
                    "mean_step_seconds": result["mean_step_seconds"],
                    "inference_seconds": cost["seconds"],
                }
            )

    if failed:
        raise runs_failed(failed, len(methods) * seeds)
    by_method = {m: [r for r in rows if r["method"] == m] for m in methods}
    student_mean, _ = mean_std([r["metric"] for r in by_method["student"]])
    student_step = float(np.mean([r["mean_step_seconds"] for r in by_method["student"]]))
    student_infer = float(np.mean([r["inference_seconds"] for r in by_method["student"]]))
    gap = gap_scale(teacher_info["metric"], student_mean, suite.higher_is_better, log)
    summary = {}
    for m, rs in by_method.items():
        mean, std = mean_std([r["metric"] for r in rs])
        if rs[0]["best_val_metric"] is None:
            bmean = bstd = None
        else:
            bmean, bstd = mean_std([r["best_val_metric"] for r in rs])
        summary[m] = {
            "mean": mean,
            "std": std,
            "n": len(rs),
            "best_val_mean": bmean,
            "best_val_std": bstd,
            "gap_closed": gap_closed(mean, student_mean, gap),
            "step_time_ratio": float(np.mean([r["mean_step_seconds"] for r in rs])) / student_step,
            "extra_params": extra[m],
            "deployed_params": deployed[m][0]["params"],
            "inference_time_ratio": float(np.mean([r["inference_seconds"] for r in rs]))
            / student_infer,
        }
    config = {
        "suite": suite.name,
        "description": suite.description,
        "methods": methods,
        "seeds": list(range(seeds)),
        "epochs": epochs,
        "teacher_epochs": suite.teacher_epochs,
        "batch_size": suite.batch_size,
        "budget": budget,
        "optim": dataclasses.asdict(suite.optim),
        "method_options": run_options,
        "tune": tune,
    }
    if skipped:
        config["skipped"] = skipped
    if suite.train_options:
        config["train_options"] = suite.train_options
    if tune:
        config["tune_seeds"] = tune_seeds
    results = {
        "suite": suite.name,
        "metric": suite.metric,
        "unit": "bits/char" if suite.task == "lm" else "%",
        "higher_is_better": suite.higher_is_better,
        "seeds": seeds,
        "teacher": teacher_info,
        "student": {
            "name": suite.student.name,
            "params": student_params,
            "metric": student_mean,
        },
        "runs": rows,
        "summary": summary,
        "provenance": provenance(command or shlex.join(["flowdistill", *sys.argv[1:]]), config),
    }
    if tune:
        results["tuning"] = {
            "seeds": list(range(tune_seeds)),
            "score": "validation "
            + ("bits per token" if suite.task == "lm" else "accuracy")
            + " at the last epoch, mean over the tuning seeds",
            "higher_is_better": suite.task != "lm",
            "methods": tuning,
        }
    if suite.task == "lm" and suite.decode is not None:
        results["samples"] = _lm_samples(suite, data, teacher, methods, out, run_options)
    results["timing"] = {  # of this command, on this machine, up to writing its results
        "wall_seconds": time.perf_counter() - started,
        "teacher_seconds": teacher_seconds,
        "teacher_cached": teacher_cached,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
        "runs": len(methods) * seeds,
        "runs_reused": reused,
    }
    if not distributed.is_main():
        distributed.barrier()
        return results
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    table = markdown_table(results)
    if "samples" in results:
        table += "\n## Samples (seed 0; temperature 0.8; the prompt is the held-out text's start)\n"
        for name, text in results["samples"].items():
            table += f"\n**{name}**\n\n```text\n{text}\n```\n"
    atomic_write_text(out / "results.md", table)
    plot_results(results, curves, out)
    if diags:
        epochs_of = {m: len(curves[m][0]) for m in diags}
        plot_diagnostics(
            {
                m: {
                    k: np.asarray(v).reshape(-1, epochs_of[m]).mean(0).tolist()
                    for k, v in d.items()
                }
                for m, d in diags.items()
            },
            out,
        )
    distributed.barrier()
    return results


def _train_run(
    suite: Suite, method: str, options: dict, teacher, data: Splits, example, key: dict,
    seed: int, run_dir: Path, progress: bool, with_cost: bool,
) -> tuple[dict[str, Any], dict | None]:  # fmt: skip
    """Train one run of the bench (resuming ``run_dir`` where it stopped): a fresh student
    from ``seed``, the method around it, ``fit`` on the suite's recipe. ``(its result, its
    inference cost)``; the cost (written to ``inference.json``) only ``with_cost``."""
    torch.manual_seed(seed)
    student = _build(suite.student, data, suite.task)
    distiller = make_distiller(method, teacher, student, example_input=example, **options)
    train = _train_config(suite, epochs=suite.epochs, seed=seed, progress=progress)
    if train.cache_teacher_outputs and not distiller.caches_teacher:  # (ND): a live teacher
        train = dataclasses.replace(train, cache_teacher_outputs=False)
    meta = {"key_hash": _hash(key), "key": key}
    saved = checkpoint_meta(run_dir / CHECKPOINT).get("meta") or {}
    if saved.get("key_hash") not in (None, meta["key_hash"]) and same_run(saved, key):
        meta = {"key_hash": saved["key_hash"], "key": saved["key"]}  # keyed before: resumed
    result = fit(
        distiller,
        data,
        suite.optim,
        train,
        out_dir=run_dir,
        resume=True,
        batch_size=suite.batch_size,
        meta=meta,
    ).to_dict()
    cost = None
    if with_cost:
        cost = inference_cost(distiller, data.test.x[: suite.batch_size])
        if distributed.is_main():
            atomic_write_text(run_dir / "inference.json", json.dumps(cost))
        distributed.barrier()
    return result, cost


def _finished(run_dir: Path, key: dict) -> bool:
    result_file = run_dir / "result.json"
    if not result_file.exists():
        return False
    return same_run(_read_record(result_file), key)


def _with_options(
    suite: Suite, methods: list[str], options: dict[str, dict[str, Any]], grids: dict
) -> Suite:
    """``suite`` with ``options`` over its per-method defaults; a method that is not run, an
    option a method does not accept, one its variant fixes, or one its tuning grid chooses
    is refused, named. Options set on a method apply to it alone: a variant of it in the
    same bench keeps the suite's options (set it by its own name to change them)."""
    merged = dict(suite.method_options)
    for method, values in options.items():
        if method not in methods:
            raise ConfigError(
                f"options are set for {method!r}, which this bench does not run "
                f"(methods: {', '.join(methods)})"
            )
        accepted = method_options(method)
        _, preset = resolve(method)
        for key in values:
            if key == "example_input":
                raise ConfigError(
                    f"{method}.example_input cannot be set: the bench passes a batch of the "
                    "suite's training inputs"
                )
            if key not in accepted:
                close = difflib.get_close_matches(key, list(accepted), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{method} has no option {key!r}{hint}")
            if key in preset:
                raise ConfigError(
                    f"{method} is a variant that fixes {key}={preset[key]!r}; set it on "
                    f"{resolve(method)[0]} instead"
                )
            if any(key in point for point in grids.get(method, [])):
                raise ConfigError(
                    f"{method}.{key} is chosen by --tune (its grid); leave it to the grid or "
                    "run without --tune"
                )
        merged[method] = {**method_config(suite, method), **values}
    for method in methods:  # a variant run beside its method keeps the suite's options:
        base = resolve(method)[0]  # what is set on the method is not set on it
        if base in options and method not in options and method not in suite.method_options:
            merged[method] = method_config(suite, method)
    return dataclasses.replace(suite, method_options=merged)


def _tune_dir(out: Path, method: str, point: dict, seed: int) -> Path:
    return out / "tune" / method / _hash(point) / f"seed{seed}"


def runs_failed(failed: list[str], total: int) -> FlowdistillError:
    """The error of a bench whose runs ``failed`` (each named) of ``total``, raised once the
    others have trained."""
    return FlowdistillError(
        f"{len(failed)} of {total} runs failed (the finished ones are kept and reused by the "
        "same command): " + "; ".join(failed)
    )


DIVERGED = "diverged.json"


def _diverged(run_dir: Path, key: dict) -> bool:
    """Whether the tuning run of ``key`` in ``run_dir`` is recorded as diverged."""
    marker = run_dir / DIVERGED
    return marker.exists() and same_run(_read_record(marker), key)


def _tune_run(
    suite: Suite, method: str, options: dict, teacher, data: Splits, example, key: dict,
    seed: int, run_dir: Path, progress: bool,
) -> dict[str, Any] | None:  # fmt: skip
    """One tuning run: its result, or ``None`` where its loss became non-finite (a grid
    point that diverges is the worst point, not the end of the bench; ``diverged.json``
    records it, so that the same command does not train it again)."""
    if _diverged(run_dir, key):
        return None
    try:
        result, _ = _train_run(
            suite, method, options, teacher, data, example, key, seed, run_dir, progress,
            with_cost=False,
        )  # fmt: skip
    except NonFiniteLossError as err:  # raised on every process alike (its check is reduced)
        if distributed.is_main():
            record = {"key_hash": _hash(key), "key": key, "error": str(err)}
            atomic_write_text(run_dir / DIVERGED, json.dumps(record, indent=1))
        distributed.barrier()
        return None
    return result


def _tune_method(
    suite: Suite, method: str, points: list[dict], data: Splits, teacher, teacher_info: dict,
    example, epochs: int, budget: float, out: Path, seeds: int, progress: bool, log,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Train ``method`` at every grid point; ``(its record, the best point)``."""
    base = method_config(suite, method)
    lower = suite.task == "lm"
    record = []
    for point in points:
        options = {**base, **point}
        scores = []
        for seed in range(seeds):
            key = _run_key(suite, method, options, seed, epochs, teacher_info, budget)
            run_dir = _tune_dir(out, method, point, seed)
            result_file = run_dir / "result.json"
            result = _read_record(result_file) if result_file.exists() else None
            if result is not None and not same_run(result, key):
                raise _other_configuration(run_dir, result, key)
            if result is None:
                result = _tune_run(
                    suite, method, options, teacher, data, example, key, seed, run_dir,
                    progress,
                )  # fmt: skip
            scores.append(None if result is None else _val_score(suite, result))
        entry: dict[str, Any] = {"options": point, "val": scores}
        if None in scores:  # diverged on a seed: the worst point, whatever the others scored
            entry["val_mean"] = None
            entry["diverged"] = [seed for seed, score in enumerate(scores) if score is None]
            log(f"tune {method} {point or '(defaults)'}: diverged (seeds {entry['diverged']})")
        else:
            entry["val_mean"] = float(np.mean(scores))
            log(f"tune {method} {point or '(defaults)'}: validation {entry['val_mean']:.4f}")
        record.append(entry)
    scored = [r for r in record if r["val_mean"] is not None]
    if not scored:
        raise FlowdistillError(
            f"every grid point of {method} diverged (a non-finite loss; see "
            f"{out / 'tune' / method}/*/seed*/{DIVERGED})"
        )
    pick = min if lower else max  # ties: the first point
    best = pick(scored, key=lambda r: r["val_mean"])
    return {"points": record, "chosen": best["options"]}, best["options"]


def _refuse_another_teacher(out: Path, teacher_info: dict[str, Any]) -> None:
    """A teacher trained again on another machine, or by other code, can land on the
    cache path of an earlier one with other weights. Where ``out`` holds a table of earlier
    runs whose teacher had other weights or scored otherwise than this one, its runs would be
    mixed with runs of another teacher: refused, named. (Runs keyed since keys held the
    teacher's weights are refused one by one too; this also covers earlier runs.)"""
    previous = out / "results.json"
    if not previous.exists():
        return
    old = _read_record(previous).get("teacher", {})
    then, now = old.get("metric"), teacher_info.get("metric")
    if old.get("checkpoint") != teacher_info.get("checkpoint") or then is None or now is None:
        return
    weights = old.get("weights"), teacher_info.get("weights")
    other_weights = None not in weights and weights[0] != weights[1]
    if other_weights or not math.isclose(float(then), float(now), rel_tol=0.0, abs_tol=1e-9):
        now_w, then_w = (f" (weights {w})" if other_weights else "" for w in weights[::-1])
        raise ConfigError(
            f"the teacher at {teacher_info['checkpoint']}{now_w} scores {now:.4f}, but the runs "
            f"in {out} were distilled from a teacher of the same key{then_w} that scored "
            f"{then:.4f} (trained again, by other code or on another machine): their runs and "
            "new ones would not compare; put the original teacher there, or choose another --out"
        )


def _quiet(*_args, **_kwargs) -> None:
    pass


class _Pool:
    """Runs of one bench trained ``workers`` at a time in processes of their own."""

    def __init__(self, suite: Suite, epochs: int, teacher_epochs: int | None, budget: float,
                 cache: Path, workers: int, log) -> None:  # fmt: skip
        self.spec = {"suite": suite.name, "epochs": epochs, "teacher_epochs": teacher_epochs,
                     "budget": budget, "cache": str(cache),
                     "train_options": suite.train_options}  # fmt: skip
        self.suite, self.workers, self.log = suite, workers, log
        self.threads = max(1, torch.get_num_threads() // workers)

    def run(self, jobs: list[tuple[str, dict, int, Path, bool]], teacher_info: dict) -> None:
        """Train every job ``(method, options, seed, run_dir, with_cost)`` not yet finished;
        finished runs are kept even when another one fails."""
        if self.workers == 1:
            return
        todo = []
        for method, options, seed, run_dir, with_cost in jobs:
            key = _run_key(self.suite, method, options, seed, self.spec["epochs"],
                           teacher_info, self.spec["budget"])  # fmt: skip
            result_file = run_dir / "result.json"
            record = _read_record(result_file) if result_file.exists() else None
            if record is not None and not same_run(record, key):
                raise _other_configuration(run_dir, record, key)
            done = record is not None and (not with_cost or (run_dir / "inference.json").exists())
            done = done or (not with_cost and _diverged(run_dir, key))  # a tuning run
            if not done:
                todo.append({**self.spec, "method": method, "options": options, "seed": seed,
                             "run_dir": str(run_dir), "key": key, "with_cost": with_cost,
                             "threads": self.threads})  # fmt: skip
        if not todo:
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.log(f"training {len(todo)} runs, {self.workers} at a time")
        context = multiprocessing.get_context("spawn")
        ex = ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=follow_parent, initargs=(os.getpid(),)
        )
        errors = []
        try:
            futures = [ex.submit(_pool_job, job) for job in todo]
            for job, future in zip(todo, futures, strict=True):
                try:
                    self.log(future.result())
                except Exception as err:  # the others finish and are kept
                    errors.append(f"{job['method']} seed {job['seed']} ({job['run_dir']}): {err}")
        except BaseException:  # Ctrl-C: stop the workers now (finished epochs are saved)
            for process in list((getattr(ex, "_processes", None) or {}).values()):
                process.terminate()
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown()
        if errors:
            raise runs_failed(errors, len(todo))


def follow_parent(parent: int, every: float = 1.0) -> None:
    """In a worker process: exit as soon as the process that started it is gone (killed,
    say), rather than train on with nobody to collect its result. A run it leaves is
    resumed from its last epoch by the next bench."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


def _pool_job(job: dict) -> str:
    """One run in a worker process: the suite's data and cached teacher, then the run."""
    torch.set_num_threads(job["threads"])
    suite = with_epochs(get_suite(job["suite"]), job["epochs"], job["teacher_epochs"])
    suite = dataclasses.replace(suite, train_options=job["train_options"])
    data = budgeted(suite.load_data(), job["budget"])
    teacher, teacher_info = _teacher(suite, data, Path(job["cache"]), False, _quiet, job["budget"])
    method, seed, run_dir = job["method"], job["seed"], Path(job["run_dir"])
    key = _run_key(suite, method, job["options"], seed, suite.epochs, teacher_info, job["budget"])
    if key != job["key"]:
        raise RuntimeError(f"worker rebuilt another run key for {run_dir}")
    if not job["with_cost"]:  # a tuning run: one that diverges is recorded as such
        result = _tune_run(
            suite, method, job["options"], teacher, data, data.train.x[:8], key, seed,
            run_dir, False,
        )  # fmt: skip
        if result is None:
            return f"{method} seed {seed}: diverged in {run_dir}"
    else:
        result, _ = _train_run(
            suite, method, job["options"], teacher, data, data.train.x[:8], key, seed,
            run_dir, False, True,
        )  # fmt: skip
    score = _val_score(suite, result)
    return f"{method} seed {seed}: trained in {run_dir} (validation {score:.4f})"


@torch.no_grad()
def _lm_samples(
    suite: Suite, data: Splits, teacher: torch.nn.Module, methods: list[str], out: Path,
    run_options: dict[str, dict], prompt_len: int = 32, new_tokens: int = 240,
) -> dict[str, str]:  # fmt: skip
    """Text generated by the teacher and by each method's seed-0 deployed model (the
    student, or the student with the modules a method keeps at inference, FM-KT's flow),
    from the same prompt and random stream."""
    prompt = data.test.x[:1, :prompt_len]
    texts = {"teacher": _sample(teacher, prompt, new_tokens, teacher.config.block_size)}
    for method in methods:
        weights = out / "runs" / method / "seed0" / "model.safetensors"
        student = _build(suite.student, data, suite.task)
        distiller = make_distiller(
            method, teacher, student, example_input=prompt, **run_options.get(method, {})
        )
        if distiller.deployed_modules() == [distiller.student]:
            load_model_weights(student, weights)
            texts[method] = _sample(student, prompt, new_tokens, student.config.block_size)
        else:  # the deployed model predicts through the method's modules too
            distiller.load_state_dict(load_checkpoint(weights)[0], strict=False)
            distiller.eval()
            texts[method] = _sample(
                distiller.predict, prompt, new_tokens, student.config.block_size
            )
    return {name: suite.decode(ids[0].tolist()) for name, ids in texts.items()}


@torch.no_grad()
def _sample(model, prompt: torch.Tensor, new_tokens: int, block: int, temperature: float = 0.8):
    """``new_tokens`` tokens appended to ``prompt`` by sampling ``model``'s next-token
    logits (its context cropped to ``block`` tokens), from seeded stream 0."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    g = torch.Generator().manual_seed(0)
    idx = prompt.clone()
    for _ in range(new_tokens):
        logits = first_tensor(model(idx[:, -block:]))[:, -1].float() / temperature
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def inference_cost(distiller: torch.nn.Module, batch: torch.Tensor, repeats: int = 20) -> dict:
    """Deployed parameters and the median seconds of one ``predict`` on ``batch``."""
    distiller.eval()
    device = next(distiller.student.parameters()).device
    batch = batch.to(device)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        distiller.predict(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:  # warm-up calls are not counted
            times.append(time.perf_counter() - t0)
    return {"params": distiller.num_deployed_params(), "seconds": float(np.median(times))}
