"""The ONNX engine's KV cache: rows that GroupQueryAttention updates in place, and a prefix cache of prompt KV.

`KvPool` holds, per layer, one key and one value buffer of shape [rows, kv_heads, capacity, head_dim] (float32:
the CPU model quantizes weights only). Running sequence i owns row i, and rows 0..n-1 stay contiguous (a finishing
sequence's row is refilled from the last one), so one decode step binds `buffer[:n]` for the whole batch and a
prefill binds `buffer[i:i+1]`: views, never copies. Each row holds its sequence's tokens at positions 0..len-1;
GroupQueryAttention writes a new token at `len` (it reads each row's length from the attention mask).

`PrefixCache` keeps the KV of prompt prefixes, cut at multiples of `block` tokens (the KV of a position depends only
on the tokens up to it, so any prefix of a stored prompt is valid). A new prompt copies the longest stored prefix
into its row and prefills only the rest: the system prompt that every chat request starts with, and a session's
earlier turns, are computed once. Least recently used prefixes go first when `budget_bytes` is full.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KvShape:
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * 4  # K and V, float32


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class KvPool:
    def __init__(self, shape: KvShape, context_length: int) -> None:
        self.shape = shape
        self.context_length = context_length
        self.rows = 0
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.generation = 0  # bumped whenever the buffers are replaced or freed (views of older ones are stale)

    def sized_for(self, rows: int, tokens: int) -> tuple[int, int]:
        """The (rows, capacity) the pool grows to for `rows` sequences of up to `tokens` tokens (powers of two, so
        a growing batch reallocates only a few times)."""
        capacity = min(_pow2_at_least(tokens), self.context_length)
        return max(self.rows, _pow2_at_least(rows)), max(self.capacity, capacity)

    def bytes_for(self, rows: int, tokens: int) -> int:
        rows, capacity = self.sized_for(rows, tokens)
        return rows * capacity * self.shape.bytes_per_token

    def ensure(self, rows: int, tokens: int, keep: tuple[int, int]) -> None:
        """Make room for `rows` rows of `tokens` positions, keeping the first keep[0] rows' first keep[1] tokens."""
        new_rows, new_capacity = self.sized_for(rows, tokens)
        if new_rows == self.rows and new_capacity == self.capacity:
            return
        s = self.shape
        keep_rows, keep_tokens = keep
        for buffers in (self.keys, self.values):
            for layer in range(s.layers):
                grown = np.empty((new_rows, s.kv_heads, new_capacity, s.head_dim), dtype=np.float32)
                if keep_rows and keep_tokens:
                    grown[:keep_rows, :, :keep_tokens] = buffers[layer][:keep_rows, :, :keep_tokens]
                if layer < len(buffers):
                    buffers[layer] = grown
                else:
                    buffers.append(grown)
        self.rows, self.capacity = new_rows, new_capacity
        self.generation += 1

    def release(self) -> None:
        """Free the buffers (nothing is running)."""
        self.keys, self.values, self.rows, self.capacity = [], [], 0, 0
        self.generation += 1

    def move(self, src: int, dst: int, tokens: int) -> None:
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[dst, :, :tokens] = buffer[src, :, :tokens]

    def read(self, row: int, tokens: int) -> np.ndarray:
        """A copy of one row's first `tokens` positions: [layers, 2, kv_heads, tokens, head_dim] (copied once into
        one array: nested np.stack copied twice into fresh memory, 8x slower for a 128-token prompt)."""
        s = self.shape
        out = np.empty((s.layers, 2, s.kv_heads, tokens, s.head_dim), dtype=np.float32)
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            out[layer, 0] = k[row, :, :tokens]
            out[layer, 1] = v[row, :, :tokens]
        return out

    def write(self, row: int, kv: np.ndarray, tokens: int) -> None:
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            k[row, :, :tokens] = kv[layer, 0, :, :tokens]
            v[row, :, :tokens] = kv[layer, 1, :, :tokens]


class PrefixCache:
    def __init__(self, bytes_per_token: int, budget_bytes: int, block: int = 16) -> None:
        self.block = block
        self.budget_bytes = budget_bytes
        self._bytes_per_token = bytes_per_token
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()  # full stored prefix -> its KV
        self._index: dict[bytes, bytes] = {}  # every block-aligned prefix -> the entry that holds it
        self.used_bytes = 0
        self.hits = 0
        self.hit_tokens = 0

    def lookup(self, tokens: np.ndarray) -> tuple[np.ndarray | None, int]:
        """The KV of the longest stored prefix of `tokens` that leaves at least one token to run, and its length."""
        for length in range((len(tokens) - 1) // self.block * self.block, 0, -self.block):
            entry = self._index.get(tokens[:length].tobytes())
            if entry is not None:
                self._entries.move_to_end(entry)
                self.hits += 1
                self.hit_tokens += length
                return self._entries[entry], length
        return None, 0

    def store(self, tokens: np.ndarray, read: Callable[[int], np.ndarray]) -> None:
        """Keep the KV of `tokens`' longest block-aligned prefix; `read(n)` copies the first n positions' KV."""
        length = len(tokens) // self.block * self.block
        if not length or length * self._bytes_per_token > self.budget_bytes:
            return
        key = tokens[:length].tobytes()
        if key in self._index:
            self._entries.move_to_end(self._index[key])
            return
        self._entries[key] = read(length)
        self.used_bytes += length * self._bytes_per_token
        for cut in range(self.block, length + 1, self.block):
            self._index[tokens[:cut].tobytes()] = key
        while self.used_bytes > self.budget_bytes:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        key, kv = self._entries.popitem(last=False)
        self.used_bytes -= kv.shape[3] * self._bytes_per_token
        for prefix in [p for p, entry in self._index.items() if entry == key]:
            del self._index[prefix]

    def __len__(self) -> int:
        return len(self._entries)
