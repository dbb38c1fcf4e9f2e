"""One request inside the transformers engine's scheduler, and how its chunks get back to the event loop.

`Outbox` pairs a request's asyncio queue with its event loop; the worker thread hands each step's chunks to a loop
with ONE `loop.call_soon_threadsafe` (`send_all`), so 32 streams cost one wake-up of the loop per step, not 32.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import torch

from agent.engine.detokenize import IncrementalDetokenizer, StopMatcher
from agent.engine.structured.grammar import GrammarState
from agent.engine.transformers.sampling import new_generator
from agent.engine.types import FinishReason, GenerationChunk, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class PreparedPrompt:
    """A request's model inputs, built off the event loop before it is queued."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [patches, dim] (vision models)
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    mm_token_type_ids: list[int] | None = None  # 0 text, 1 image (vision models)

    @property
    def length(self) -> int:
        return len(self.input_ids)


Item = GenerationChunk | BaseException


@dataclass(frozen=True)
class Outbox:
    """Where a sequence's chunks go: an asyncio queue read by `TransformersEngine.generate` on `loop`."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item]

    def emit(self, item: Item) -> None:
        deliver(self.loop, [(self.queue, item)])


def deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue[Item], Item]]) -> None:
    """Put items into their queues from the worker thread, in one hop onto the event loop."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        log.debug("dropped %d items for a closed event loop", len(items))


def _put_all(items: list[tuple[asyncio.Queue[Item], Item]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def send_all(pairs: list[tuple[Outbox, Item]]) -> None:
    """Deliver many sequences' items, one hop per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Item], Item]]] = {}
    for outbox, item in pairs:
        by_loop.setdefault(outbox.loop, []).append((outbox.queue, item))
    for loop, items in by_loop.items():
        deliver(loop, items)


@dataclass
class TransformersSequence:
    """One request inside the scheduler."""

    request_id: str
    prompt: PreparedPrompt
    sampling: SamplingParams
    max_new_tokens: int  # already capped by the context length
    outbox: Outbox
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    grammar: GrammarState | None = None  # structured output: the request's matcher (agent.engine.structured)
    generator: torch.Generator = field(init=False)
    generated: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.generator = new_generator(self.sampling.seed)

    def emit(self, item: Item) -> None:
        self.outbox.emit(item)

    def chunk(self, text: str, finish: FinishReason | None = None) -> GenerationChunk:
        return GenerationChunk(self.request_id, text, self.prompt.length, len(self.generated), finish)

    def accept(self, token: int, eos_ids: frozenset[int]) -> GenerationChunk | None:
        """Take one sampled token; return the chunk to stream (None when there is no text yet and it goes on)."""
        self.generated.append(token)
        finish: FinishReason | None = None
        if self.grammar is not None and not self.grammar.accept(token):
            log.error("request %s: token %d is outside its grammar; ending it", self.request_id, token)
            return self.chunk(self.stop.flush(), "stop")
        # A completed grammar ends the answer (its end token is the only one it allows), ignore_eos or not.
        done = self.grammar is not None and self.grammar.terminated
        if token in eos_ids and (done or not self.sampling.ignore_eos):
            finish, text = "stop", self.stop.flush()
        else:
            text = self.stop.feed(self.detokenizer.push(token))
            if self.stop.stopped:
                finish = "stop"
        if finish is None and len(self.generated) >= self.max_new_tokens:
            finish, text = "length", text + self.stop.flush()
        if text or finish:
            return self.chunk(text, finish)
        return None
