"""Plain text for causal language models: a character tokenizer and next-token splits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import DataError
from .datasets import Split, Splits

__all__ = ["CharTokenizer", "char_splits", "token_windows"]


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
