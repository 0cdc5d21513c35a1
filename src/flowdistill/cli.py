"""The ``flowdistill`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError, FlowdistillError

__all__ = ["main"]


def _describe(cls) -> str:
    """The first paragraph of a method's docstring, on one line."""
    first = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in first.splitlines())


def cmd_table(args: argparse.Namespace) -> int:
    import json

    from .bench import compact_table, markdown_table
    from .bench.report import merge_results
    from .errors import DataError

    parts = []
    for path in args.results:
        try:
            parts.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError as err:
            raise DataError(f"no benchmark results at {path}") from err
        except IsADirectoryError as err:
            raise DataError(f"{path} is a directory; give its results.json") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path} is not a flowdistill bench results.json ({err})") from err
        if not isinstance(parts[-1], dict):
            raise DataError(f"{path} is not a flowdistill bench results.json (not a mapping)")
    try:
        results = parts[0] if len(parts) == 1 else merge_results(parts, list(args.results))
        table = (compact_table(results, timing=not args.no_timing) if args.compact
                 else markdown_table(results))  # fmt: skip
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(
            f"{' + '.join(args.results)} is not a flowdistill bench results.json ({err!r})"
        ) from err
    if args.merged_out:
        try:
            Path(args.merged_out).write_text(json.dumps(results, indent=1) + "\n")
        except OSError as err:
            raise DataError(f"cannot write --merged-out {args.merged_out}: {err}") from err
    print(table, end="")
    return 0


def cmd_methods(_args: argparse.Namespace) -> int:
    from .distillers import REGISTRY, VARIANTS

    width = max(map(len, [*REGISTRY, *VARIANTS]))
    for name in sorted(REGISTRY):
        print(f"{name:<{width}}  {_describe(REGISTRY[name])}")
    for name in sorted(VARIANTS):
        method, options, description = VARIANTS[name]
        preset = ", ".join(f"{k}={v}" for k, v in options.items())
        print(f"{name:<{width}}  {method} variant: {description} ({preset})")
    return 0


def cmd_suites(_args: argparse.Namespace) -> int:
    from .bench.suites import SUITES

    for name in sorted(SUITES):
        suite = SUITES[name]
        if getattr(suite, "kind", None) == "nf":
            from .nf.bench import NF_METHODS

            methods = ", ".join(NF_METHODS)
        else:
            methods = ", ".join(suite.methods) or "every registered method it admits"
        print(f"{name}\n  {suite.description}\n  methods: {methods}")
        options = getattr(suite, "method_options", None) or {}
        if any(options.values()):  # the options a method runs with here, beside its own
            print("  options (beside each method's own defaults):")
            for method, values in options.items():
                if values:
                    label = "every feature method" if method == "_features" else method
                    print(f"    {label}: {_options_text(values)}")
    return 0


def _options_text(values: dict) -> str:
    def text(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)

    return " ".join(f"{key}={text(value)}" for key, value in values.items())


def _fast_path(args: argparse.Namespace) -> dict:
    """The TrainConfig fields of bench's speed flags."""
    options = {}
    if getattr(args, "channels_last", False):
        options["channels_last"] = True
    if getattr(args, "compile", False):
        options["compile"] = True
    if getattr(args, "cache_teacher_outputs", False):
        options["cache_teacher_outputs"] = True
    return options


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    methods = None  # the suite's own comparison
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            raise ConfigError(
                f"--methods {args.methods!r} names no method; leave it out to run the "
                "suite's own, or give 'all' for every method the suite admits"
            )
    results = run_bench(
        args.suite,
        methods=methods,
        seeds=args.seeds,
        epochs=args.epochs,
        out=args.out,
        progress=not args.no_progress,
        cache=args.teacher_cache,
        command=shlex.join(["flowdistill", *args.argv]),
        budget=args.budget,
        tune=args.tune,
        tune_seeds=args.tune_seeds,
        teacher_epochs=args.teacher_epochs,
        workers=args.workers,
        train_options=_fast_path(args),
        options=_method_settings(args.set),
    )
    from .engine import distributed

    if not distributed.is_main():
        return 0 if results else 1
    out = Path(args.out or Path("runs") / "bench" / args.suite)
    print()
    print((out / "results.md").read_text())
    plots = ", ".join(str(p) for p in sorted(out.glob("*.png")))
    print(f"results: {out / 'results.json'}; plots: {plots}")
    return 0 if results else 1


def _method_settings(items: list[str] | None) -> dict[str, dict]:
    """``["kd.temperature=1", ...]`` as ``{"kd": {"temperature": 1}}`` (values read as YAML)."""
    import yaml

    out: dict[str, dict] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        method, dot, key = name.partition(".")
        if not (eq and dot and method and key):
            raise ConfigError(
                f"--set takes METHOD.OPTION=VALUE, e.g. kd.temperature=1; got {item!r}"
            )
        parsed = yaml.safe_load(value)
        given = out.setdefault(method, {})
        if key in given and given[key] != parsed:
            raise ConfigError(f"--set gives {method}.{key} twice ({given[key]!r} and {parsed!r})")
        given[key] = parsed
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    args.suite, args.methods, args.seeds, args.epochs = "digits", None, 3, None
    args.budget, args.teacher_epochs, args.tune, args.tune_seeds = 1.0, None, False, 1
    args.workers, args.set = 1, None
    args.out = args.out or "runs/demo"
    args.teacher_cache = None
    return cmd_bench(args)


#: a text run's character vocabulary (a JSON list, id order), written beside its weights
VOCAB = "vocab.json"


def _check_teacher_vocab(checkpoint: str, vocab: list[str] | None) -> None:
    """A teacher trained by ``train-teacher`` on text left its vocabulary beside its
    weights: token ids of another corpus's vocabulary would mean other characters to it."""
    from .errors import DataError

    saved = Path(checkpoint).parent / VOCAB
    if vocab is None or not saved.is_file():
        return
    try:
        theirs = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{saved} is damaged ({err})") from None
    if theirs != vocab:
        differ = next(
            (i for i, (a, b) in enumerate(zip(theirs, vocab, strict=False)) if a != b),
            min(len(theirs), len(vocab)),
        )
        raise DataError(
            f"the teacher ({checkpoint}) was trained on a vocabulary of {len(theirs)} "
            f"characters ({saved}) and this corpus has {len(vocab)}, which differ from id "
            f"{differ} on: its ids would mean other characters to the teacher; distil on "
            "the teacher's corpus (or one with the same characters)"
        )


def _run(args: argparse.Namespace, teacher_mode: bool) -> int:
    from .config import config_to_dict, load_config, run_identity
    from .data import char_splits, digits_splits, idx_splits, line_splits, npz_splits, read_text
    from .data.inputs import take
    from .distillers import make_distiller
    from .engine import fit
    from .engine.checkpoint import digest, load_model_weights
    from .errors import ConfigError
    from .models import build_model, data_kwargs

    overrides = list(args.overrides) + (["train.progress=false"] if args.no_progress else [])
    cfg = load_config(args.config, overrides)
    d = cfg.data
    vocab = None  # a text corpus's characters, in id order
    if d.name == "digits":
        data = digits_splits(d.split_seed, d.val_fraction, d.test_fraction)
    elif d.name == "npz":
        data = npz_splits(d.path, d.val_fraction, d.split_seed)
    elif d.name == "text":
        data, tokenizer = char_splits(
            read_text(d.path), d.block_size, d.test_fraction, select_fraction=d.val_fraction
        )
        vocab = tokenizer.vocab
    elif d.name == "lines":
        data, tokenizer = line_splits(
            read_text(d.path), d.block_size, d.val_fraction, d.test_fraction,
            d.padding_side, d.split_seed,
        )  # fmt: skip
        vocab = tokenizer.vocab
    else:
        data = idx_splits(
            d.train_images,
            d.train_labels,
            d.test_images,
            d.test_labels,
            d.val_fraction,
            d.split_seed,
        )

    def build(spec):
        length = d.block_size if vocab is not None else None
        known = data_kwargs(spec.name, data.num_classes, data.input_shape[0], length)
        kwargs = {**known, **spec.kwargs}
        return build_model(spec.name, **kwargs)

    import torch

    torch.manual_seed(cfg.train.seed)
    if teacher_mode:
        if cfg.teacher is None:
            raise ConfigError("train-teacher needs a 'teacher' section naming the model")
        model = build(cfg.teacher)
        distiller = make_distiller(
            "student",
            None,
            model,
            example_input=take(data.train.x, slice(0, 8)),
            student_output=cfg.teacher.output,
        )
    else:
        student = build(cfg.student)
        teacher = None
        from .distillers import get_method

        if get_method(cfg.method).uses_teacher:
            if cfg.teacher is None or not cfg.teacher.checkpoint:
                raise ConfigError(
                    f"method {cfg.method!r} needs a trained teacher: set teacher.name and "
                    "teacher.checkpoint (for example the best.safetensors of train-teacher)"
                )
            teacher = build(cfg.teacher)
            load_model_weights(teacher, cfg.teacher.checkpoint)
            _check_teacher_vocab(cfg.teacher.checkpoint, vocab)
        outputs = {"student_output": cfg.student.output}
        if teacher is not None:
            outputs["teacher_output"] = cfg.teacher.output
        distiller = make_distiller(
            cfg.method, teacher, student, example_input=take(data.train.x, slice(0, 8)),
            **{**outputs, **cfg.method_options},
        )  # fmt: skip
    identity = run_identity(cfg, teacher_mode)
    if vocab is not None:  # ids mean these characters: another corpus is another run
        identity["vocab"] = "".join(vocab)
    if not teacher_mode and teacher is not None:  # the teacher's weights, not only its path:
        identity["teacher_weights"] = digest(teacher.state_dict())[:16]  # other weights there
    result = fit(  # are another run
        distiller,
        data,
        cfg.optim,
        cfg.train,
        out_dir=cfg.out_dir,
        resume=args.resume,
        batch_size=cfg.data.batch_size,
        meta={
            "config": config_to_dict(cfg),
            "identity": identity,
            "command": shlex.join(["flowdistill", *args.argv]),
        },
    )
    from .engine import distributed

    if not distributed.is_main():  # (rank 0 alone reports, as it alone writes)
        return 0
    if vocab is not None and cfg.out_dir:  # what the model's ids mean, for decoding it
        from .engine.checkpoint import atomic_write_text

        atomic_write_text(Path(cfg.out_dir) / VOCAB, json.dumps(vocab))
    print(
        json.dumps(
            {
                "out_dir": cfg.out_dir,
                "test_acc_last": result.test_acc_last,
                "test_acc_best_val": result.test_acc_best_val,
                # a language model: bits per character on the held-out text
                **(
                    {
                        "test_bpc_last": result.test_loss_last / math.log(2),
                        "test_bpc_best_val": result.test_loss_best_val / math.log(2),
                    }
                    if vocab is not None
                    else {}
                ),  # fmt: skip
                "best_val_epoch": result.best_val_epoch,
                "extra_params": result.extra_params,
            },
            indent=1,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowdistill", description="Knowledge distillation through flows, and its baselines."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the embedded digits benchmark (every method, 3 seeds)")
    p.add_argument("--out", default=None, help="output directory (default runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list the registered methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("suites", help="list the bench suites, their methods and options")
    p.set_defaults(func=cmd_suites)

    for name, teacher_mode, text in (
        ("train-teacher", True, "train the teacher named in a config"),
        ("distill", False, "distil the teacher into the student of a config"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="YAML run configuration")
        p.add_argument("--resume", action="store_true", help="continue the run in out_dir")
        p.add_argument(
            "--no-progress", action="store_true", help="hide progress bars (train.progress)"
        )
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.1")
        p.set_defaults(func=lambda a, t=teacher_mode: _run(a, t))

    p = sub.add_parser("table", help="print the Markdown table of a bench results.json")
    p.add_argument(
        "results",
        nargs="+",
        help="results.json written by bench; several (same suite, recipe, seeds, teacher) "
        "are merged into one table",
    )
    p.add_argument("--merged-out", default=None, help="also write the merged results.json")
    p.add_argument("--compact", action="store_true", help="the short table of the README")
    p.add_argument(
        "--no-timing", action="store_true", help="leave the step-time columns out (--compact)"
    )
    p.set_defaults(func=cmd_table)

    from .bench.suites import SUITES

    p = sub.add_parser("bench", help="run a benchmark suite side by side")
    p.add_argument("--suite", required=True, help=f"one of: {', '.join(sorted(SUITES))}")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated; 'all': every registered method the suite admits; "
        "default: the suite's own comparison (`flowdistill suites` lists it)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method (default 3)")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="override the suite's epochs (a step schedule's milestones move in proportion)",
    )
    p.add_argument(
        "--teacher-epochs",
        type=int,
        default=None,
        help="override the suite's teacher epochs (cached apart from the suite's teacher)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help="fraction of the training split for quick runs (teacher included; default 1)",
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="first choose each method's options from its grid on the validation split",
    )
    p.add_argument(
        "--tune-seeds", type=int, default=1, help="seeds per grid point with --tune (default 1)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="train this many runs at once, one process each (default 1; timings then shared)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="METHOD.OPTION=VALUE",
        help="a method's option for this bench (repeatable), e.g. --set kd.temperature=1",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="NHWC images and weights (GPU fast path)"
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the training steps (fast path)"
    )
    p.add_argument(
        "--cache-teacher-outputs",
        action="store_true",
        help="run the teacher on the training inputs once per run, not in every step "
        "(suites without augmentation)",
    )
    p.add_argument("--out", default=None, help="output directory (default runs/bench/SUITE)")
    p.add_argument("--teacher-cache", default=None, help="teacher cache directory")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand on both sides of a flag (``a=1 --resume b=2``)
    if (
        extra
        and hasattr(args, "overrides")
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    return reported(lambda: args.func(args), "flowdistill")


def reported(run: Callable[[], int], prog: str) -> int:
    """``run()``, with a library error printed as one line naming the problem (exit status
    2) rather than a traceback, and an interruption as exit status 130; the benchmark
    scripts end this way too."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # a polite kill, as Ctrl-C:
        previous = signal.signal(signal.SIGTERM, _terminated)  # workers stopped, work kept
    else:
        previous = None
    try:
        code = run()
        sys.stdout.flush()  # (a pipe's buffer: a closed reader is known here, not at exit)
        return code
    except FlowdistillError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished epochs are checkpointed", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output's reader stopped (``| head``)
        try:  # the rest of the output goes nowhere: no second error when Python exits
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminated(_signum, _frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
