"""Checkpoints in safetensors: tensors in the file, everything else as JSON in its header.

A checkpoint is one ``.safetensors`` file, written atomically (a temporary file in the same
folder, flushed, then renamed over the old one), so a crash never leaves half a file. Its
metadata holds a JSON document (epoch, optimizer hyper-parameters, scheduler step, RNG
states, history) and a SHA-256 digest of every tensor, checked on load: a truncated or
altered file raises :class:`~flowdistill.errors.CheckpointError`. Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError

__all__ = [
    "atomic_write_text",
    "digest",
    "load_checkpoint",
    "load_model_weights",
    "pack_optimizer",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "unpack_optimizer",
]

_META_KEY = "flowdistill"


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_umask() -> int:
    mask = os.umask(0o022)  # (the only way to read it is to set it; read once, at import)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 made what open() would make
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Atomically write ``tensors`` and the JSON-serialisable ``meta`` to ``path``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():  # tied weights (a shared embedding/head) are stored apart
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen and v.numel():
            tensors[k] = v.clone()
        seen.add(key)
    header = {_META_KEY: json.dumps(meta), "sha256": digest(tensors)}
    _atomic_replace(Path(path), lambda tmp: save_file(tensors, tmp, metadata=header))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a checkpoint, verified against its digest."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated: {err}") from None
    if "sha256" not in header:
        raise CheckpointError(f"{path} is not a flowdistill checkpoint (no digest in its header)")
    if digest(tensors) != header["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: its tensors fail the digest check")
    try:
        meta = json.loads(header.get(_META_KEY, "{}"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path} has a corrupted header: {err}") from None
    return tensors, meta


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` of a checkpoint, read from its header alone (no tensor is loaded nor
    verified: :func:`load_checkpoint` does that); ``{}`` where the header cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        meta = json.loads(header.get(_META_KEY, "{}"))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike, prefix: str = "") -> None:
    """Load weights saved by the engine (``best.safetensors``/``model.safetensors``) into ``model``.

    Keys under ``prefix`` (``"student."`` for a distillation run) are taken; when ``prefix``
    is empty and the file came from a run, the ``"student."`` keys are used.
    """
    tensors, _ = load_checkpoint(path)
    if not prefix and any(k.startswith("student.") for k in tensors):
        prefix = "student."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # torch lists every mismatch: the first, and how many
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        first = lines[0] if lines else str(err)
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__} (another architecture or "
            f"width?): {first}{more}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}: missing keys "
            f"{result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]}"
        )


# ---------------------------------------------------------------------------- optimizer
def pack_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors and a JSON-serialisable remainder."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = value
            else:
                plain.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def unpack_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entries in meta["plain"].items():
        state.setdefault(int(idx), {}).update(entries)
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in meta["param_groups"]
    ]  # JSON turned tuples (Adam's betas) into lists
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch (CPU and CUDA) RNG states as tensors; Python and NumPy states as JSON."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = meta["python"]
    random.setstate((version, tuple(state), gauss_next))
