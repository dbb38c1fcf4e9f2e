"""What structured output costs: inter-token latency with a JSON-schema constraint vs without, and schema compile time.

In-process engine (transformers or ONNX) on the embedded SmolLM2, greedy. For each concurrency level, every request
streams up to --tokens tokens, once free (ignore_eos) and once constrained to a schema that lets the answer run long
(a list of short strings); the inter-token latency of a stream is (last chunk - first chunk) / tokens between them,
and the median over the streams is reported. Compile time: a new schema compiled the first time, then fetched from
the cache (agent.engine.structured.grammar).

    python -m bench.structured_output --engine transformers --levels 1 32 --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from agent.config import DType, Quantization, load_settings
from agent.engine.checkpoints import resolve_model
from agent.engine.spec import EngineSpec
from agent.engine.structured.schema import SchemaLimits, check_schema
from agent.engine.types import GenerationRequest, Message, OutputConstraint, SamplingParams

LONG_SCHEMA = {
    "type": "object",
    "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 8}}},
    "required": ["words"],
}


def inter_token_latency(stamps: Sequence[tuple[float, int]]) -> float | None:
    """Seconds per token of one stream from its (time, completion_tokens) chunk stamps; None under two tokens."""
    if len(stamps) < 2 or stamps[-1][1] <= stamps[0][1]:
        return None
    return (stamps[-1][0] - stamps[0][0]) / (stamps[-1][1] - stamps[0][1])


def _request(i: int, tokens: int, constraint: OutputConstraint | None) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message.text("user", f"List {i + 5} short words as JSON."),),
        sampling=SamplingParams(
            max_new_tokens=tokens, temperature=0.0, ignore_eos=constraint is None, constraint=constraint
        ),
    )


async def _stream(engine: Any, request: GenerationRequest) -> float | None:
    stamps: list[tuple[float, int]] = []
    async for chunk in engine.generate(request):
        stamps.append((time.perf_counter(), chunk.completion_tokens))
    return inter_token_latency(stamps)


async def level(engine: Any, concurrency: int, tokens: int, constraint: OutputConstraint | None) -> float:
    """Median inter-token latency (ms) of `concurrency` simultaneous streams."""
    itls = await asyncio.gather(*(_stream(engine, _request(i, tokens, constraint)) for i in range(concurrency)))
    return 1000 * statistics.median(x for x in itls if x is not None)


async def compile_times(engine: Any) -> dict[str, float]:
    """Milliseconds to get a grammar for a never-seen schema, then for the same schema again (cached)."""
    cache = await asyncio.to_thread(engine.grammar_cache)
    schema = {**LONG_SCHEMA, "title": uuid.uuid4().hex}  # new text: not in the cache
    constraint = OutputConstraint("json_schema", check_schema(schema, SchemaLimits()))
    started = time.perf_counter()
    await cache.get(constraint)
    first = time.perf_counter() - started
    started = time.perf_counter()
    await cache.get(constraint)
    return {"compile_first_ms": 1000 * first, "compile_cached_ms": 1000 * (time.perf_counter() - started)}


async def run(engine_kind: str, levels: Sequence[int], tokens: int) -> dict[str, Any]:
    folder = resolve_model(None, load_settings().model_cache_dir).folder
    spec = EngineSpec(
        folder=folder, name="SmolLM2-135M-Instruct", dtype=DType.float32, quantization=Quantization.none,
        max_batch_size=max(levels),
    )  # fmt: skip
    if engine_kind == "onnx":
        from agent.engine.onnx.engine import OnnxEngine

        engine: Any = OnnxEngine(spec)
    else:
        from agent.engine.transformers.engine import TransformersEngine

        engine = TransformersEngine(spec)
    await engine.start()
    constraint = OutputConstraint("json_schema", check_schema(LONG_SCHEMA, SchemaLimits()))
    out: dict[str, Any] = {"engine": engine_kind, "tokens": tokens, "levels": []}
    try:
        out.update(await compile_times(engine))
        await engine.complete(_request(0, 4, constraint))  # warm: the constraint's grammar is cached from here on
        for concurrency in levels:
            free = await level(engine, concurrency, tokens, None)
            constrained = await level(engine, concurrency, tokens, constraint)
            out["levels"].append({"concurrency": concurrency, "itl_free_ms": free, "itl_json_schema_ms": constrained})
    finally:
        await engine.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("transformers", "onnx"), default="transformers")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.engine, args.levels, args.tokens)), indent=2))


if __name__ == "__main__":
    main()
