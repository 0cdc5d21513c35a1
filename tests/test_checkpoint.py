import json

import pytest
import torch

from flowdistill.engine.checkpoint import (
    load_checkpoint,
    load_model_weights,
    pack_optimizer,
    save_checkpoint,
    unpack_optimizer,
)
from flowdistill.errors import CheckpointError


def test_round_trip_and_no_temporary_files(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "scalar": torch.tensor(2.5)}
    save_checkpoint(tmp_path / "c.safetensors", tensors, {"epoch": 3, "nested": {"x": [1, 2]}})
    loaded, meta = load_checkpoint(tmp_path / "c.safetensors")
    assert meta == {"epoch": 3, "nested": {"x": [1, 2]}}
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_corrupted_and_truncated_files_are_rejected(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(64)}, {"epoch": 0})
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # flip bits inside the tensor data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(tmp_path / "flipped.safetensors")
    (tmp_path / "short.safetensors").write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, {"epoch": 1})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"w": torch.ones(2)}, {"epoch": object()})  # not JSON
    tensors, meta = load_checkpoint(path)
    assert meta["epoch"] == 1 and torch.equal(tensors["w"], torch.zeros(2))
    assert len(list(tmp_path.iterdir())) == 1


def test_optimizer_state_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = pack_optimizer(opt)
    json.dumps(meta)  # the non-tensor part is plain JSON
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    unpack_optimizer(fresh, tensors, json.loads(json.dumps(meta)))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx in a["state"]:
        for key, value in a["state"][idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][idx][key]))


def test_load_model_weights_checks_fit(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_checkpoint(
        tmp_path / "m.safetensors", {f"student.{k}": v for k, v in model.state_dict().items()}, {}
    )
    other = torch.nn.Linear(2, 2)
    load_model_weights(other, tmp_path / "m.safetensors")
    assert torch.equal(other.weight, model.weight)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_weights(torch.nn.Linear(2, 3, bias=False), tmp_path / "m.safetensors")
    wider = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 2))
    save_checkpoint(tmp_path / "w.safetensors", wider.state_dict(), {})
    narrower = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError) as info:  # one line: the first mismatch, the count
        load_model_weights(narrower, tmp_path / "w.safetensors")
    assert "\n" not in str(info.value) and "0.weight" in str(info.value)
    assert str(info.value).endswith("(and 2 more)")


def test_written_files_follow_the_umask_like_open(tmp_path):
    """Atomic writes go through a private temporary file; the result has the mode a plain
    open() would give it, so that others the umask allows can read a run's records."""
    import os

    from flowdistill.engine.checkpoint import atomic_write_text

    atomic_write_text(tmp_path / "a.json", "{}")
    (tmp_path / "b.json").write_text("{}")
    mode = lambda name: os.stat(tmp_path / name).st_mode & 0o777  # noqa: E731
    assert mode("a.json") == mode("b.json")
