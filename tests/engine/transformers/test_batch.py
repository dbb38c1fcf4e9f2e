"""BatchState: merging rows of different lengths and dropping rows keep each row's cache and mask aligned."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from agent.engine.transformers.batch import BatchState, mrope_positions, text_positions


def state(lengths: list[int], total: int, tag: float) -> BatchState:
    """Rows whose key/value at each real position holds `tag + row` (padding holds 0)."""
    cache = DynamicCache()
    keys = torch.zeros(len(lengths), 2, total, 4)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        keys[row, :, total - n :] = tag + row
        mask[row, total - n :] = 1
    cache.update(keys.clone(), keys.clone(), 0)
    n = torch.tensor(lengths)
    return BatchState(cache, mask, n, torch.zeros_like(n), torch.zeros_like(n))


def rows_content(s: BatchState) -> list[list[float]]:
    keys = s.cache.layers[0].keys[:, 0, :, 0]
    return [keys[r][s.attention_mask[r].bool()].tolist() for r in range(s.size)]


def test_merge_pads_the_shorter_side_on_the_left() -> None:
    running, new = state([3, 5], 5, 10.0), state([7], 7, 20.0)
    running.merge(new)
    assert running.size == 3 and running.length == 7
    assert rows_content(running) == [[10.0] * 3, [11.0] * 5, [20.0] * 7]
    assert running.attention_mask.sum(1).tolist() == [3, 5, 7]
    assert running.cache.layers[0].keys[0, 0, :4, 0].tolist() == [0.0] * 4


def test_select_drops_rows_and_trims_all_padding_columns() -> None:
    s = state([2, 6, 3], 6, 1.0)
    s.select([2, 0])
    assert s.length == 3  # the 6-token row left: 3 columns were padding in every remaining row
    assert rows_content(s) == [[3.0] * 3, [1.0] * 2]
    assert s.next_pos.tolist() == [3, 2]


def test_decode_inputs_use_each_rows_own_position() -> None:
    s = state([2, 4], 4, 1.0)
    s.last_tokens = torch.tensor([5, 6])
    inputs = s.decode_inputs(mrope=False)
    assert inputs["position_ids"].tolist() == [[2], [4]]
    assert inputs["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    s.rope_delta = torch.tensor([0, -3])
    mrope = mrope_positions(torch.tensor([[2], [4]]), s.rope_delta)
    assert mrope.shape == (4, 2, 1) and mrope[:, 1, 0].tolist() == [4, 1, 1, 1]


def test_text_positions_skip_left_padding() -> None:
    assert text_positions(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [[1, 1, 0, 1], [0, 1, 2, 3]]
