"""Incremental detokenization and stop strings for streamed generation.

`IncrementalDetokenizer` turns one token at a time into text deltas without ever emitting half of a multi-byte
UTF-8 character: a byte-level token that ends mid-character decodes to U+FFFD, so its text is held back until the
following tokens complete it. Decoding always starts a few tokens back (`prefix_offset`) so tokenizers that drop
a leading space when decoding a lone token (SentencePiece) still produce the right spacing, and each step decodes
only a handful of tokens instead of the whole answer.

`StopMatcher` ends the text before the first stop string and holds back any tail that might be the start of one,
so a client never sees part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Token ids in, text deltas out (one `push` per generated token)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], context_tokens: int = 5) -> None:
        self._tokenizer = tokenizer
        tail = list(prompt_ids[-context_tokens:]) if context_tokens else []
        self._ids: list[int] = tail
        self._prefix_offset = 0
        self._read_offset = len(tail)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ('' while a character is still incomplete)."""
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            delta = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""


class StopMatcher:
    """Applies stop strings to a stream of text deltas."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text safe to emit now; sets `stopped` once a stop string appeared (the text before it is returned)."""
        if not self._stops:
            return delta
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        keep = self._partial_stop_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Text held back because it could have started a stop string (the stream ended without one)."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
