"""bench.structured_output's inter-token latency arithmetic."""

from __future__ import annotations

import pytest

from bench.structured_output import inter_token_latency


def test_inter_token_latency_is_time_per_token_between_first_and_last_chunk() -> None:
    assert inter_token_latency([(10.0, 1), (10.3, 2), (10.9, 4)]) == pytest.approx(0.3)
    assert inter_token_latency([(1.0, 1)]) is None
    assert inter_token_latency([(1.0, 3), (2.0, 3)]) is None  # no tokens between
