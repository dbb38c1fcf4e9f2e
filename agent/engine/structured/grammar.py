"""Constrained decoding for the engines we drive ourselves (transformers, ONNX), on xgrammar.

Why xgrammar (0.2.8, already installed: vLLM depends on it): it compiles JSON Schemas to a grammar with a per-token
bitmask precomputed for most of its states, so filling a row's mask takes tens of microseconds; vLLM's default
structured-output backend is xgrammar too, so every engine enforces the same grammar for the same schema
(llguidance is also installed; it would do, but would mean two grammar dialects across our engines).

- `GrammarCache` (one per loaded model): compiles a constraint once and keeps the result in an LRU of
  GRAMMAR_CACHE_SIZE entries. Compiling runs on a small thread pool, never on the event loop or a scheduler thread;
  a compile slower than GRAMMAR_COMPILE_TIMEOUT_S is refused with 400 (the thread finishes in the background and the
  schema is remembered as too slow, so sending it again is refused at once), and a schema xgrammar cannot compile is
  a 400 naming xgrammar's reason. Concurrent requests with one new schema share one compile.
- `GrammarState` (one per constrained request): xgrammar's matcher, advanced with each accepted token.
- `apply_masks`: in a scheduler's batched step, fills the bitmask of the constrained rows and applies it to the
  logits in place (torch; numpy logits are wrapped zero-copy), so constrained and free rows share one batch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agent.engine.errors import InvalidRequestError
from agent.engine.types import OutputConstraint

log = logging.getLogger(__name__)

_COMPILE_THREADS = 2  # compiles run beside generation: at most this many cores go to them
_TOO_SLOW_REMEMBERED = 256
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # what `json_object` means (as in vLLM)


@dataclass(frozen=True)
class GrammarLimits:
    """GRAMMAR_CACHE_SIZE and GRAMMAR_COMPILE_TIMEOUT_S."""

    cache_size: int = 64
    compile_timeout_s: float = 10.0


class GrammarCache:
    """Compiles constraints for one tokenizer/vocabulary, off the caller's thread, with an LRU of the results."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], limits: GrammarLimits | None = None
    ) -> None:
        import xgrammar as xgr

        self.limits = limits or GrammarLimits()
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids)
        # Our LRU bounds the memory; xgrammar's own cache would keep a second copy.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()
        self._lru: collections.OrderedDict[OutputConstraint, Any] = collections.OrderedDict()
        self._pending: dict[OutputConstraint, concurrent.futures.Future[Any]] = {}
        self._too_slow: collections.OrderedDict[OutputConstraint, None] = collections.OrderedDict()
        self.compiles = 0  # grammars actually compiled (tests and the bench read it)

    def cached(self, constraint: OutputConstraint) -> Any | None:
        """The compiled grammar if it is in the LRU (marking it recently used), else None."""
        with self._lock:
            compiled = self._lru.get(constraint)
            if compiled is not None:
                self._lru.move_to_end(constraint)
            return compiled

    async def get(self, constraint: OutputConstraint) -> Any:
        """The compiled grammar for `constraint`; InvalidRequestError (400) when it cannot be compiled in time."""
        compiled = self.cached(constraint)
        if compiled is not None:
            return compiled
        with self._lock:
            if constraint in self._too_slow:
                raise self._timeout_error()
            future = self._pending.get(constraint)
            if future is None:
                future = self._pool.submit(self._compile, constraint)
                self._pending[constraint] = future
                future.add_done_callback(lambda f, c=constraint: self._settle(c, f))
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.limits.compile_timeout_s)
        except TimeoutError:
            with self._lock:
                self._too_slow[constraint] = None
                while len(self._too_slow) > _TOO_SLOW_REMEMBERED:
                    self._too_slow.popitem(last=False)
            raise self._timeout_error() from None

    def get_blocking(self, constraint: OutputConstraint) -> Any:
        """`get` for synchronous callers (tests, the bench): same cache, same errors, no timeout."""
        compiled = self.cached(constraint)
        return compiled if compiled is not None else self._pool.submit(self._compile, constraint).result()

    def _timeout_error(self) -> InvalidRequestError:
        return InvalidRequestError(
            f"response_format: the schema's grammar did not compile within GRAMMAR_COMPILE_TIMEOUT_S="
            f"{self.limits.compile_timeout_s:g} s; simplify it (fewer enum values, less nesting)"
        )

    def _compile(self, constraint: OutputConstraint) -> Any:
        try:
            # Compact JSON (no free whitespace: a small model cannot loop on spaces or newlines), compiled exactly as
            # vLLM's xgrammar backend does with disable_any_whitespace, so every engine accepts the same texts.
            schema = JSON_OBJECT_SCHEMA if constraint.kind == "json_object" else constraint.schema
            compiled = self._compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        except Exception as exc:  # xgrammar raises RuntimeError with its parser's message
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise InvalidRequestError(f"response_format: the schema cannot be compiled: {_short(reason)}") from None
        self.compiles += 1
        with self._lock:
            self._lru[constraint] = compiled
            self._lru.move_to_end(constraint)
            while len(self._lru) > max(self.limits.cache_size, 0):
                self._lru.popitem(last=False)
        return compiled

    def _settle(self, constraint: OutputConstraint, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.pop(constraint, None)
            if constraint in self._too_slow:
                self._lru.pop(constraint, None)  # refused once for its compile time: keep refusing it

    async def state(self, constraint: OutputConstraint | None) -> GrammarState | None:
        """A fresh per-request matcher for `constraint` (None when unconstrained)."""
        if constraint is None:
            return None
        return GrammarState(await self.get(constraint), self.stop_token_ids, self.vocab_size)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _short(text: str, limit: int = 300) -> str:
    # xgrammar prefixes "[time] /path/file.cc:line: "; the reason is what follows.
    if ".cc:" in text:
        text = text.split(".cc:", 1)[1].split(": ", 1)[-1]
    return text[:limit]


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, compiled: Any, stop_token_ids: Sequence[int], vocab_size: int) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids))

    @property
    def matcher(self) -> Any:
        """xgrammar's GrammarMatcher (`apply_masks` fills many rows' masks at once from them)."""
        return self._matcher

    def accept(self, token: int) -> bool:
        """Advance with the token the row produced; False if the grammar did not allow it."""
        return bool(self._matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its end token was accepted: nothing more may be generated."""
        return bool(self._matcher.is_terminated())


@functools.cache
def _batch_matcher() -> Any:
    import xgrammar as xgr

    from agent.engine.cpu import usable_cores

    return xgr.BatchGrammarMatcher(max_threads=usable_cores())


def apply_masks(logits: torch.Tensor | np.ndarray, states: Sequence[GrammarState | None]) -> None:
    """Set the logits of tokens each constrained row's grammar forbids to -inf, in place ([B, V] float32, CPU).

    Rows whose state is None are left untouched (bit for bit), so free rows in a batch with constrained ones give the
    tokens they would alone.
    """
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return
    import xgrammar as xgr

    tensor = torch.from_numpy(logits) if isinstance(logits, np.ndarray) else logits  # zero-copy for numpy
    vocab = states[rows[0]].vocab_size  # type: ignore[union-attr]
    bitmask = xgr.allocate_token_bitmask(len(states), vocab)
    matchers = [states[i].matcher for i in rows]  # type: ignore[union-attr]
    # A row's mask can take milliseconds (e.g. inside a string with maxLength): fill the rows on several threads
    # (the model is idle meanwhile: masks are filled between forward passes).
    _batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask, rows)
    xgr.apply_token_bitmask_inplace(tensor, bitmask, vocab_size=min(vocab, tensor.shape[-1]), indices=rows)
    if tensor.shape[-1] > vocab:  # the model's padding ids beyond the tokenizer's vocabulary are never valid
        tensor[rows, vocab:] = float("-inf")


class LazyGrammarCache:
    """An engine's `GrammarCache`, built on the first constrained request (reading the vocabulary takes ~1 s, which
    unconstrained deployments never pay)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], limits: GrammarLimits) -> None:
        self._args = (tokenizer, vocab_size, frozenset(stop_token_ids), limits)
        self._lock = threading.Lock()
        self._cache: GrammarCache | None = None

    def cache(self) -> GrammarCache:
        """The cache, built now if needed (blocking: call off the event loop)."""
        with self._lock:
            if self._cache is None:
                tokenizer, vocab, stops, limits = self._args
                self._cache = GrammarCache(tokenizer, vocab, stops, limits)
            return self._cache

    async def state(self, constraint: OutputConstraint | None) -> GrammarState | None:
        """A fresh matcher for a request's constraint (None when unconstrained)."""
        if constraint is None:
            return None
        cache = self._cache or await asyncio.to_thread(self.cache)
        return await cache.state(constraint)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
