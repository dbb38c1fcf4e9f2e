"""Settings: the seed's env vars and defaults, clear start-up errors, and docs generated from the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Attention, LoadingStrategy, Quantization, SettingsError, load_settings
from agent.serving.prepare import settings_markdown

SEED_DEFAULTS = {  # the seed guide's environment table (MODEL_PATH: unset means the embedded model)
    "QUANTIZATION_TYPE": "int4",
    "ATTENTION_IMPL": "sdpa",
    "MAX_HISTORY": "5",
    "MAX_NEW_TOKENS": "512",
    "TEMPERATURE": "0.7",
    "TOP_P": "0.9",
}


def test_seed_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*SEED_DEFAULTS, "MODEL_PATH", "LOADING_STRATEGY"]:
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    assert s.model_path is None
    assert s.quantization_type is Quantization.int4
    assert s.attention_impl is Attention.sdpa
    assert (s.max_history, s.max_new_tokens, s.temperature, s.top_p) == (5, 512, 0.7, 0.9)
    assert s.loading_strategy is LoadingStrategy.auto


def test_env_values_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTIZATION_TYPE", "int8")
    monkeypatch.setenv("MAX_NEW_TOKENS", "256")
    monkeypatch.setenv("MODEL_PATH", "  ")  # blank means unset, as an empty compose variable would be
    s = load_settings()
    assert s.quantization_type is Quantization.int8 and s.max_new_tokens == 256 and s.model_path is None


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("QUANTIZATION_TYPE", "int3", "'none', 'int4', 'int8', 'awq' or 'gptq'"),
        ("ATTENTION_IMPL", "flash", "'eager', 'sdpa' or 'flash_attention_2'"),
        ("LOADING_STRATEGY", "tensorrt", "'transformers'"),
        ("MAX_HISTORY", "-1", "greater than or equal to 0"),
        ("TEMPERATURE", "hot", "valid number"),
        ("TOP_P", "0", "greater than 0"),
    ],
)
def test_bad_value_names_variable_and_allowed_values(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert f"{var}={value!r}" in message and expected in message


def test_configuration_doc_is_generated_from_settings() -> None:
    doc = Path(__file__).parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == settings_markdown(), "run: dsa-agent config --markdown > docs/configuration.md"
