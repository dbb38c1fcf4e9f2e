"""Compile each structured-output constraint once, off the caller's thread, within a time limit.

What every engine's grammar layer needs, whatever it compiles to (an llguidance matcher template in
agent.engine.structured.grammar, an EBNF text for OpenVINO's pipeline in agent.engine.openvino.structured): results
are kept in an LRU of GRAMMAR_CACHE_SIZE; concurrent requests with one new constraint share one compile; a compile
slower than GRAMMAR_COMPILE_TIMEOUT_S is refused with 400 while its thread finishes in the background, and the
constraint is remembered as too slow, so sending it again is refused at once instead of tying up a thread again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Generic, TypeVar

from agent.engine.errors import InvalidRequestError
from agent.engine.types import OutputConstraint

T = TypeVar("T")
_TOO_SLOW_REMEMBERED = 256


@dataclass(frozen=True)
class GrammarLimits:
    """GRAMMAR_CACHE_SIZE and GRAMMAR_COMPILE_TIMEOUT_S."""

    cache_size: int = 64
    compile_timeout_s: float = 10.0


class CompileCache(Generic[T]):
    """Constraint -> compiled T. Subclasses say how one constraint compiles (`_build`, on a pool thread; raising
    InvalidRequestError for a constraint that cannot be compiled)."""

    def __init__(self, limits: GrammarLimits | None, threads: int, thread_name: str) -> None:
        self.limits = limits or GrammarLimits()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=thread_name)
        self._lock = threading.Lock()
        self._lru: collections.OrderedDict[OutputConstraint, T] = collections.OrderedDict()
        self._pending: dict[OutputConstraint, concurrent.futures.Future[T]] = {}
        self._too_slow: collections.OrderedDict[OutputConstraint, None] = collections.OrderedDict()
        self.compiles = 0  # constraints actually compiled (tests and the bench read it)

    def _build(self, constraint: OutputConstraint) -> T:
        raise NotImplementedError

    def cached(self, constraint: OutputConstraint) -> T | None:
        """The compiled constraint if it is in the LRU (marking it recently used), else None."""
        with self._lock:
            compiled = self._lru.get(constraint)
            if compiled is not None:
                self._lru.move_to_end(constraint)
            return compiled

    async def get(self, constraint: OutputConstraint) -> T:
        """The compiled constraint; InvalidRequestError (400) when it cannot be compiled, or not in time."""
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
                future.add_done_callback(lambda _f, c=constraint: self._settle(c))
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.limits.compile_timeout_s)
        except TimeoutError:
            with self._lock:
                self._too_slow[constraint] = None
                while len(self._too_slow) > _TOO_SLOW_REMEMBERED:
                    self._too_slow.popitem(last=False)
            raise self._timeout_error() from None

    def get_blocking(self, constraint: OutputConstraint) -> T:
        """`get` for synchronous callers (tests, the bench): same cache, same errors, no timeout."""
        compiled = self.cached(constraint)
        return compiled if compiled is not None else self._pool.submit(self._compile, constraint).result()

    def _timeout_error(self) -> InvalidRequestError:
        return InvalidRequestError(
            f"response_format: the schema's grammar did not compile within GRAMMAR_COMPILE_TIMEOUT_S="
            f"{self.limits.compile_timeout_s:g} s; simplify it (fewer enum values, less nesting)"
        )

    def _compile(self, constraint: OutputConstraint) -> T:
        compiled = self._build(constraint)
        self.compiles += 1
        with self._lock:
            if constraint not in self._too_slow:
                self._lru[constraint] = compiled
                self._lru.move_to_end(constraint)
                while len(self._lru) > max(self.limits.cache_size, 0):
                    self._lru.popitem(last=False)
        return compiled

    def _settle(self, constraint: OutputConstraint) -> None:
        with self._lock:
            self._pending.pop(constraint, None)
            if constraint in self._too_slow:
                self._lru.pop(constraint, None)  # refused once for its compile time: keep refusing it

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
