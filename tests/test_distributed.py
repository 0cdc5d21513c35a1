"""Data-parallel training: two CPU processes (gloo), launched the way torchrun does (the
``RANK``/``WORLD_SIZE``/``MASTER_*`` environment), against a single-process oracle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import flowdistill
from flowdistill.config import OptimConfig, TrainConfig
from flowdistill.data.datasets import Batches, Split, Splits
from flowdistill.engine import fit
from flowdistill.errors import ConfigError


def _data() -> Splits:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 12, generator=g)
    y = (x[:, :4].argmax(1) + 3 * (x[:, 5] > 0)).long() % 5

    def split(a, b):
        return Split(x[a:b].clone(), y[a:b].clone())

    return Splits(split(0, 128), split(128, 144), split(144, 160), num_classes=5)


class _Keyword(torch.nn.Module):
    """A model that takes its inputs by keyword, in two parts (``a``, ``b``)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a, b], dim=1))


def _by_keyword(data: Splits) -> Splits:
    """The same data as dicts of two inputs."""
    part = lambda s: Split({"a": s.x[:, :5], "b": s.x[:, 5:]}, s.y)  # noqa: E731
    return Splits(part(data.train), part(data.val), part(data.test), data.num_classes)


def _models():
    torch.manual_seed(1)
    teacher = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))
    student = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    return teacher, student


def _run(out_dir, epochs, resume=False, method="kd", keyword=False):
    teacher, student = _models()
    data = _data()
    options = {"example_input": torch.zeros(2, 12)} if method != "kd" else {}
    if keyword:  # the same models and data, the inputs given as a dict
        teacher, net, data = _Keyword(teacher), _Keyword(student), _by_keyword(data)
    distiller = flowdistill.make_distiller(method, teacher, net if keyword else student, **options)
    train = TrainConfig(epochs=epochs, seed=0, progress=False, device="cpu")
    # (a constant rate: a run extended by resuming has the schedule of one run straight)
    schedule = "cosine" if method == "kd" else "constant"
    optim = OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.0, schedule=schedule)
    result = fit(distiller, data, optim, train, out_dir=out_dir, resume=resume, batch_size=33)
    return student, result


def _schedule_state(method: str) -> dict[str, torch.Tensor]:
    """TAID's interpolation weight and ND's running class centres after two epochs."""
    teacher, student = _models()
    distiller = flowdistill.make_distiller(
        method, teacher, student, example_input=torch.zeros(2, 12)
    )
    train = TrainConfig(epochs=2, seed=0, progress=False, device="cpu")
    fit(distiller, _data(), OptimConfig(lr=0.1, schedule="constant"), train, batch_size=33)
    names = ("t", "momentum", "class_sum", "class_count")
    return {k: v.clone() for k, v in distiller.state_dict().items() if k in names}


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    _run(os.path.join(tmp, "run"), epochs=2)
    student, result = _run(os.path.join(tmp, "run"), epochs=3, resume=True)
    torch.save(
        {"state": student.state_dict(), "result": result.to_dict()},
        os.path.join(tmp, f"rank{rank}.pt"),
    )
    # a method that draws random numbers every step: resumed, each process continues its own
    # stream, so the run equals an uninterrupted one
    _run(os.path.join(tmp, "flow"), epochs=1, method="flowdistill")
    resumed, _ = _run(os.path.join(tmp, "flow"), epochs=2, resume=True, method="flowdistill")
    straight, _ = _run(os.path.join(tmp, "flow-straight"), epochs=2, method="flowdistill")
    torch.save(
        {"resumed": resumed.state_dict(), "straight": straight.state_dict()},
        os.path.join(tmp, f"flow{rank}.pt"),
    )
    for method in ("taid", "nd"):  # state updated at every step from the batch
        torch.save(_schedule_state(method), os.path.join(tmp, f"{method}{rank}.pt"))
    keyword, _ = _run(os.path.join(tmp, "keyword"), epochs=2, keyword=True)
    torch.save(keyword.state_dict(), os.path.join(tmp, f"keyword{rank}.pt"))
    teacher, other = _models()
    crd = flowdistill.make_distiller(
        "crd", teacher, other, example_input=torch.zeros(2, 12), student_taps=["1"],
        teacher_taps=["1"],
    )  # fmt: skip
    try:
        fit(crd, _data(), train=TrainConfig(epochs=1, progress=False, device="cpu"))
    except ConfigError as err:
        message = str(err)
    else:
        message = ""
    with open(os.path.join(tmp, f"crd{rank}.txt"), "w") as f:
        f.write(message)
    batch = flowdistill.make_distiller(
        "crd", teacher, other, example_input=torch.zeros(2, 12), student_taps=["1"],
        teacher_taps=["1"], mode="batch",
    )  # fmt: skip
    fit(batch, _data(), train=TrainConfig(epochs=1, progress=False, device="cpu"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batches_shard_each_global_batch_across_processes():
    data = Split(torch.arange(70.0)[:, None], torch.zeros(70, dtype=torch.long))
    single = Batches(data, 16, shuffle=True, seed=3)
    parts = [Batches(data, 16, shuffle=True, seed=3, rank=r, world=3) for r in range(3)]
    assert len(single) == 5 and all(len(p) == 5 for p in parts)  # last global batch: 6 ≥ 3
    for whole, *shards in zip(single, *parts, strict=True):
        merged = torch.cat([s[0] for s in shards]).flatten().sort().values
        assert torch.equal(merged, whole[0].flatten().sort().values)
    # a last global batch smaller than the number of processes is dropped by all of them
    assert len(Batches(data, 17, shuffle=False, rank=1, world=3)) == 4
    with pytest.raises(ValueError, match="rank"):
        Batches(data, 16, shuffle=False, rank=2, world=2)


def test_two_process_training_matches_one_process(tmp_path):
    """Two gloo processes, each on half of every batch (17 and 16 of 33: each share weighs as
    its samples do), with the gradients averaged by DDP:
    both end with the same weights, equal to a single-process run on whole batches (the
    model has no batch statistics, so the two are the same computation); rank 0 alone writes
    the run, which resumes under DDP as well."""
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k, v in r0["state"].items():
        torch.testing.assert_close(r1["state"][k], v, rtol=0, atol=0)
    _run(tmp_path / "single", epochs=2)  # the same interrupted-and-resumed schedule
    single, result = _run(tmp_path / "single", epochs=3, resume=True)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-5, atol=1e-6)
    assert r0["result"]["test_acc_last"] == result.test_acc_last
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    for mine, theirs in zip(history, result.history, strict=True):  # metrics summed over ranks
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
    # TAID's t follows the whole run's progress and loss, ND's centres every process's
    # samples, as in one process (t: up to the loss averaged over two shares of a batch)
    for method in ("taid", "nd"):
        single = _schedule_state(method)
        for rank in (0, 1):
            state = torch.load(tmp_path / f"{method}{rank}.pt")
            assert set(state) == set(single) and state, method
            for k, v in single.items():
                torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # inputs given as a dict (the models take them by keyword): the same run, sharded alike
    plain, _ = _run(tmp_path / "plain", epochs=2)
    for rank in (0, 1):
        keyword = torch.load(tmp_path / f"keyword{rank}.pt")
        for k, v in plain.state_dict().items():
            torch.testing.assert_close(keyword[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for rank in (0, 1):
        assert "data-parallel" in (tmp_path / f"crd{rank}.txt").read_text()
        flow = torch.load(tmp_path / f"flow{rank}.pt")
        for k, v in flow["straight"].items():
            torch.testing.assert_close(flow["resumed"][k], v, rtol=0, atol=0, msg=k)


@pytest.mark.skipif(
    not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun is not installed next to this interpreter",
)
def test_torchrun_bench(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun, "--standalone", "--nproc_per_node", "2", "-m", "flowdistill", "bench",
        "--suite", "digits", "--methods", "kd", "--seeds", "1", "--epochs", "1",
        "--out", str(tmp_path / "b"), "--teacher-cache", str(tmp_path / "cache"),
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| kd |") == 1  # one table: rank 0 alone prints
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(results["summary"]) == {"student", "kd"}
    assert results["provenance"]["machine"]["processes"] == 2
    # a method that cannot train data-parallel is refused before the teacher trains
    crd = [*cmd[:10], "kd,crd", *cmd[11:]]
    crd[crd.index(str(tmp_path / "b"))] = str(tmp_path / "c")
    crd[crd.index(str(tmp_path / "cache"))] = str(tmp_path / "cache2")
    done = subprocess.run(crd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0 and "'crd' keeps per-sample state" in done.stderr
    assert not (tmp_path / "cache2").exists()
