"""The model loader: device, spec, strategy rules, MODEL_PATH errors, and one real load through load_engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import Attention, Device, DType, LoadingStrategy, Quantization, Settings, load_settings
from agent.engine import checkpoints
from agent.engine.cpu import CpuFeatures
from agent.engine.errors import ModelLoadError
from agent.engine.fake import FakeEngine
from agent.engine.spec import EngineSpec
from agent.engine.types import GenerationRequest, Message, SamplingParams
from agent.serving import model_loader
from agent.serving.model_loader import (
    build_engine,
    choose_strategy,
    engine_class,
    engine_spec,
    load_engine,
    resolve_device,
)


def settings(**overrides: object) -> Settings:
    return load_settings(**overrides)


def hf_folder(root: Path, *, vision: bool = False, max_positions: int = 8192) -> Path:
    """A folder with just a config.json: enough for the strategy rules (no weights are read)."""
    root.mkdir(parents=True, exist_ok=True)
    config: dict = {"model_type": "llama", "max_position_embeddings": max_positions}
    if vision:
        config = {"model_type": "qwen3_vl", "vision_config": {}, "text_config": {"max_position_embeddings": 2048}}
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend a GPU is visible (only the loader's rules run; nothing is put on a device)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


# --- device ------------------------------------------------------------------------------------------------------
def test_resolve_device_auto_is_cpu_without_cuda(no_cuda: None) -> None:
    assert resolve_device(settings(device=Device.auto)) == "cpu"
    assert resolve_device(settings(device=Device.cpu)) == "cpu"


def test_resolve_device_cuda_without_cuda_names_the_variable(no_cuda: None) -> None:
    with pytest.raises(ModelLoadError, match="DEVICE=cuda"):
        resolve_device(settings(device=Device.cuda))


def test_resolve_device_auto_prefers_cuda(fake_cuda: None) -> None:
    assert resolve_device(settings(device=Device.auto)) == "cuda"
    assert resolve_device(settings(device=Device.cpu)) == "cpu"


# --- spec --------------------------------------------------------------------------------------------------------
def test_engine_spec_carries_every_setting(tmp_path: Path, no_cuda: None) -> None:
    folder = hf_folder(tmp_path / "m")
    s = settings(
        quantization_type=Quantization.none,
        attention_impl=Attention.eager,
        dtype=DType.float32,
        max_batch_size=7,
        image_min_pixels=100,
        image_max_pixels=200_000,
        vllm_enforce_eager=False,
        vllm_max_model_len=1024,
        onnx_kv_cache_mb=64,
        onnx_prefix_cache_mb=0,
        model_cache_dir=tmp_path / "cache",
    )
    spec = engine_spec(s, resolved=checkpoints.ResolvedModel(folder=folder, name="m", source="folder"))
    assert spec == EngineSpec(
        folder=folder,
        name="m",
        device="cpu",
        dtype=DType.float32,
        quantization=Quantization.none,
        attention=Attention.eager,
        max_batch_size=7,
        image_min_pixels=100,
        image_max_pixels=200_000,
        vllm_enforce_eager=False,
        vllm_max_model_len=1024,
        onnx_kv_cache_mb=64,
        onnx_prefix_cache_mb=0,
        cache_dir=tmp_path / "cache",
    )


def test_engine_spec_caps_context_to_the_model(tmp_path: Path, no_cuda: None) -> None:
    resolved = checkpoints.ResolvedModel(folder=hf_folder(tmp_path / "m", max_positions=512), name="m", source="folder")
    assert engine_spec(settings(vllm_max_model_len=4096), resolved=resolved).vllm_max_model_len == 512
    vl = checkpoints.ResolvedModel(folder=hf_folder(tmp_path / "vl", vision=True), name="vl", source="folder")
    assert engine_spec(settings(vllm_max_model_len=4096), resolved=vl).vllm_max_model_len == 2048


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"attention_impl": Attention.flash_attention_2}, "ATTENTION_IMPL=sdpa"),
        ({"dtype": DType.float16}, "DTYPE=bfloat16"),
    ],
)
def test_engine_spec_refuses_cuda_only_options_on_cpu(
    tmp_path: Path, no_cuda: None, overrides: dict, names: str
) -> None:
    resolved = checkpoints.ResolvedModel(folder=hf_folder(tmp_path / "m"), name="m", source="folder")
    with pytest.raises(ModelLoadError, match=names):
        engine_spec(settings(**overrides), resolved=resolved)


# --- strategy rules ----------------------------------------------------------------------------------------------
# CPUs as their /proc/cpuinfo flags describe them (the loader's rules read nothing else).
ZEN3_AVX2 = CpuFeatures(frozenset({"avx", "avx2", "fma"}), "AMD EPYC 7763 (Zen 3)")
SKYLAKE_AVX512 = CpuFeatures(frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}), "Xeon Gold 6248")
ZEN4_AVX512_BF16 = CpuFeatures(frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}), "Zen 4")
SAPPHIRE_RAPIDS_AMX = CpuFeatures(frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}), "Xeon 8480")
UNKNOWN_CPU = CpuFeatures()


@pytest.fixture(autouse=True)
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rules that do not name a CPU see one with native bf16, whatever CPU runs the tests."""
    monkeypatch.setattr(model_loader, "cpu_features", lambda: ZEN4_AVX512_BF16)


def _spec(folder: Path, device: str, quantization: Quantization, dtype: DType = DType.auto) -> EngineSpec:
    return EngineSpec(folder=folder, name="m", device=device, quantization=quantization, dtype=dtype)


@pytest.mark.parametrize(
    ("device", "vision", "quantization", "bnb_in_vllm", "expected"),
    [
        ("cpu", False, Quantization.none, False, LoadingStrategy.vllm),
        ("cpu", False, Quantization.awq, False, LoadingStrategy.vllm),
        ("cpu", False, Quantization.gptq, False, LoadingStrategy.vllm),
        ("cpu", False, Quantization.int4, False, LoadingStrategy.onnx),  # the seed's default on CPU
        ("cpu", False, Quantization.int8, False, LoadingStrategy.onnx),
        ("cpu", True, Quantization.none, False, LoadingStrategy.transformers),
        ("cpu", True, Quantization.int4, False, LoadingStrategy.transformers),
        ("cuda", False, Quantization.none, False, LoadingStrategy.vllm),
        ("cuda", True, Quantization.none, False, LoadingStrategy.vllm),
        ("cuda", True, Quantization.awq, False, LoadingStrategy.vllm),
        ("cuda", True, Quantization.int4, False, LoadingStrategy.transformers),  # vllm 0.32: no bitsandbytes
        ("cuda", True, Quantization.int4, True, LoadingStrategy.vllm),
        ("cuda", False, Quantization.int8, True, LoadingStrategy.transformers),
    ],
)
def test_auto_strategy_rules(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    vision: bool,
    quantization: Quantization,
    bnb_in_vllm: bool,
    expected: LoadingStrategy,
) -> None:
    monkeypatch.setattr(model_loader, "vllm_has_bitsandbytes", lambda: bnb_in_vllm)
    monkeypatch.setattr(model_loader, "vllm_available", lambda: True)
    spec = _spec(hf_folder(tmp_path / "m", vision=vision), device, quantization)
    assert choose_strategy(settings(loading_strategy=LoadingStrategy.auto), spec) is expected


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ({"embed": [49152, 576], "layers": [100, 576, 1536]}, LoadingStrategy.onnx),  # ~117M: SmolLM2-sized
        ({"embed": [151936, 4096], "layers": [36, 4096, 12288]}, LoadingStrategy.vllm),  # ~2.4B
    ],
)
def test_auto_unquantized_on_a_native_bf16_cpu_goes_by_model_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shapes: dict, expected: LoadingStrategy
) -> None:
    """ONNX fp32 measured faster than vLLM bf16 on the small embedded model; a large model is read per token, and
    bf16 halves the bytes (model_loader.SMALL_MODEL_PARAMS)."""
    from tests.engine.test_checkpoints import write_safetensors_header

    monkeypatch.setattr(model_loader, "vllm_available", lambda: True)
    folder = hf_folder(tmp_path / "m")
    write_safetensors_header(folder / "model.safetensors", shapes)
    for cpu in (ZEN4_AVX512_BF16, SAPPHIRE_RAPIDS_AMX):
        spec = _spec(folder, "cpu", Quantization.none)
        assert choose_strategy(settings(loading_strategy=LoadingStrategy.auto), spec, cpu) is expected


@pytest.mark.parametrize(
    ("cpu", "dtype", "expected"),
    [
        (ZEN3_AVX2, DType.auto, LoadingStrategy.onnx),  # vLLM would emulate bf16: 7.5 tok/s against ONNX's 75
        (SKYLAKE_AVX512, DType.auto, LoadingStrategy.onnx),  # AVX-512 without BF16: emulated too
        (UNKNOWN_CPU, DType.auto, LoadingStrategy.onnx),  # nothing known: the engine that needs no bf16
        (ZEN4_AVX512_BF16, DType.auto, LoadingStrategy.vllm),  # native bf16, size unknown (no weights): vLLM bf16
        (SAPPHIRE_RAPIDS_AMX, DType.auto, LoadingStrategy.vllm),
        (ZEN4_AVX512_BF16, DType.float32, LoadingStrategy.onnx),  # fp32 asked: ONNX fp32 beats vLLM fp32
        (ZEN3_AVX2, DType.float32, LoadingStrategy.onnx),
        (ZEN3_AVX2, DType.bfloat16, LoadingStrategy.vllm),  # bf16 asked: only vLLM runs it
    ],
)
def test_auto_unquantized_text_on_cpu_follows_the_cpu_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu: CpuFeatures, dtype: DType, expected: LoadingStrategy
) -> None:
    monkeypatch.setattr(model_loader, "vllm_available", lambda: True)
    spec = _spec(hf_folder(tmp_path / "m"), "cpu", Quantization.none, dtype)
    assert choose_strategy(settings(loading_strategy=LoadingStrategy.auto), spec, cpu) is expected


@pytest.mark.parametrize("cpu", [ZEN3_AVX2, SKYLAKE_AVX512, ZEN4_AVX512_BF16, SAPPHIRE_RAPIDS_AMX])
def test_auto_rules_that_hold_on_every_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu: CpuFeatures) -> None:
    monkeypatch.setattr(model_loader, "vllm_available", lambda: True)
    auto = settings(loading_strategy=LoadingStrategy.auto)
    text = hf_folder(tmp_path / "t")
    for q in (Quantization.int4, Quantization.int8):
        assert choose_strategy(auto, _spec(text, "cpu", q), cpu) is LoadingStrategy.onnx
    assert choose_strategy(auto, _spec(text, "cpu", Quantization.awq), cpu) is LoadingStrategy.vllm
    assert choose_strategy(auto, _spec(text, "cuda", Quantization.none), cpu) is LoadingStrategy.vllm


def test_auto_logs_the_engine_the_reason_and_the_cpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = _spec(hf_folder(tmp_path / "m"), "cpu", Quantization.none)
    with caplog.at_level("INFO", logger=model_loader.__name__):
        choose_strategy(settings(loading_strategy=LoadingStrategy.auto), spec, ZEN3_AVX2)
    assert "LOADING_STRATEGY=auto -> onnx" in caplog.text
    assert "without native bf16" in caplog.text and "CPU avx2 (avx2, fma)" in caplog.text


def test_unquantized_cpu_without_onnxruntime_genai_keeps_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_loader, "vllm_available", lambda: True)
    monkeypatch.setattr(model_loader, "_onnx_available", lambda: False)
    spec = _spec(hf_folder(tmp_path / "m"), "cpu", Quantization.none)
    assert choose_strategy(settings(loading_strategy=LoadingStrategy.auto), spec, ZEN3_AVX2) is LoadingStrategy.vllm


def test_quantized_cpu_without_onnxruntime_genai_picks_bitsandbytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = model_loader.importlib.util.find_spec
    monkeypatch.setattr(
        model_loader.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime_genai" else real_find_spec(name, *a),
    )
    spec = _spec(hf_folder(tmp_path / "m"), "cpu", Quantization.int4)
    assert choose_strategy(settings(loading_strategy=LoadingStrategy.auto), spec) is LoadingStrategy.transformers


def test_auto_without_vllm_installed_picks_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_loader, "vllm_available", lambda: False)
    spec = _spec(hf_folder(tmp_path / "m"), "cpu", Quantization.none)
    assert choose_strategy(settings(loading_strategy=LoadingStrategy.auto), spec) is LoadingStrategy.transformers


@pytest.mark.parametrize("strategy", [s for s in LoadingStrategy if s is not LoadingStrategy.auto])
def test_explicit_strategy_is_taken_as_asked(tmp_path: Path, strategy: LoadingStrategy) -> None:
    spec = _spec(hf_folder(tmp_path / "m", vision=True), "cpu", Quantization.int8)
    assert choose_strategy(settings(loading_strategy=strategy), spec) is strategy


def test_missing_engine_module_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        model_loader._ENGINES, LoadingStrategy.onnx, ("agent.engine.no_such_engine", "X", "onnxruntime-genai")
    )
    with pytest.raises(ModelLoadError, match="LOADING_STRATEGY=onnx needs onnxruntime-genai"):
        engine_class(LoadingStrategy.onnx)


# --- MODEL_PATH --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_path", "message"),
    [
        ("/no/such/folder", "no such folder"),
        ("./relative/missing", "no such folder"),
        ("too/many/slashes", "not a hub id"),
        ("/no/such/model.gguf", "no such .gguf file"),
    ],
)
def test_bad_model_path_is_a_model_load_error(model_path: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=message) as info:
        build_engine(settings(model_path=model_path, model_cache_dir=tmp_path))
    assert info.value.status == 422
    assert "MODEL_PATH" in info.value.message


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        build_engine(settings(model_path=str(tmp_path / "empty"), model_cache_dir=tmp_path))


def test_hub_id_offline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="could not fetch from the hub"):
        build_engine(settings(model_path="newbie-app-tests/no-such-model", model_cache_dir=tmp_path / "c"))


async def test_unloadable_checkpoint_is_a_model_load_error(tmp_path: Path, no_cuda: None) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ModelLoadError) as info:
        await load_engine(
            settings(model_path=str(folder), loading_strategy=LoadingStrategy.transformers, model_cache_dir=tmp_path)
        )
    assert info.value.status == 422
    assert info.value.message  # the reason travels to /load_model's 422 answer


class _OomEngine(FakeEngine):
    """Stands in for an engine that runs out of memory while loading (cannot be provoked safely on a shared box)."""

    shut_down = False

    def __init__(self, spec: EngineSpec) -> None:
        super().__init__()

    async def start(self) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    async def shutdown(self) -> None:
        _OomEngine.shut_down = True


async def test_load_engine_wraps_crashes_and_frees_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cuda: None
) -> None:
    monkeypatch.setattr(model_loader, "engine_class", lambda strategy: _OomEngine)
    with pytest.raises(ModelLoadError, match="_OomEngine failed to start: RuntimeError: CUDA out of memory"):
        await load_engine(settings(model_path=str(hf_folder(tmp_path / "m")), model_cache_dir=tmp_path))
    assert _OomEngine.shut_down


def test_gguf_file_resolves_to_the_converted_folder(model_cache_dir: Path, smollm_folder: Path, no_cuda: None) -> None:
    """A .gguf MODEL_PATH is converted once (shared with the embedded default: same file, same cache key)."""
    gguf = checkpoints.embedded_gguf()
    engine = build_engine(
        settings(
            model_path=str(gguf),
            loading_strategy=LoadingStrategy.auto,
            quantization_type=Quantization.none,
            model_cache_dir=model_cache_dir,
        )
    )
    from agent.engine.onnx.engine import OnnxEngine

    assert isinstance(engine, OnnxEngine)  # a 135M text model, no quantization, native bf16 (bf16_cpu): ONNX fp32
    assert engine.spec.folder == smollm_folder
    assert engine.spec.name == gguf.stem
    assert (engine.spec.folder / "config.json").is_file()


def test_seed_default_int4_on_cpu_builds_the_onnx_engine(model_cache_dir: Path, no_cuda: None) -> None:
    engine = build_engine(
        settings(model_path=None, quantization_type=Quantization.int4, model_cache_dir=model_cache_dir)
    )
    from agent.engine.onnx.engine import OnnxEngine

    assert isinstance(engine, OnnxEngine)
    assert engine.spec.quantization is Quantization.int4
    assert engine.spec.name == checkpoints.EMBEDDED_NAME


def test_unquantized_on_an_avx2_cpu_builds_the_onnx_engine(
    model_cache_dir: Path, no_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run` with QUANTIZATION_TYPE=none on a CPU without native bf16 (Zen 3) serves ONNX fp32, not vLLM."""
    monkeypatch.setattr(model_loader, "cpu_features", lambda: ZEN3_AVX2)
    engine = build_engine(
        settings(model_path=None, quantization_type=Quantization.none, model_cache_dir=model_cache_dir)
    )
    from agent.engine.onnx.engine import OnnxEngine

    assert isinstance(engine, OnnxEngine) and engine.spec.quantization is Quantization.none


def test_triton_gateway_does_not_read_model_path() -> None:
    pytest.importorskip("agent.serving.triton.gateway")
    engine = build_engine(settings(loading_strategy=LoadingStrategy.triton, model_path="/no/such/folder"))
    assert type(engine).__name__ == "TritonGatewayEngine"


@pytest.mark.slow
async def test_load_engine_real_transformers_load(model_cache_dir: Path, smollm_folder: Path, no_cuda: None) -> None:
    engine = await load_engine(
        settings(
            model_path=None,
            loading_strategy=LoadingStrategy.transformers,
            quantization_type=Quantization.none,
            dtype=DType.float32,
            max_batch_size=4,
            model_cache_dir=model_cache_dir,
        )
    )
    try:
        info = engine.info()
        assert (info.engine, info.model_name, info.supports_images) == ("transformers", "SmolLM2-135M-Instruct", False)
        result = await engine.complete(
            GenerationRequest(
                messages=(Message.text("user", "What is a binary tree?"),),
                sampling=SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True),
            )
        )
        assert result.completion_tokens == 6
        assert result.text.strip()
    finally:
        await engine.shutdown()
