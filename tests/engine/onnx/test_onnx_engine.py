"""ONNX Runtime GenAI engine: build cache, sampling helpers, and the continuous-batching scheduler with its prefix
cache on the real int4 SmolLM2; batch invariance per precision (fp32 exact on every CPU, int4/int8 within bounds
measured on AVX-512 and AVX2, because ONNX Runtime's quantized kernels differ per CPU: docs/onnx.md).

The engine contract (stream shape, abort, stop strings, ...) is covered by test_contract.py with the "onnx" kind;
these tests cover what is specific to this engine.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest

from agent.config import Quantization
from agent.engine.errors import ModelLoadError
from agent.engine.onnx.build import OnnxBuildOptions, cache_entry, check_buildable, ensure_onnx_model, precision_for
from agent.engine.onnx.sampling import choose_token
from agent.engine.spec import EngineSpec
from agent.engine.types import GenerationChunk, GenerationRequest, Message, SamplingParams

# --- pure helpers (no model) -----------------------------------------------------------------------------------------


def test_choose_token_greedy_banned_and_top_p() -> None:
    logits = np.array([0.0, 5.0, 4.0, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    greedy = SamplingParams(temperature=0.0)
    assert choose_token(logits, greedy, rng) == 1
    assert choose_token(logits, greedy, rng, banned=(1,)) == 2
    # top_p small enough keeps only the most likely token: sampling is then deterministic.
    narrow = SamplingParams(temperature=1.0, top_p=0.5)
    assert {choose_token(logits, narrow, rng) for _ in range(20)} == {1}
    wide = SamplingParams(temperature=1.0, top_p=1.0)
    seen = {choose_token(logits, wide, np.random.default_rng(s)) for s in range(200)}
    assert {1, 2} <= seen


def test_choose_token_same_seed_same_choices() -> None:
    logits = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    a = [choose_token(logits, params, rng) for rng in [np.random.default_rng(3)] * 10]
    b = [choose_token(logits, params, rng) for rng in [np.random.default_rng(3)] * 10]
    assert a == b and len(set(a)) > 1


@pytest.mark.parametrize(
    ("quantization", "precision"),
    [(Quantization.int4, "int4"), (Quantization.int8, "int8"), (Quantization.none, "fp32")],
)
def test_precision_mapping(quantization: Quantization, precision: str) -> None:
    assert precision_for(quantization) == precision


@pytest.mark.parametrize("quantization", [Quantization.awq, Quantization.gptq])
def test_unsupported_quantization_is_a_load_error(quantization: Quantization) -> None:
    with pytest.raises(ModelLoadError) as err:
        precision_for(quantization)
    assert err.value.status == 422 and "int4" in err.value.message


def test_vision_model_is_refused_before_building(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["X"], "vision_config": {}}))
    with pytest.raises(ModelLoadError, match="vision-language"):
        check_buildable(tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        check_buildable(tmp_path / "missing")


def test_cache_key_depends_on_precision_and_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    int4, fp32 = OnnxBuildOptions("int4"), OnnxBuildOptions("fp32")
    keys = {cache_entry(tmp_path / f, tmp_path, o) for f in "ab" for o in (int4, fp32)}
    assert len(keys) == 4
    assert cache_entry(tmp_path / "a", tmp_path, int4).parent == tmp_path / "onnx"


def test_builder_runs_with_python_even_inside_the_triton_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.engine.onnx import build as onnx_build

    monkeypatch.setattr(onnx_build.sys, "executable", "/opt/tritonserver/backends/python/triton_python_backend_stub")
    python = onnx_build._python()
    assert Path(python).name.startswith("python") and Path(python).exists()


async def test_cuda_device_is_refused(tmp_path: Path) -> None:
    from agent.engine.onnx.engine import OnnxEngine

    engine = OnnxEngine(EngineSpec(folder=tmp_path, name="x", device="cuda", quantization=Quantization.int4))
    with pytest.raises(ModelLoadError, match="CPU"):
        await engine.start()


# --- the real int4 model ---------------------------------------------------------------------------------------------


def int4_spec(folder: Path, cache_dir: Path, **changes: object) -> EngineSpec:
    spec = EngineSpec(folder=folder, name="SmolLM2-135M-Instruct", quantization=Quantization.int4, cache_dir=cache_dir)
    return spec.with_(**changes)


@pytest.fixture(scope="module")
async def int4_engine(smollm_folder: Path, model_cache_dir: Path):
    from agent.engine.onnx.engine import OnnxEngine

    engine = OnnxEngine(int4_spec(smollm_folder, model_cache_dir, max_batch_size=16))
    await engine.start()
    yield engine
    await engine.shutdown()


TOPICS = ["a stack", "a queue", "a heap", "a trie", "a graph", "recursion", "hashing", "a binary search tree"]
TUTOR_QUESTIONS = [f"Explain {topic} in {n + 2} sentences, with an example." for n, topic in enumerate(TOPICS)]


def ask(text: str, **sampling: object) -> GenerationRequest:
    params = {"temperature": 0.0, "max_new_tokens": 16, **sampling}
    return GenerationRequest(messages=(Message.text("user", text),), sampling=SamplingParams(**params))


@pytest.mark.slow
async def test_build_is_cached_and_atomic(int4_engine, smollm_folder: Path, model_cache_dir: Path) -> None:
    path = int4_engine.onnx_path
    assert path is not None and (path / "genai_config.json").is_file() and (path / "model.onnx").is_file()
    assert path.parent == model_cache_dir / "onnx"
    assert not list(path.parent.glob("*.tmp-*")), "a temporary build folder was left behind"
    stamp = (path / "model.onnx").stat().st_mtime
    assert ensure_onnx_model(smollm_folder, model_cache_dir, OnnxBuildOptions("int4")) == path
    assert (path / "model.onnx").stat().st_mtime == stamp  # found in the cache, not rebuilt
    assert int4_engine.info().quantization == "int4" and int4_engine.info().dtype == "int4"


@pytest.mark.slow
async def test_failed_build_is_a_load_error_and_leaves_no_cache(tmp_path: Path) -> None:
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}))
    with pytest.raises(ModelLoadError, match="build failed"):
        ensure_onnx_model(folder, tmp_path / "cache", OnnxBuildOptions("int4"))
    assert not list((tmp_path / "cache" / "onnx").iterdir())


@pytest.mark.slow
async def test_batched_greedy_equals_alone(onnx_smollm_engine) -> None:
    """fp32: prompts of different lengths decoded in one batch (rows at different lengths) give the same greedy text
    as each one alone, on every CPU. (int4/int8 kernels round differently with the batch on some CPUs: the quantized
    builds are held to `test_decode_logits_in_a_batch_match_alone_within_the_measured_bound` instead.)"""
    prompts = ["Hi", "What is a binary tree? Answer in one sentence.", "Name a sorting algorithm."]
    alone = [(await onnx_smollm_engine.complete(ask(p, max_new_tokens=20))).text for p in prompts]
    together = await asyncio.gather(*(onnx_smollm_engine.complete(ask(p, max_new_tokens=20)) for p in prompts))
    assert [r.text for r in together] == alone


@pytest.mark.slow
async def test_int4_batched_answers_are_whole_and_start_as_alone(int4_engine) -> None:
    """int4 (the default) in a batch, on every CPU: each answer has the length asked for and starts with the same
    token as alone (a prompt is prefilled in a row of its own, so its first token never depends on the batch); the
    tokens after it may differ where the CPU's int4 kernels round with the batch (bounded below)."""
    prompts = ["Hi", "What is a binary tree? Answer in one sentence.", "Name a sorting algorithm."]
    alone = [await int4_engine.complete(ask(p, max_new_tokens=12, ignore_eos=True)) for p in prompts]
    fresh = [ask(p, max_new_tokens=12, ignore_eos=True) for p in prompts]  # new request ids
    together = await asyncio.gather(*(int4_engine.complete(r) for r in fresh))
    for single, batched in zip(alone, together, strict=True):
        assert (batched.completion_tokens, batched.finish_reason) == (12, "length")
        assert batched.prompt_tokens == single.prompt_tokens
        assert os.path.commonprefix([single.text, batched.text]).strip(), (single.text, batched.text)


# How far a row's logits in a batched decode step may be from the same row's logits computed alone: 4 tutor questions
# prefilled once, 12 greedy decode steps of all 4 rows, then each row replayed alone from the same KV, teacher-forced
# on the batched tokens. ONNX Runtime's MLAS picks its kernels per CPU at run time, and the quantized ones round
# differently with the batch's shape (docs/onnx.md, "Batch invariance per CPU"). Measured 2026-12-07 with exactly
# this set-up, on AVX-512 (Zen 4, this project's build machine) / on AVX2 (the same binaries under
# `qemu-x86_64 -cpu max`: AVX2 + FMA, no AVX-512, no VNNI, which is the kernel choice of a Zen 3):
#                     max |dlogit|   mean |dlogit|   max total variation of the next-token distribution
#   fp32              0 / 0          0 / 0           0 / 0
#   int4 (blocks 32)  0 / 1.34       0 / 0.22        0 / 0.071    (2 of 48 greedy tokens flipped on AVX2)
#   int8 (blocks 128) 2.41 / 0       0.30 / 0        0.137 / 0
# fp32 must stay exact. The quantized bounds are about twice the largest value measured on either CPU kind, which
# still catches a row that attends to one position too few (measured: int4 max 10.1, mean 0.85, TV 0.37; int8 6.2,
# 0.73, 0.29) and anything worse, such as a row reading another row's cache.
BATCH_BOUNDS = {  # precision -> (max |dlogit|, mean |dlogit|, max total variation)
    "fp32": (0.0, 0.0, 0.0),
    "int4": (3.0, 0.45, 0.15),
    "int8": (5.0, 0.6, 0.28),
}


def _decode_steps(runner, rows: slice, lengths: list[int], first: list[int], steps: int, forced=None) -> tuple:
    """`steps` greedy decode steps of KV rows `rows` (holding `lengths` tokens, next inputs `first`), as the
    engine's scheduler runs them. Returns each row's tokens and every step's logits [rows, steps, vocab]; with
    `forced`, row i is fed forced[i] instead of its own greedy tokens (teacher forcing)."""
    lengths, tokens, logits = list(lengths), [[t] for t in first], []
    for step in range(steps):
        cached = np.asarray(lengths)
        mask = (np.arange(int(cached.max()) + 1)[None, :] <= cached[:, None]).astype(np.int64)
        last = [row_tokens[-1] if forced is None else forced[i][step] for i, row_tokens in enumerate(tokens)]
        step_logits = runner.forward(rows, np.asarray(last)[:, None], mask)
        logits.append(step_logits.copy())
        for i, row_logits in enumerate(step_logits):
            lengths[i] += 1
            tokens[i].append(int(row_logits.argmax()))
    return tokens, np.stack(logits, axis=1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4", "int8"])
def test_decode_logits_in_a_batch_match_alone_within_the_measured_bound(
    precision: str, smollm_folder: Path, model_cache_dir: Path
) -> None:
    """What the engine guarantees on every CPU: an fp32 row is computed exactly as alone (greedy text never depends
    on the load); an int4/int8 row's logits stay within the bounds measured above (its greedy text can differ where
    two tokens are nearly tied, as in vLLM and in bf16 on GPUs)."""
    from transformers import AutoTokenizer

    from agent.engine.onnx.kv import KvPool, KvShape
    from agent.engine.onnx.runner import DecoderRunner

    path = ensure_onnx_model(smollm_folder, model_cache_dir, OnnxBuildOptions(precision))
    decoder = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
    shape = KvShape(decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"])
    tokenizer = AutoTokenizer.from_pretrained(smollm_folder)
    prompts = [np.asarray(tokenizer.encode(q, add_special_tokens=False)) for q in TUTOR_QUESTIONS[:4]]
    steps = 12
    pool = KvPool(shape, 4096)
    pool.ensure(len(prompts), max(len(p) for p in prompts) + steps + 1, keep=(0, 0))
    runner = DecoderRunner(path / decoder["filename"], 2, pool)
    first = [  # prefills run one row at a time in the engine too: their KV does not depend on the batch
        int(runner.forward(slice(i, i + 1), p[None], np.ones((1, len(p)), dtype=np.int64))[0].argmax())
        for i, p in enumerate(prompts)
    ]
    prefilled = [(k.copy(), v.copy()) for k, v in zip(pool.keys, pool.values, strict=True)]
    lengths = [len(p) for p in prompts]
    batched_tokens, batched = _decode_steps(runner, slice(0, len(prompts)), lengths, first, steps)
    for (keys, values), (k, v) in zip(zip(pool.keys, pool.values, strict=True), prefilled, strict=True):
        keys[...], values[...] = k, v
    deltas, tvs = [], []
    for i in range(len(prompts)):
        _, alone = _decode_steps(runner, slice(i, i + 1), [lengths[i]], [first[i]], steps, [batched_tokens[i]])
        deltas.append(np.abs(alone[0] - batched[i]))
        tvs.append(0.5 * np.abs(_softmax(alone[0]) - _softmax(batched[i])).sum(axis=-1))
    measured = (float(np.max(deltas)), float(np.mean(deltas)), float(np.max(tvs)))
    bounds = BATCH_BOUNDS[precision]
    assert all(m <= b for m, b in zip(measured, bounds, strict=True)), f"{precision}: {measured} beyond {bounds}"


@pytest.mark.slow
def test_runner_rebinds_the_kv_when_the_pool_grows(smollm_folder: Path, model_cache_dir: Path) -> None:
    """The runner keeps a binding per rows slice; after the pool reallocates, a step must read and write the new
    buffers (same logits as before the move, and the step's KV lands in the new row)."""
    from agent.engine.onnx.kv import KvPool, KvShape
    from agent.engine.onnx.runner import DecoderRunner

    path = ensure_onnx_model(smollm_folder, model_cache_dir, OnnxBuildOptions("int4"))
    decoder = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
    pool = KvPool(KvShape(decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]), 4096)
    pool.ensure(1, 16, keep=(0, 0))
    runner = DecoderRunner(path / decoder["filename"], 2, pool)
    prompt = np.arange(100, 110)[None]
    runner.forward(slice(0, 1), prompt, np.ones((1, 10), dtype=np.int64))
    before = runner.forward(slice(0, 1), np.array([[7]]), np.ones((1, 11), dtype=np.int64)).copy()
    pool.ensure(3, 64, keep=(1, 10))  # new, larger buffers holding the prompt's KV; the old ones are freed
    pool.keys[0][0, :, 10:] = 0.0  # np.empty: whatever was in that memory before
    after = runner.forward(slice(0, 1), np.array([[7]]), np.ones((1, 11), dtype=np.int64))
    np.testing.assert_array_equal(after, before)
    assert pool.keys[0][0, :, 10].any()  # position 10 written into the new buffer


@pytest.mark.slow
async def test_seeded_sampling_is_reproducible_beside_other_requests(int4_engine) -> None:
    """Each seeded request draws from its own random stream, so neighbours with other settings do not consume it.

    Exact equality with the request run alone is not asserted: ONNX Runtime's int4 kernels are not batch-invariant
    (logits differ in the last bits with the batch shape), which can flip a sampled token (seen once under load).
    """
    sampled = dict(temperature=0.9, top_p=0.95, seed=11, max_new_tokens=12, ignore_eos=True)
    alone = [(await int4_engine.complete(ask("Tell me a word.", **sampled))).text for _ in range(2)]
    assert alone[0] == alone[1]

    # Mixed sampling settings share one batch: every request still gets exactly what it asked for.
    neighbours = [ask(f"Count to {n}.", temperature=1.0, max_new_tokens=5 + n, ignore_eos=True) for n in range(3)]
    results = await asyncio.gather(
        int4_engine.complete(ask("Tell me a word.", **sampled)), *(int4_engine.complete(r) for r in neighbours)
    )
    assert [r.completion_tokens for r in results] == [12, 5, 6, 7]
    assert all(r.finish_reason == "length" for r in results)


@pytest.mark.slow
async def test_late_request_joins_without_waiting_for_the_running_one(int4_engine) -> None:
    """Bounded wait: a request arriving while a long one decodes starts at once and finishes first."""
    order: list[str] = []

    async def run(name: str, request: GenerationRequest, started: asyncio.Event | None = None) -> None:
        async for chunk in int4_engine.generate(request):
            if started is not None and chunk.completion_tokens >= 3:
                started.set()
            if chunk.finished:
                order.append(name)

    started = asyncio.Event()
    long = asyncio.create_task(run("long", ask("Count to one hundred.", max_new_tokens=120, ignore_eos=True), started))
    await asyncio.wait_for(started.wait(), 60)
    steps_before = int4_engine.stats.steps
    await run("short", ask("Hi", max_new_tokens=4, ignore_eos=True))
    assert order == ["short"], "the short request waited for the long one"
    assert int4_engine.stats.steps - steps_before < 60
    await long
    assert order == ["short", "long"]


@pytest.mark.slow
async def test_concurrent_arrivals_share_one_forward_batch(int4_engine) -> None:
    int4_engine.stats.max_batch_seen = 0
    requests = [ask(f"What is {n} times {n}?", max_new_tokens=6, ignore_eos=True) for n in range(12)]
    results = await asyncio.gather(*(int4_engine.complete(r) for r in requests))
    assert all(r.completion_tokens == 6 for r in results)
    assert int4_engine.stats.max_batch_seen >= 6  # arrivals a few ms apart decode together


@pytest.mark.slow
async def test_abort_of_waiting_and_running_requests(int4_engine) -> None:
    request = dict(max_new_tokens=300, ignore_eos=True)
    streams = [int4_engine.generate(ask("Count to one hundred.", **request)) for _ in range(3)]
    firsts: list[GenerationChunk] = [await anext(s) for s in streams]
    for stream in streams:
        await stream.aclose()
    for _ in range(200):
        if int4_engine.stats.running == 0 and int4_engine.stats.waiting == 0:
            break
        await asyncio.sleep(0.02)
    assert all(not c.finished for c in firsts)
    assert int4_engine.stats.running == 0 and int4_engine.stats.waiting == 0


@pytest.mark.slow
async def test_vision_folder_is_refused(tiny_vl_folder: Path, tmp_path: Path) -> None:
    from agent.engine.onnx.engine import OnnxEngine

    spec = EngineSpec(folder=tiny_vl_folder, name="vl", quantization=Quantization.int4, cache_dir=tmp_path)
    engine = OnnxEngine(spec)
    with pytest.raises(ModelLoadError, match="vision-language"):
        await engine.start()
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
async def test_prefix_cache_reuses_a_shared_prompt_start_without_changing_the_answer(int4_engine) -> None:
    system = Message.text("system", "You are a patient tutor of data structures. " * 6)

    def tutor(question: str) -> GenerationRequest:
        messages = (system, Message.text("user", question))
        return GenerationRequest(messages=messages, sampling=SamplingParams(temperature=0.0, max_new_tokens=12))

    prefixes = int4_engine._loaded.scheduler.prefixes
    hits, reused = prefixes.hits, prefixes.hit_tokens
    cold = await int4_engine.complete(tutor("What is a heap?"))  # may itself hit an earlier test's blocks
    warm = await int4_engine.complete(tutor("What is a heap?"))
    other = await int4_engine.complete(tutor("What is a trie?"))
    assert prefixes.hits >= hits + 2
    assert prefixes.hit_tokens - reused >= 2 * 48  # the system prompt (~60 tokens) was not computed again
    assert warm.text == cold.text and other.text != warm.text


@pytest.mark.slow
async def test_full_kv_budget_makes_requests_wait_not_fail(smollm_folder: Path, model_cache_dir: Path) -> None:
    from agent.engine.onnx.engine import OnnxEngine

    # 16 MiB holds two rows of 128 positions (46 KB per position): the others wait for a row to free up.
    engine = OnnxEngine(int4_spec(smollm_folder, model_cache_dir, onnx_kv_cache_mb=16, onnx_prefix_cache_mb=0))
    await engine.start()
    try:
        requests = [ask(f"Name {n} colors.", max_new_tokens=30, ignore_eos=True) for n in range(5)]
        results = await asyncio.gather(*(engine.complete(r) for r in requests))
        assert [r.completion_tokens for r in results] == [30] * 5
        assert engine.stats.max_batch_seen == 2
        assert len(engine._loaded.scheduler.prefixes) == 0
    finally:
        await engine.shutdown()


@pytest.mark.slow
async def test_staggered_mixed_requests_equal_their_answers_alone(onnx_smollm_engine) -> None:
    """Rows joining, leaving (the last row moves into a freed one) and growing the KV pool while others decode must
    not change any answer: in fp32 every greedy output equals the same request run alone, on every CPU."""
    engine = onnx_smollm_engine
    requests = [(question, 4 + 5 * n) for n, question in enumerate(TUTOR_QUESTIONS)]
    alone = [(await engine.complete(ask(q, max_new_tokens=m, ignore_eos=True))).text for q, m in requests]

    async def later(delay: float, question: str, max_new: int) -> str:
        await asyncio.sleep(delay)
        return (await engine.complete(ask(question, max_new_tokens=max_new, ignore_eos=True))).text

    together = await asyncio.gather(*(later(0.03 * (i % 4), q, m) for i, (q, m) in enumerate(requests)))
    assert together == alone


@pytest.mark.slow
async def test_long_prompt_is_prefilled_in_chunks_while_others_stream(smollm_folder: Path, model_cache_dir: Path):
    from agent.engine.onnx.engine import OnnxEngine

    engine = OnnxEngine(int4_spec(smollm_folder, model_cache_dir, onnx_prefix_cache_mb=0), prefill_tokens=64)
    await engine.start()
    try:
        long_question = "Here are my notes on sorting. " * 60 + "Summarize them."
        long_alone = (await engine.complete(ask(long_question, max_new_tokens=8))).text
        chunk_steps = engine.stats.steps  # one step per 64-token chunk, plus the decode steps
        assert chunk_steps >= 6

        short = engine.generate(ask("Count to one hundred.", max_new_tokens=200, ignore_eos=True))
        await anext(short)
        long_task = asyncio.create_task(engine.complete(ask(long_question, max_new_tokens=8)))
        tokens_meanwhile = 0
        while not long_task.done():
            await anext(short)
            tokens_meanwhile += 1
        assert tokens_meanwhile >= 4, "the running stream stalled while the long prompt was prefilled"
        assert (await long_task).text == long_alone
        await short.aclose()
    finally:
        await engine.shutdown()
