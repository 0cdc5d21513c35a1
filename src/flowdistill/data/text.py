"""Plain text for causal language models: a character tokenizer and next-token splits."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .datasets import Split, Splits
from .inputs import IGNORE_INDEX

__all__ = [
    "CharTokenizer",
    "char_splits",
    "line_splits",
    "packed_sequences",
    "padded_sequences",
    "token_windows",
]


class CharTokenizer:
    """Characters to ids through a fixed vocabulary (sorted characters of a corpus).

    >>> tok = CharTokenizer.from_text("hello world")
    >>> tok.vocab_size, tok.decode(tok.encode("hello"))
    (8, 'hello')
    """

    def __init__(self, vocab: list[str]) -> None:
        bad = [c for c in vocab if not isinstance(c, str) or len(c) != 1]
        if bad or len(set(vocab)) != len(vocab):
            what = f"{bad[0]!r} is not a single character" if bad else "it repeats a character"
            raise DataError(f"a character vocabulary holds distinct single characters; {what}")
        self.vocab = list(vocab)
        self.index = {c: i for i, c in enumerate(self.vocab)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise DataError("cannot build a vocabulary from empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Ids of ``text`` (int64); a character outside the vocabulary raises DataError."""
        try:
            return torch.tensor([self.index[c] for c in text], dtype=torch.long)
        except KeyError as err:
            raise DataError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.vocab[i] for i in ids)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"vocab": self.vocab}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        """A vocabulary written by :meth:`save`; a missing or malformed file is named."""
        try:
            saved = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{path} is not a saved CharTokenizer: {err}") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("vocab"), list):
            raise DataError(
                f"{path} is not a saved CharTokenizer: expected a JSON object whose 'vocab' is "
                "a list of characters"
            )
        vocab = saved["vocab"]
        try:
            return cls(vocab)
        except DataError as err:
            raise DataError(f"{path} is not a saved CharTokenizer: {err}") from None


def token_windows(ids: torch.Tensor, block_size: int) -> Split:
    """Non-overlapping windows of ``block_size + 1`` ids as a :class:`Split`: inputs
    ``x = w[:, :-1]`` and next-token targets ``y = w[:, 1:]``, each ``(N, block_size)``
    (a tail shorter than a window is dropped)."""
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    n = (len(ids) - 1) // block_size
    if n < 1:
        raise DataError(f"{len(ids)} tokens are too few for one window of {block_size + 1}")
    starts = torch.arange(n) * block_size
    w = ids[starts[:, None] + torch.arange(block_size + 1)]  # (N, block_size + 1)
    return Split(w[:, :-1].contiguous(), w[:, 1:].contiguous())


def _token_rows(sequences: Sequence[Sequence[int] | torch.Tensor], who: str) -> list:
    """The sequences as 1-d int64 tensors; none at all is refused, naming ``who``."""
    rows = [torch.as_tensor(s, dtype=torch.long).flatten() for s in sequences]
    if not rows:
        raise DataError(f"{who}: no sequences given")
    return rows


def padded_sequences(
    sequences: Sequence[Sequence[int] | torch.Tensor],
    side: str = "right",
    pad_id: int = 0,
    length: int | None = None,
    position_ids: bool = False,
) -> Split:
    """Token sequences of different lengths as one next-token :class:`Split`, padded on
    ``side`` (``"right"`` or ``"left"``) to the longest (or to ``length``).

    Each sequence ``s`` gives inputs ``s[:-1]`` and targets ``s[1:]``. ``x`` is a dict that
    the models take as keyword arguments: ``input_ids`` ``(N, L)`` (``pad_id`` at padding)
    and ``attention_mask`` ``(N, L)`` (1 at real tokens, 0 at padding), and with
    ``position_ids=True`` also ``position_ids`` (``0, 1, ...`` over the real tokens, 0 at
    padding) for a model that does not count positions from the mask itself (a Hugging Face
    model under left padding). ``y`` is ``(N, L)``, -100 at padding, which every loss leaves
    out.

    >>> split = padded_sequences([[5, 6, 7], [8, 9]], side="left")
    >>> split.x["input_ids"].tolist(), split.x["attention_mask"].tolist(), split.y.tolist()
    ([[5, 6], [0, 8]], [[1, 1], [0, 1]], [[6, 7], [-100, 9]])
    """
    if side not in ("right", "left"):
        raise ConfigError(f"padded_sequences: side is 'right' or 'left', got {side!r}")
    rows = _token_rows(sequences, "padded_sequences")
    short = [i for i, r in enumerate(rows) if len(r) < 2]
    if short:
        raise DataError(
            f"padded_sequences: sequence {short[0]} has {len(rows[short[0]])} token(s); each "
            "needs at least 2 (an input and the token that follows it)"
        )
    longest = max(len(r) for r in rows) - 1
    width = longest if length is None else int(length)
    if width < longest:
        raise DataError(
            f"padded_sequences: length {width} is shorter than the longest sequence's "
            f"{longest} inputs"
        )
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r) - 1
        at = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, at], targets[i, at], mask[i, at] = r[:-1], r[1:], 1
    x = {"input_ids": ids, "attention_mask": mask}
    if position_ids:
        x["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    return Split(x, targets)


def packed_sequences(sequences: Sequence[Sequence[int] | torch.Tensor], length: int) -> Split:
    """Token sequences packed several to a row of ``length`` positions, in order (a
    sequence goes to the current row while it fits, else it starts the next one).

    Each sequence ``s`` gives inputs ``s[:-1]`` and targets ``s[1:]``, so no target crosses
    into the next document. ``x`` holds ``input_ids``, ``position_ids`` (``0, 1, ...``
    restarting at each document: where they restart a new document begins, as in Hugging
    Face's flattening collator) and ``attention_mask`` (0 at the padding that ends a row);
    ``y`` is -100 at that padding. The project's ``gpt`` attends within each document only;
    so do FlowDistill's causal context and the attention fields of FlowDistill and FM-KT.

    >>> split = packed_sequences([[5, 6, 7], [8, 9], [1, 2, 3, 4]], length=4)
    >>> split.x["input_ids"].tolist(), split.x["position_ids"].tolist(), split.y.tolist()
    ([[5, 6, 8, 0], [1, 2, 3, 0]], [[0, 1, 0, 0], [0, 1, 2, 0]], [[6, 7, 9, -100], [2, 3, 4, -100]])
    """
    rows = _token_rows(sequences, "packed_sequences")
    for i, r in enumerate(rows):
        if not 2 <= len(r) <= length + 1:
            raise DataError(
                f"packed_sequences: sequence {i} has {len(r)} tokens; each needs 2 to "
                f"length + 1 = {length + 1} (its inputs must fit one row)"
            )
    packed: list[list[torch.Tensor]] = [[]]
    used = 0
    for r in rows:
        if used + len(r) - 1 > length:
            packed.append([])
            used = 0
        packed[-1].append(r)
        used += len(r) - 1
    ids = torch.zeros(len(packed), length, dtype=torch.long)
    pos = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, IGNORE_INDEX)
    for i, row in enumerate(packed):
        at = 0
        for r in row:
            n = len(r) - 1
            ids[i, at : at + n], targets[i, at : at + n] = r[:-1], r[1:]
            pos[i, at : at + n], mask[i, at : at + n] = torch.arange(n), 1
            at += n
    return Split({"input_ids": ids, "position_ids": pos, "attention_mask": mask}, targets)


def char_splits(
    text: str,
    block_size: int,
    val_fraction: float = 0.1,
    tokenizer: CharTokenizer | None = None,
    select_fraction: float = 0.0,
) -> tuple[Splits, CharTokenizer]:
    """A corpus as next-character splits: the first ``1 - val_fraction`` of the text trains,
    the rest is held out (the usual 90/10 split of Tiny Shakespeare, whose held-out part is
    called its validation split) and is ``data.test``.

    With ``select_fraction`` > 0 the end of the training text (that fraction of it) is held
    back as ``data.val``, the split that epochs and hyper-parameters are chosen on; the
    windows before it train. With ``select_fraction=0`` nothing is held back and
    ``data.val`` *is* the held-out split, so nothing may be chosen on it: report the last
    epoch."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if not 0.0 <= select_fraction < 1.0:
        raise DataError(f"select_fraction must lie in [0, 1), got {select_fraction}")
    tokenizer = tokenizer or CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    cut = int(len(ids) * (1.0 - val_fraction))

    def windows(part: torch.Tensor, name: str) -> Split:
        try:
            return token_windows(part, block_size)
        except DataError as err:
            if block_size < 1:
                raise
            raise DataError(
                f"the {name} of a {len(ids):,}-character text: {err}; lower block_size or "
                "give that split a larger fraction of the text"
            ) from None

    held = windows(ids[cut:], f"held-out split (the last {val_fraction:g})")
    if select_fraction == 0.0:
        train = windows(ids[:cut], "training split")
        return Splits(train, held, held, num_classes=tokenizer.vocab_size), tokenizer
    fit_end = int(cut * (1.0 - select_fraction))
    train = windows(ids[:fit_end], "training split")
    select_name = f"selection split (the last {select_fraction:g} of the training text)"
    select = windows(ids[fit_end:cut], select_name)
    return Splits(train, select, held, num_classes=tokenizer.vocab_size), tokenizer


def line_splits(
    text: str,
    block_size: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    side: str = "right",
    seed: int = 0,
    tokenizer: CharTokenizer | None = None,
) -> tuple[Splits, CharTokenizer]:
    """A corpus of documents, one per line, as padded next-character splits.

    Lines end at ``\n`` (``\r\n`` and ``\r`` too); blank lines and lines of one character
    (which predict nothing) are skipped. A line longer
    than ``block_size + 1`` characters is cut into pieces of that length that overlap by one
    character, as next-character windows do, so that every character after a line's first
    is a target once. The documents are shuffled by ``seed`` and the last
    ``test_fraction`` of them held out as ``data.test``, the ``val_fraction`` before them
    as ``data.val`` (a document's pieces stay in one split). Each split is
    :func:`padded_sequences` on ``side``: inputs ``{"input_ids", "attention_mask"}`` of
    ``block_size`` positions, targets -100 at the pads."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise DataError(f"{name} must lie in (0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val_fraction + test_fraction must leave documents to train on, got "
            f"{val_fraction} + {test_fraction}"
        )
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    ends = text.replace("\r\n", "\n").replace("\r", "\n")  # (not str.splitlines: it
    # (a line of one character predicts nothing: it takes no document's place)
    lines = [line for line in ends.split("\n") if line.strip() and len(line) >= 2]
    tokenizer = tokenizer or CharTokenizer.from_text("".join(lines) or text)
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test, n_val = round(len(lines) * test_fraction), round(len(lines) * val_fraction)
    n_train = len(lines) - n_test - n_val
    if min(n_train, n_val, n_test) < 1:
        raise DataError(
            f"a corpus of {len(lines)} lines of two characters or more gives {n_train} "
            f"training, {n_val} validation and {n_test} test documents; each split needs one "
            "(more lines, or larger fractions)"
        )
    width = block_size + 1

    def part(indices: list[int], name: str) -> Split:
        pieces = []
        for i in indices:
            ids = tokenizer.encode(lines[i])
            pieces += [ids[s : s + width] for s in range(0, len(ids) - 1, block_size)]
        if not pieces:
            raise DataError(
                f"the {name} split holds no document of two characters or more (one "
                "character predicts nothing): give it more lines, or other fractions"
            )
        return padded_sequences(pieces, side=side, length=block_size)

    train = part(order[:n_train], "training")
    val = part(order[n_train : n_train + n_val], "validation")
    test = part(order[n_train + n_val :], "test")
    return Splits(train, val, test, num_classes=tokenizer.vocab_size), tokenizer
