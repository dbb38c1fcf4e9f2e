"""The running batch of the transformers engine: one shared KV cache whose rows are independent sequences.

Layout (all rows left-padded to the same length L):
- `cache`: a transformers `DynamicCache`; each layer holds keys/values of shape [B, heads, L, head_dim];
- `attention_mask` [B, L]: 0 on each row's left padding, 1 on its real tokens;
- `next_pos` [B]: the position id of each row's next token (its real length so far), so rotary positions never
  count padding;
- `rope_delta` [B]: Qwen-VL M-RoPE only: the offset between text and 3D positions after the row's images.

Rows join (`merge`: the shorter side is padded on the left, then rows are concatenated) and leave (`select`: rows
are index-selected, then columns that became padding in every row are trimmed), so continuous batching never
recomputes a running sequence's cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


def check_mergeable(cache: Any) -> None:
    """Only full-attention dynamic layers can be padded and concatenated; sliding-window layers cannot."""
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(f"cache layer {type(layer).__name__} cannot be merged (only DynamicLayer)")


def _pad_left(t: torch.Tensor, cols: int, dim: int) -> torch.Tensor:
    if cols == 0:
        return t
    shape = list(t.shape)
    shape[dim] = cols
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class BatchState:
    cache: Any
    attention_mask: torch.Tensor  # [B, L] long
    next_pos: torch.Tensor  # [B] long
    rope_delta: torch.Tensor  # [B] long
    last_tokens: torch.Tensor  # [B] long: the token each row feeds to the next decode step

    @property
    def size(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])

    def merge(self, other: BatchState) -> None:
        """Append `other`'s rows (e.g. freshly prefilled requests) to this batch."""
        length = max(self.length, other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            for name in ("keys", "values"):
                a = _pad_left(getattr(mine, name), length - self.length, dim=2)
                b = _pad_left(getattr(theirs, name), length - other.length, dim=2)
                setattr(mine, name, torch.cat([a, b], dim=0))
        self.attention_mask = torch.cat(
            [
                _pad_left(self.attention_mask, length - self.length, dim=1),
                _pad_left(other.attention_mask, length - other.length, dim=1),
            ],
            dim=0,
        )
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.rope_delta = torch.cat([self.rope_delta, other.rope_delta])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])

    def select(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order) and drop the left columns that are now padding in every row."""
        index = torch.tensor(keep, dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.attention_mask = mask[:, start:]
        self.next_pos = self.next_pos.index_select(0, index)
        self.rope_delta = self.rope_delta.index_select(0, index)
        self.last_tokens = self.last_tokens.index_select(0, index)

    def decode_inputs(self, mrope: bool) -> dict[str, Any]:
        """Model kwargs for one decode step: each row's last token at its own position."""
        ones = self.attention_mask.new_ones((self.size, 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        pos = self.next_pos.view(-1, 1)
        position_ids = mrope_positions(pos, self.rope_delta) if mrope else pos
        return {
            "input_ids": self.last_tokens.view(-1, 1),
            "attention_mask": self.attention_mask,
            "position_ids": position_ids,
            "past_key_values": self.cache,
        }

    def advance(self, tokens: torch.Tensor) -> None:
        """Record the tokens just sampled (one per row) as the next step's inputs."""
        self.last_tokens = tokens
        self.next_pos = self.next_pos + 1


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (padding gets 1, as transformers' generate does)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def mrope_positions(text_pos: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's [4, B, L] position ids for text-only steps: text positions, then 3 equal M-RoPE axes + delta."""
    vision = (text_pos + delta.view(-1, 1)).unsqueeze(0).expand(3, -1, -1)
    return torch.cat([text_pos.unsqueeze(0), vision], dim=0)
