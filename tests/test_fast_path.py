"""The training loop's fast path: channels_last, torch.compile, device-resident data, the
windowed finite-loss check, and (on a GPU) the whole path against the CPU loop."""

import copy
import math

import pytest
import torch

import flowdistill
from flowdistill.config import OptimConfig, TrainConfig
from flowdistill.data.datasets import Batches, Split
from flowdistill.distillers import REGISTRY, VARIANTS, get_method
from flowdistill.distillers.base import Distiller
from flowdistill.engine import fit
from flowdistill.engine.checkpoint import load_checkpoint
from flowdistill.errors import ConfigError, NonFiniteLossError
from flowdistill.models.gpt import GPT, GPTConfig
from flowdistill.models.small import SmallCNN

QUIET = {"progress": False}
ALL_METHODS = sorted(REGISTRY) + sorted(VARIANTS)
FEATURE_TAPS = {"student_taps": ["stage2"], "teacher_taps": ["stage2"]}


def _distiller(method, pair, **options):
    teacher, student, example = pair
    torch.manual_seed(0)  # the same initial adapters for every run
    return flowdistill.make_distiller(
        method, copy.deepcopy(teacher), copy.deepcopy(student), example_input=example, **options
    )


def _losses(result):
    return [row["train_loss"] for row in result.history], [r["val_acc"] for r in result.history]


def test_channels_last_trains_like_the_default_layout(pair, tiny_data):
    plain = fit(_distiller("kd", pair), tiny_data, train=TrainConfig(epochs=2, **QUIET),
                batch_size=16)  # fmt: skip
    d = _distiller("kd", pair)
    nhwc = fit(d, tiny_data, train=TrainConfig(epochs=2, channels_last=True, **QUIET),
               batch_size=16)  # fmt: skip
    loss_a, acc_a = _losses(plain)
    loss_b, acc_b = _losses(nhwc)
    assert loss_b == pytest.approx(loss_a, rel=1e-4) and acc_b == acc_a
    convs = [m.weight for m in d.student.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs if w.shape[-1] > 1)


def test_compiled_training_step_matches_eager(pair, tiny_data):
    """FitNet reads its features through forward hooks: they must survive compilation."""
    options = {"student_taps": ["stage2"], "teacher_taps": ["stage2"]}
    train = {"epochs": 1, "seed": 3, **QUIET}
    eager = fit(_distiller("fitnet", pair, **options), tiny_data, train=TrainConfig(**train),
                batch_size=32)  # fmt: skip
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = fit(_distiller("fitnet", pair, **options), tiny_data,
                   train=TrainConfig(compile=True, **train), batch_size=32)  # fmt: skip
    assert counters["stats"]["unique_graphs"] >= 1  # it was compiled
    assert _losses(compiled)[0] == pytest.approx(_losses(eager)[0], rel=1e-4)
    assert compiled.history[0]["train_fitnet"] == pytest.approx(
        eager.history[0]["train_fitnet"], rel=1e-4
    )


class _NaNFromStep(Distiller):
    """Cross-entropy, then NaN from a given training step of the second epoch on."""

    uses_teacher = False
    nan_step = 2  # 0-based step of the second epoch

    def on_epoch_start(self, epoch, epochs):
        self.epoch, self.step = epoch, 0

    def forward(self, inputs, targets):
        ce = self.cross_entropy(self.student_forward(inputs)["logits"], targets)
        broken = self.epoch >= 1 and self.step >= self.nan_step
        self.step += 1
        return self.total({"ce": ce * (math.nan if broken else 1.0)})


def test_the_loss_is_checked_every_sync_every_steps(tmp_path, tiny_data):
    """96 training samples at batch 8 make 12 steps: with sync_every=5 the checks fall after
    steps 5, 10 and 12; NaN from step 3 of epoch 2 is caught at step 5, named as the
    window 1-5, and the checkpoint of epoch 1 stays as it was."""
    torch.manual_seed(0)
    d = _NaNFromStep(None, SmallCNN(1, 4, (4, 4, 8)))
    train = TrainConfig(epochs=3, sync_every=5, **QUIET)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, steps 1-5: .*last good checkpoint"):
        fit(d, tiny_data, train=train, out_dir=tmp_path, batch_size=8)
    tensors, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["epoch"] == 0
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model/"))
    # every step checked (the CPU default): the very step is named
    d = _NaNFromStep(None, SmallCNN(1, 4, (4, 4, 8)))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3: "):
        fit(d, tiny_data, train=TrainConfig(epochs=2, **QUIET), batch_size=8)


def test_batches_are_cut_where_the_data_are():
    meta = {"device": "meta"}
    data = Split(torch.empty(10, 3, **meta), torch.empty(10, dtype=torch.long, **meta))
    batches = list(Batches(data, 4, shuffle=True, seed=1))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert all(x.device.type == "meta" for x, _ in batches)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("compile_mode", "fast", "train.compile_mode must be"),
        ("sync_every", 0, "train.sync_every must be >= 1"),
    ],
)
def test_fast_path_options_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value}).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_path_trains_like_the_cpu_loop(pair, tiny_data):
    """Device-resident data, fused SGD, channels_last and event timing on CUDA (float32,
    no autocast) against the plain CPU loop: the same losses up to kernel rounding."""
    optim = OptimConfig(lr=0.05)
    common = {"epochs": 2, "amp": False, "deterministic": False, **QUIET}
    cpu = fit(_distiller("kd", pair), tiny_data, optim, TrainConfig(device="cpu", **common),
              batch_size=16)  # fmt: skip
    gpu = fit(_distiller("kd", pair), tiny_data, optim,
              TrainConfig(device="cuda", channels_last=True, sync_every=4, **common),
              batch_size=16)  # fmt: skip
    assert _losses(gpu)[0] == pytest.approx(_losses(cpu)[0], rel=1e-3)
    assert gpu.mean_step_seconds > 0


def test_bench_fast_path_flags_reach_every_run(tmp_path, monkeypatch):
    """--channels-last reaches the TrainConfig of every run (teacher's included) and the
    provenance; an unknown train option is refused before anything trains."""
    import json

    from flowdistill.bench import run_bench, runner
    from flowdistill.cli import main

    seen = []
    real_fit = runner.fit
    monkeypatch.setattr(runner, "fit", lambda *a, **kw: seen.append(a[3]) or real_fit(*a, **kw))
    out = tmp_path / "b"
    argv = ["bench", "--suite", "digits", "--methods", "kd", "--seeds", "1", "--epochs", "1",
            "--channels-last", "--out", str(out), "--teacher-cache", str(tmp_path / "cache"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert len(seen) == 3 and all(t.channels_last and not t.compile for t in seen)
    config = json.loads((out / "results.json").read_text())["provenance"]["config"]
    assert config["train_options"] == {"channels_last": True}
    with pytest.raises(ConfigError, match=r"unknown train options \['chanels_last'\]"):
        run_bench("digits", methods=["kd"], seeds=1, out=tmp_path / "c",
                  train_options={"chanels_last": True})  # fmt: skip


def test_step_flops_against_the_matrix_product_count():
    """Linear teacher (12 → 4) and student (12 → 4) on a batch of 5: a product of (B, i) by
    (i, o) is 2·B·i·o FLOPs. The floor is the teacher's forward plus the student's forward
    and its weight gradient (the input needs none); KD's step adds nothing else."""
    from flowdistill.bench.speed import peak_flops, step_flops

    torch.manual_seed(0)
    b, i, o = 5, 12, 4
    d = flowdistill.make_distiller("kd", torch.nn.Linear(i, o), torch.nn.Linear(i, o))
    counts = step_flops(d, torch.randn(b, i), torch.randint(0, o, (b,)))
    product = 2 * b * i * o
    assert counts == {"step": 3 * product, "floor": 3 * product}
    assert all(p.grad is None for p in d.parameters())
    # a feature method's step costs more than the floor: its adapter's product and gradient
    fitnet = flowdistill.make_distiller(
        "fitnet", torch.nn.Sequential(torch.nn.Linear(i, 8), torch.nn.Linear(8, o)),
        torch.nn.Sequential(torch.nn.Linear(i, 6), torch.nn.Linear(6, o)),
        example_input=torch.randn(2, i), student_taps=["0"], teacher_taps=["0"],
    )  # fmt: skip
    counts = step_flops(fitnet, torch.randn(b, i), torch.randint(0, o, (b,)))
    assert counts["step"] > counts["floor"]
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756.0e12 and peak_flops("a CPU") is None


def test_gpu_speed_script_writes_its_record(tmp_path):
    """The GPU speed benchmark, run small on the CPU: one row per method with its FLOPs
    and time ratios, and the provenance."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_speed.py"
    spec = importlib.util.spec_from_file_location("gpu_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "speed.json"
    argv = ["--suite", "cifar100-resnet56-resnet20", "--methods", "kd,fitnet", "--steps", "2",
            "--batch-size", "4", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert module.main(argv) == 0
    record = json.loads(out.read_text())
    assert list(record["methods"]) == ["teacher-alone", "student", "kd", "fitnet"]
    rows = record["methods"]
    assert rows["student"]["step_time_ratio"] == 1.0
    assert rows["kd"]["floor_flops"] == rows["fitnet"]["floor_flops"]
    assert rows["fitnet"]["step_flops"] > rows["kd"]["step_flops"]
    assert rows["teacher-alone"]["floor_flops"] > rows["kd"]["floor_flops"]  # fwd+bwd of 56
    steps = math.ceil(45_000 / 4)
    assert rows["kd"]["schedule_seconds_estimate"] == pytest.approx(
        rows["kd"]["step_seconds"] * steps * 240
    )
    assert "step_over_floor" not in rows["kd"]  # no GPU peak on a CPU
    assert record["provenance"]["config"]["device"] == "cpu"


# ---------------------------------------------------------------------------- no host sync
# A training step that reads a tensor's value (``.item()``, ``bool(t)``, a boolean-mask
# index whose size depends on the data) makes the host wait for the GPU, and under
# ``torch.compile`` it splits the graph. Dynamo reports each such read as a graph break, so
# tracing a step on the CPU finds them without a GPU.
def _graph_breaks(distiller, x, y):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(distiller)(x, y)
    torch._dynamo.reset()
    return explained.graph_break_count, [
        str(r.reason).split("\n")[0] for r in explained.break_reasons
    ]


@pytest.mark.parametrize("name", ALL_METHODS)
def test_no_training_step_waits_for_the_device(name, pair):
    options = FEATURE_TAPS if get_method(name).uses_feature_taps else {}
    distiller = _distiller(name, pair, **options)
    distiller.on_fit_start(16)
    distiller.on_fit_targets(torch.arange(16) % 4)
    distiller.on_epoch_start(0, 4)  # mid-schedule: ramps and warm-ups are partial
    distiller.batch_index = torch.tensor([3, 0, 7, 12])
    distiller.train()
    count, reasons = _graph_breaks(distiller, pair[2], torch.tensor([0, 1, 2, 3]))
    assert count == 0, reasons


@pytest.mark.parametrize("name", ["kd", "reverse_kl", "skew_kl", "taid", "fmkt", "flowdistill"])
def test_no_language_model_step_waits_for_the_device(name):
    torch.manual_seed(0)
    config = {"n_head": 2, "vocab_size": 11, "block_size": 8}
    teacher = GPT(GPTConfig(n_layer=2, n_embd=16, **config))
    student = GPT(GPTConfig(n_layer=1, n_embd=8, **config))
    tokens = torch.randint(0, 11, (2, 8))
    targets = torch.randint(0, 11, (2, 8))
    targets[1, 5:] = -100  # padding
    options = {"student_taps": ["blocks.0"], "teacher_taps": ["blocks.1"]}
    options = options if get_method(name).uses_feature_taps else {}
    distiller = flowdistill.make_distiller(name, teacher, student, example_input=tokens, **options)
    distiller.on_fit_start(16)
    distiller.on_epoch_start(0, 4)
    distiller.train()
    count, reasons = _graph_breaks(distiller, tokens, targets)
    assert count == 0, reasons
