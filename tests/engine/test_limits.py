"""The request rules both doors apply (agent.engine.limits): defaults, bounds, and the error each broken rule raises."""

from __future__ import annotations

import math

import pytest

from agent.config import load_settings
from agent.engine import limits
from agent.engine.errors import InvalidValueError, PayloadTooLargeError

RULES = limits.RequestLimits(max_new_tokens=64, default_temperature=0.5, default_top_p=0.8, max_stop_chars=8)


def test_defaults_fill_what_the_request_leaves_out() -> None:
    s = limits.sampling_params(RULES)
    assert (s.max_new_tokens, s.temperature, s.top_p, s.seed, s.stop) == (64, 0.5, 0.8, None, ())
    s = limits.sampling_params(RULES, max_tokens=64, temperature=0.0, top_p=1.0, seed=2**63 - 1, stop=["a" * 8] * 4)
    assert (s.max_new_tokens, s.temperature, s.top_p, s.seed, len(s.stop)) == (64, 0.0, 1.0, 2**63 - 1, 4)


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        ({"max_tokens": 65}, "max_tokens: 65 is more than MAX_NEW_TOKENS=64"),  # refused, never lowered
        ({"max_tokens": 0}, "max_tokens: must be at least 1, got 0"),
        ({"max_tokens": 99, "max_tokens_name": "max_new_tokens"}, "max_new_tokens: 99 is more than MAX_NEW_TOKENS"),
        ({"temperature": 2.01}, "temperature: must be within [0, 2], got 2.01"),
        ({"temperature": math.nan}, "temperature: must be within [0, 2], got nan"),
        ({"top_p": 0.0}, "top_p: must be within (0, 1], got 0"),
        ({"top_p": math.inf}, "top_p: must be within (0, 1], got inf"),
        ({"seed": -1}, "seed: must be within [0, 2**63-1], got -1"),
        ({"seed": 2**63}, "seed: must be within [0, 2**63-1]"),
        ({"stop": ["a"] * 5}, "stop: 5 stop sequences, more than 4"),
        ({"stop": ["a", ""]}, "stop: stop sequences must not be empty"),
        ({"stop": ["a" * 9]}, "stop: a stop sequence of 9 characters, more than MAX_STOP_CHARS=8"),
    ],
)
def test_each_broken_sampling_rule_is_a_422_naming_the_field(sent: dict, message: str) -> None:
    with pytest.raises(InvalidValueError) as err:
        limits.sampling_params(RULES, **sent)
    assert err.value.status == 422 and err.value.code == "validation_error"
    assert err.value.message.startswith(message)


def test_content_rules() -> None:
    small = limits.RequestLimits(max_message_chars=10, max_images=1)
    limits.check_message_chars(10, small)
    limits.check_image_count(1, small)
    with pytest.raises(
        PayloadTooLargeError, match="message: 11 characters in one message, more than MAX_MESSAGE_CHARS=10"
    ):
        limits.check_message_chars(11, small, "message")
    with pytest.raises(PayloadTooLargeError, match="messages: 2 images, more than MAX_IMAGES_PER_REQUEST=1"):
        limits.check_image_count(2, small)
    assert limits.check_unicode("ok \u00e9") == "ok \u00e9"
    with pytest.raises(InvalidValueError, match=r"messages: invalid Unicode \(a lone surrogate at character 3\)"):
        limits.check_unicode("hi \ud800")


def test_limits_come_from_the_settings() -> None:
    settings = load_settings(
        max_new_tokens=7, temperature=0.1, top_p=0.2, max_stop_chars=3, max_message_chars=50, max_images_per_request=2
    )
    rules = limits.RequestLimits.from_settings(settings)
    assert (rules.max_new_tokens, rules.default_temperature, rules.default_top_p) == (7, 0.1, 0.2)
    assert (rules.max_stop_chars, rules.max_message_chars, rules.max_images) == (3, 50, 2)
    assert (rules.image.max_bytes, rules.image.max_pixels) == (settings.max_image_bytes, settings.max_image_pixels)
