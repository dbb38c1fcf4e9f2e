"""bench.structured_output: its schema passes the door's checks and cannot end early, and its per-level figures."""

from __future__ import annotations

import pytest

from agent.engine.structured.schema import SchemaLimits, check_schema
from bench.structured_output import _MIN_WORDS, LONG_SCHEMA, level_rows, prompt


def test_schema_is_accepted_and_outlasts_the_default_tokens() -> None:
    check_schema(LONG_SCHEMA, SchemaLimits())  # a 400 here would make the bench time refusals
    assert LONG_SCHEMA["properties"]["words"]["minItems"] == _MIN_WORDS >= 64  # --tokens' default


def test_prompts_are_distinct() -> None:
    assert len({prompt(i) for i in range(200)}) == 200


def test_level_rows_take_medians_and_pair_the_repeats() -> None:
    runs = {
        32: {
            "free": [{"itl_p50_ms": 100.0, "tok_per_s": 10.0}, {"itl_p50_ms": 200.0, "tok_per_s": 5.0},
                     {"itl_p50_ms": 110.0, "tok_per_s": 9.0}],
            "json_schema": [{"itl_p50_ms": 105.0, "tok_per_s": 9.5}, {"itl_p50_ms": 180.0, "tok_per_s": 5.5},
                            {"itl_p50_ms": 121.0, "tok_per_s": 8.0}],
        }
    }  # fmt: skip
    (row,) = level_rows(runs)
    assert row["concurrency"] == 32 and row["repeats"] == 3
    assert row["itl_p50_ms_free"] == 110.0 and row["itl_p50_ms_json_schema"] == 121.0
    assert row["tok_per_s_free"] == 9.0 and row["tok_per_s_json_schema"] == 8.0
    assert row["itl_overhead_pct"] == pytest.approx(10.0)
    assert row["itl_overhead_pct_per_repeat"] == [5.0, -10.0, 10.0]
