"""Losses on intermediate features (vectors ``(B, D)``, maps ``(B, C, H, W)``, tokens
``(B, N, D)``)."""

from __future__ import annotations

__all__: list[str] = []
