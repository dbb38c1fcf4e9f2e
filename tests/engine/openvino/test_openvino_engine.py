"""OpenVINO GenAI engine: export options and cache, load errors, and vision through the pipeline on the tiny Qwen3-VL.

The engine contract on SmolLM2 (stream shape, abort, stop strings, seeds, batching, ...) is test_contract.py with the
"openvino" kind; faithfulness to transformers is test_openvino_faithfulness.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from agent.config import DType, Quantization
from agent.engine.errors import InvalidRequestError, ModelLoadError
from agent.engine.openvino.build import (
    ExportOptions,
    cache_entry,
    export_options,
    fingerprint,
    model_kind,
)
from agent.engine.openvino.export_env import export_env_dir, export_python
from agent.engine.spec import EngineSpec
from agent.engine.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart

SMOLLM_CHANNELS = {"hidden_size": 576, "intermediate_size": 1536}

# --- pure helpers (no model) -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantization", "config", "expected"),
    [
        (Quantization.int8, SMOLLM_CHANNELS, ExportOptions("int8")),
        (Quantization.none, SMOLLM_CHANNELS, ExportOptions("fp32")),
        # Groups of 32 (perplexity 1.28x fp32 on SmolLM2, 64: 1.39x); optimum's default 128 does not divide 576.
        (Quantization.int4, SMOLLM_CHANNELS, ExportOptions("int4", 32)),
        (Quantization.int4, {"text_config": {"hidden_size": 64, "intermediate_size": 128}}, ExportOptions("int4", 32)),
        (Quantization.int4, {"hidden_size": 48, "intermediate_size": 144}, ExportOptions("int4", 16)),
    ],
)
def test_export_options(quantization: Quantization, config: dict, expected: ExportOptions) -> None:
    options = export_options(quantization, config)
    assert options == expected
    assert options.cli_args()[:2] == ["--weight-format", expected.weight_format]
    assert ("--group-size" in options.cli_args()) == (expected.group_size is not None)


@pytest.mark.parametrize("quantization", [Quantization.awq, Quantization.gptq])
def test_unsupported_quantization_is_a_load_error(quantization: Quantization) -> None:
    with pytest.raises(ModelLoadError, match="QUANTIZATION_TYPE=.*int4, int8 or none"):
        export_options(quantization, SMOLLM_CHANNELS)


def test_int4_without_a_dividing_group_size_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="group size"):
        export_options(Quantization.int4, {"hidden_size": 100, "intermediate_size": 308})


@pytest.mark.parametrize(
    ("config", "kind"),
    [({"model_type": "llama"}, "text"), ({"model_type": "qwen3_vl", "vision_config": {}}, "vision")],
)
def test_model_kind(config: dict, kind: str) -> None:
    assert model_kind(config) == kind


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "llava", "vision_config": {}}, "vision models"),
        ({"model_type": "bert"}, "not supported by LOADING_STRATEGY=openvino"),
    ],
)
def test_unsupported_architectures_are_load_errors(config: dict, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        model_kind(config)


def test_cache_key_follows_content_and_options(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    # Keyed by content, not place: two copies of one checkpoint share an export (the names differ by folder only).
    assert fingerprint(a) == fingerprint(b)
    assert (
        cache_entry(a, tmp_path, ExportOptions("int8")).name.split("-")[-1]
        == (cache_entry(b, tmp_path, ExportOptions("int8")).name.split("-")[-1])
    )
    assert cache_entry(a, tmp_path, ExportOptions("int8")) != cache_entry(a, tmp_path, ExportOptions("fp32"))
    (b / "model.safetensors").write_bytes(b"y" * 100)
    assert fingerprint(a) != fingerprint(b)


def test_missing_export_env_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="make install") as err:
        export_python(tmp_path)
    assert str(export_env_dir(tmp_path)) in err.value.message


async def test_missing_openvino_genai_is_a_load_error(smollm_spec: EngineSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.engine.openvino.engine import OpenVinoEngine

    monkeypatch.setitem(sys.modules, "openvino_genai", None)  # import fails as when the package is not installed
    with pytest.raises(ModelLoadError, match="needs openvino-genai"):
        await OpenVinoEngine(smollm_spec).start()


async def test_cuda_is_refused(smollm_spec: EngineSpec) -> None:
    from agent.engine.openvino.engine import OpenVinoEngine

    with pytest.raises(ModelLoadError, match="DEVICE=cuda.*LOADING_STRATEGY=vllm"):
        await OpenVinoEngine(smollm_spec.with_(device="cuda")).start()


@pytest.mark.parametrize(("dtype", "precision"), [(DType.float32, "f32"), (DType.bfloat16, "bf16"), (DType.auto, None)])
def test_cpu_properties(smollm_spec: EngineSpec, dtype: DType, precision: str | None) -> None:
    """One property map for the LLM and the vision encoder: DTYPE's precision, our thread count, pinning off (pinned
    threads stalled on the shared CPU: docs/openvino.md)."""
    from agent.engine.openvino.engine import OpenVinoEngine

    props = OpenVinoEngine(smollm_spec.with_(dtype=dtype), threads=3)._properties()
    assert props["INFERENCE_NUM_THREADS"] == 3
    assert props["ENABLE_CPU_PINNING"] is False
    assert props.get("INFERENCE_PRECISION_HINT") == precision
    assert ("KV_CACHE_PRECISION" in props) == (dtype is DType.float32)


def test_loader_builds_the_openvino_engine() -> None:
    from agent.config import LoadingStrategy
    from agent.engine.openvino.engine import OpenVinoEngine
    from agent.serving.model_loader import engine_class

    assert engine_class(LoadingStrategy.openvino) is OpenVinoEngine


# --- the real exporter ---------------------------------------------------------------------------------------------


def _shared_export_env(cache: Path, model_cache_dir: Path) -> None:
    """Give a scratch model cache the real export venv (a link), so an export can run there."""
    (cache / "tools").mkdir(parents=True)
    (cache / "tools" / export_env_dir(model_cache_dir).name).symlink_to(export_env_dir(model_cache_dir))


@pytest.mark.slow
def test_auto_falls_back_to_transformers_when_the_export_fails(
    tiny_vl_folder: Path, model_cache_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Qwen3-VL whose weights are corrupt: `auto` picks OpenVINO (it looks servable), the real exporter fails, the
    failure is a ModelLoadError naming the export and the model, nothing is left in the cache, and `auto` builds
    the transformers engine instead."""
    from agent.config import Settings
    from agent.engine.transformers.engine import TransformersEngine
    from agent.serving.model_loader import build_engine

    broken = tmp_path / "broken-vl"
    shutil.copytree(tiny_vl_folder, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    cache = tmp_path / "cache"
    _shared_export_env(cache, model_cache_dir)
    settings = Settings(model_path=str(broken), quantization_type="none", device="cpu", model_cache_dir=cache)
    with caplog.at_level("INFO", logger="agent.serving.model_loader"):
        engine = build_engine(settings)
    assert isinstance(engine, TransformersEngine)
    assert "LOADING_STRATEGY=auto -> openvino" in caplog.text
    assert "OpenVINO export (fp32) failed for broken-vl (exit 1)" in caplog.text
    assert [p.name for p in (cache / "openvino").iterdir()] == []


@pytest.mark.slow
def test_auto_picks_openvino_for_vision_on_cpu(
    tiny_vl_folder: Path, model_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.config import LoadingStrategy, Settings
    from agent.serving import model_loader

    spec = EngineSpec(folder=tiny_vl_folder, name="v", quantization=Quantization.none, cache_dir=model_cache_dir)
    auto = Settings(loading_strategy="auto")
    assert model_loader.choose_strategy(auto, spec) is LoadingStrategy.openvino
    assert model_loader.choose_strategy(auto, spec.with_(quantization=Quantization.awq)) is LoadingStrategy.transformers
    real_find_spec = model_loader.importlib.util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "openvino_genai" else real_find_spec(name, *a)
    )
    assert model_loader.choose_strategy(auto, spec) is LoadingStrategy.transformers


# --- vision through the pipeline (tiny Qwen3-VL, fp32) ---------------------------------------------------------------


def _ask(*parts: object, tokens: int = 10) -> GenerationRequest:
    content = tuple(ImagePart(p) if isinstance(p, Image.Image) else TextPart(str(p)) for p in parts)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
    return GenerationRequest(messages=(Message("user", content),), sampling=sampling)


@pytest.mark.slow
async def test_vision_info(openvino_tiny_vl_engine) -> None:
    info = openvino_tiny_vl_engine.info()
    assert (info.engine, info.supports_images, info.quantization) == ("openvino", True, "none")
    assert await openvino_tiny_vl_engine.health()


@pytest.mark.slow
async def test_pixel_budget_matches_the_transformers_engine(openvino_tiny_vl_engine, tiny_vl_engine) -> None:
    """A 600x400 image is shrunk to IMAGE_MAX_PIXELS=256*256 (not to the export's own 512*512 budget): the same
    image tokens, and the same greedy tokens, as the transformers engine."""
    image = Image.new("RGB", (600, 400), (30, 160, 220))
    image.paste((250, 250, 0), (100, 100, 300, 250))
    request = _ask(image, "Describe this image.")
    ours = await openvino_tiny_vl_engine.complete(request)
    reference = await tiny_vl_engine.complete(request)
    assert ours.prompt_tokens == reference.prompt_tokens  # 160 image tokens at 256*256, 330 at 512*512
    assert ours.text == reference.text


@pytest.mark.slow
async def test_mixed_batch_equals_each_alone(openvino_tiny_vl_engine) -> None:
    images = [Image.new("RGB", (64 + 32 * i, 96), (40 * i, 200, 90)) for i in range(3)]
    requests = [_ask(images[i], f"Image {i}?") if i < 3 else _ask(f"Text only {i}.") for i in range(6)]
    alone = [(await openvino_tiny_vl_engine.complete(r)).text for r in requests]
    openvino_tiny_vl_engine.stats.max_batch_seen = 0
    together = await asyncio.gather(*(openvino_tiny_vl_engine.complete(r) for r in requests))
    assert [r.text for r in together] == alone
    assert openvino_tiny_vl_engine.stats.max_batch_seen > 1


@pytest.mark.slow
async def test_two_images_in_one_message(openvino_tiny_vl_engine, tiny_vl_engine) -> None:
    # 8x8 is below IMAGE_MIN_PIXELS: both engines upscale it to the same grid.
    request = _ask(Image.new("RGB", (8, 8), "red"), "and", Image.new("RGB", (96, 64), "blue"), "compare")
    ours = await openvino_tiny_vl_engine.complete(request)
    reference = await tiny_vl_engine.complete(request)
    assert (ours.prompt_tokens, ours.text) == (reference.prompt_tokens, reference.text)


@pytest.mark.slow
async def test_unusable_image_is_400(openvino_tiny_vl_engine) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await openvino_tiny_vl_engine.complete(_ask(Image.new("RGB", (6400, 16)), "too thin"))
    assert err.value.status == 400
    assert openvino_tiny_vl_engine.stats.running == 0


@pytest.mark.slow
def test_budget_view_leaves_the_export_untouched(openvino_tiny_vl_engine) -> None:
    export = openvino_tiny_vl_engine.model_path
    assert json.loads((export / "preprocessor_config.json").read_text())["max_pixels"] == 512 * 512


@pytest.mark.slow
def test_prepare_exports_when_the_settings_choose_openvino(
    tiny_vl_folder: Path, model_cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`make install` (dsa-agent prepare) exports the model when LOADING_STRATEGY=openvino, and only then."""
    from agent.config import Settings
    from agent.engine.checkpoints import resolve_model
    from agent.serving.prepare import _prebuild_openvino

    resolved = resolve_model(str(tiny_vl_folder), model_cache_dir)
    common = {"model_path": str(tiny_vl_folder), "quantization_type": "none", "device": "cpu"}
    with caplog.at_level("INFO", logger="agent.serving.prepare"):
        _prebuild_openvino(Settings(loading_strategy="transformers", **common), resolved)
        assert "OpenVINO model ready" not in caplog.text
        _prebuild_openvino(Settings(loading_strategy="openvino", **common), resolved)
    options = export_options(Quantization.none, json.loads((tiny_vl_folder / "config.json").read_text()))
    assert f"OpenVINO model ready: {cache_entry(tiny_vl_folder, model_cache_dir, options)}" in caplog.text


@pytest.mark.slow
async def test_shutdown_with_a_stream_open_leaves_the_pipeline_nothing_to_free(smollm_spec: EngineSpec) -> None:
    """A stream still open at shutdown is aborted and its KV blocks freed before the pipeline goes (else OpenVINO logs
    "BlockManager leaked sequence block tables" as it is destroyed)."""
    from agent.engine.openvino.engine import OpenVinoEngine

    engine = OpenVinoEngine(smollm_spec)
    await engine.start()
    pipeline = engine._loaded.scheduler.pipeline
    stream = engine.generate(
        GenerationRequest(
            (Message.text("user", "Count to a hundred."),), SamplingParams(max_new_tokens=64, temperature=0)
        )
    )
    try:
        await anext(stream)
        assert pipeline.has_non_finished_requests()
        await engine.shutdown()
        assert not pipeline.has_non_finished_requests()
    finally:
        await stream.aclose()
        await engine.shutdown()
