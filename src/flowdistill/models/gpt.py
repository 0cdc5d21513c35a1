"""A small GPT-style causal language model: pre-norm blocks, causal attention through
``torch.nn.functional.scaled_dot_product_attention``, token embedding tied to the output head.

Module paths for feature taps: ``tok_emb``, ``blocks.0`` … ``blocks.{n_layer-1}`` (each
block's output, ``(B, T, n_embd)``), ``ln_f`` and ``head`` (the logits, ``(B, T, vocab)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.inputs import segments
from ..errors import ConfigError, ShapeMismatchError
from .cifar import FeatureInfo
from .registry import register_model

__all__ = ["GPT", "GPTConfig", "gpt"]


@dataclass
class GPTConfig:
    """Size of a :class:`GPT`.

    Attributes:
        vocab_size: number of token ids.
        block_size: longest context (positions are learned up to it).
        n_layer, n_head, n_embd: depth, attention heads, width (``n_embd % n_head == 0``).
        dropout: dropout on embeddings, attention and residual branches.
        bias: biases in the linear layers and layer norms.
    """

    vocab_size: int = 65
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True

    def validate(self) -> GPTConfig:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must lie in [0, 1), got {self.dropout}")
        return self


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``allowed`` ``(B, 1, T, T)``: which keys each query attends to (causal by
        default)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)  # each (B, T, C)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, is_causal=allowed is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, C/H)  # fmt: skip
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, allowed: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), allowed)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(input_ids)`` maps token ids ``(B, T)`` to
    next-token logits ``(B, T, vocab_size)``, position ``i`` seeing tokens ``0..i`` only.

    ``forward(input_ids, attention_mask)`` takes padded sequences: ``attention_mask`` ``(B, T)``
    is 1 at real tokens and 0 at padding, on either side. No token attends to padding, and
    positions count real tokens only, so a sequence's logits at its real tokens are those
    of the unpadded sequence (a padded position attends to itself alone: its logits are
    finite and meaningless; give it target -100). ``position_ids`` ``(B, T)``, when given,
    replace the counted positions (as in Hugging Face models), and where they restart at 0
    a new document begins: rows that pack several documents attend within each document
    only (:func:`flowdistill.data.packed_sequences`)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg.validate()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():  # residual projections scaled with depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    def feature_info(self) -> list[FeatureInfo]:
        """The blocks' outputs and the final layer norm (the features the head reads), shallow
        to deep, each ``(T, n_embd)`` per sample (stride 1: one vector per token)."""
        width = self.config.n_embd
        blocks = [FeatureInfo(name=f"blocks.{i}", channels=width, stride=1)
                  for i in range(self.config.n_layer)]  # fmt: skip
        return [*blocks, FeatureInfo(name="ln_f", channels=width, stride=1)]

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (the name Hugging Face models give it): ``fit`` checks that
        the data's token ids lie in its range before anything trains."""
        return self.tok_emb

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ShapeMismatchError(
                "GPT expects integer token ids (B, T), got "
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
            )
        b, t = input_ids.shape
        if t > self.config.block_size:
            raise ShapeMismatchError(
                f"sequence of {t} tokens exceeds block_size {self.config.block_size}"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
            raise ShapeMismatchError(
                f"GPT: attention_mask has shape {tuple(attention_mask.shape)}, the token "
                f"ids {(b, t)}; it marks each token 1 (real) or 0 (padding)"
            )
        if position_ids is not None and tuple(position_ids.shape) not in ((b, t), (1, t)):
            raise ShapeMismatchError(
                f"GPT: position_ids have shape {tuple(position_ids.shape)}, the token ids {(b, t)}"
            )
        allowed = None
        pos = torch.arange(t, device=input_ids.device)  # (T,)
        if attention_mask is not None:  # positions count the real tokens
            pos = ((attention_mask != 0).long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        if position_ids is not None:
            pos = position_ids
        seg = segments(attention_mask, position_ids.expand(b, t) if position_ids is not None
                       else None)  # (B, T) documents, 0 at padding  # fmt: skip
        if seg is not None:  # a token attends to the earlier tokens of its own document
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            itself = torch.eye(t, dtype=torch.bool, device=input_ids.device)
            same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)  # (B, T, T)
            allowed = ((causal & same) | itself)[:, None]  # (B, 1, T, T)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x, allowed)
        return self.head(self.ln_f(x))  # (B, T, V)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``(B, T)`` (the context is
        cropped to ``block_size``); ``temperature=0`` takes the most likely token."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :])[:, -1].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


@register_model("gpt")
def gpt(
    vocab_size: int = 65,
    block_size: int = 128,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
    bias: bool = True,
) -> GPT:
    """A :class:`GPT` from its size (keywords of :class:`GPTConfig`)."""
    return GPT(GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias))
