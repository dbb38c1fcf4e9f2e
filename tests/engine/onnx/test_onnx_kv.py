"""The ONNX engine's KV pool and prefix cache (agent.engine.onnx.kv), without a model."""

from __future__ import annotations

import numpy as np

from agent.engine.onnx.kv import KvPool, KvShape, PrefixCache

SHAPE = KvShape(layers=2, kv_heads=3, head_dim=4)


def _fill(pool: KvPool, row: int, tokens: int, value: float) -> None:
    for buffers in (pool.keys, pool.values):
        for buffer in buffers:
            buffer[row, :, :tokens] = value + np.arange(tokens)[None, :, None]


def test_pool_grows_in_powers_of_two_and_keeps_what_it_holds() -> None:
    pool = KvPool(SHAPE, context_length=100)
    pool.ensure(3, 20, keep=(0, 0))
    assert (pool.rows, pool.capacity) == (4, 32)
    assert pool.keys[0].shape == (4, 3, 32, 4) and len(pool.keys) == len(pool.values) == 2
    _fill(pool, 1, 20, 7.0)
    pool.ensure(5, 90, keep=(2, 20))  # capacity is capped by the context length
    assert (pool.rows, pool.capacity) == (8, 100)
    assert pool.read(1, 20)[0, 0, 0, :, 0].tolist() == [7.0 + i for i in range(20)]
    pool.ensure(2, 10, keep=(2, 20))  # never shrinks while in use
    assert (pool.rows, pool.capacity) == (8, 100)
    assert pool.bytes_for(8, 100) == 8 * 100 * SHAPE.bytes_per_token
    pool.release()
    assert (pool.rows, pool.capacity, pool.keys) == (0, 0, [])


def test_pool_generation_changes_exactly_when_the_buffers_do() -> None:
    """The runner keeps its bindings of the buffers' views while the generation stays (agent.engine.onnx.runner)."""
    pool = KvPool(SHAPE, context_length=100)
    seen = [pool.generation]
    pool.ensure(3, 20, keep=(0, 0))
    seen.append(pool.generation)
    pool.ensure(2, 10, keep=(2, 20))  # fits: same buffers
    assert pool.generation == seen[-1]
    pool.ensure(5, 20, keep=(2, 20))
    seen.append(pool.generation)
    pool.release()
    seen.append(pool.generation)
    assert len(set(seen)) == 4


def test_pool_move_read_write() -> None:
    pool = KvPool(SHAPE, context_length=64)
    pool.ensure(4, 16, keep=(0, 0))
    _fill(pool, 3, 10, 100.0)
    pool.move(3, 0, 10)
    np.testing.assert_array_equal(pool.read(0, 10), pool.read(3, 10))
    kv = pool.read(3, 6)
    assert kv.shape == (2, 2, 3, 6, 4)
    pool.write(2, kv, 6)
    np.testing.assert_array_equal(pool.read(2, 6), kv)


def test_prefix_cache_returns_the_longest_block_aligned_prefix() -> None:
    pool = KvPool(SHAPE, context_length=128)
    pool.ensure(1, 64, keep=(0, 0))
    _fill(pool, 0, 64, 0.0)
    cache = PrefixCache(SHAPE.bytes_per_token, budget_bytes=1 << 20, block=4)
    system = np.arange(1, 11)  # 10 shared tokens
    first = np.concatenate([system, [50, 51, 52, 53, 54]])
    cache.store(first, lambda n: pool.read(0, n))  # keeps 12 tokens (3 blocks)
    assert len(cache) == 1

    kv, length = cache.lookup(np.concatenate([system, [60, 61, 62]]))  # shares 10 tokens: 2 blocks reusable
    assert length == 8 and kv is not None
    np.testing.assert_array_equal(kv[..., :length, :], pool.read(0, length))
    assert cache.lookup(first)[1] == 12  # the same prompt: all its stored blocks (at least one token left to run)
    assert cache.lookup(first[:12])[1] == 8  # never the whole prompt: its last token must run to give logits
    assert cache.lookup(np.array([9, 9, 9, 9, 9, 9]))[1] == 0
    assert cache.hits == 3 and cache.hit_tokens == 28


def test_prefix_cache_evicts_least_recently_used_within_budget() -> None:
    pool = KvPool(SHAPE, context_length=64)
    pool.ensure(1, 16, keep=(0, 0))
    _fill(pool, 0, 16, 0.0)
    cache = PrefixCache(SHAPE.bytes_per_token, budget_bytes=16 * SHAPE.bytes_per_token, block=4)
    a, b, c = (np.full(9, v) for v in (1, 2, 3))
    cache.store(a, lambda n: pool.read(0, n))
    cache.store(b, lambda n: pool.read(0, n))
    assert cache.lookup(a)[1] == 8  # a is now the most recently used
    cache.store(c, lambda n: pool.read(0, n))  # over budget: b goes
    assert cache.used_bytes <= cache.budget_bytes and len(cache) == 2
    assert cache.lookup(b)[1] == 0
    assert cache.lookup(a)[1] == 8 and cache.lookup(c)[1] == 8
    off = PrefixCache(SHAPE.bytes_per_token, budget_bytes=0)
    off.store(np.arange(40), lambda n: pool.read(0, n))
    assert len(off) == 0 and off.lookup(np.arange(40))[1] == 0
