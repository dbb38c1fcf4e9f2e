"""The OpenVINO engine behind the Triton door: the python backend builds it through the model loader
(LOADING_STRATEGY=openvino) and serves the tiny Qwen3-VL's images; answers equal the in-process engine's."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from agent.engine.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from tests.serving.triton.triton_fixtures import MODEL, RunningTriton, acquire, release

pytestmark = [pytest.mark.slow, pytest.mark.triton]
GENERATE = f"/v2/models/{MODEL}/generate"


@pytest.fixture(scope="module")
def triton_openvino_vl(tiny_vl_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTriton]:
    env = {
        "MODEL_PATH": str(tiny_vl_folder),
        "LOADING_STRATEGY": "openvino",
        "QUANTIZATION_TYPE": "none",
        "DTYPE": "float32",
        "DEVICE": "cpu",
        "MAX_BATCH_SIZE": "8",
        "TEMPERATURE": "0",
        "IMAGE_MAX_PIXELS": str(256 * 256),
        "TOKENIZERS_PARALLELISM": "false",
    }
    running = acquire("openvino-tiny-vl", env, tmp_path_factory.mktemp("triton-openvino"))
    try:
        yield running
    finally:
        release("openvino-tiny-vl")


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def test_image_request_through_triton_equals_in_process(
    triton_openvino_vl: RunningTriton, openvino_tiny_vl_engine
) -> None:
    image = Image.new("RGB", (300, 200), (10, 200, 60))
    body = {"text_input": "Describe this image.", "image": [_png_b64(image)], "max_tokens": 8, "temperature": 0.0}
    status, raw = triton_openvino_vl.post(GENERATE, body)
    assert status == 200, raw
    answer = json.loads(raw)
    request = GenerationRequest(
        messages=(Message("user", (ImagePart(image), TextPart("Describe this image."))),),
        sampling=SamplingParams(max_new_tokens=8, temperature=0.0),
    )
    direct = await openvino_tiny_vl_engine.complete(request)
    assert answer["text_output"] == direct.text
    assert answer["completion_tokens"] == direct.completion_tokens


def test_unusable_image_is_400_and_the_model_stays_ready(triton_openvino_vl: RunningTriton) -> None:
    """An image the processor cannot resize (aspect ratio over 200) is a 400, not a crash."""
    body = {"text_input": "hi", "image": [_png_b64(Image.new("RGB", (4000, 16)))], "max_tokens": 2}
    status, raw = triton_openvino_vl.post(GENERATE, body)
    assert status == 400, raw
    assert "aspect ratio" in json.loads(raw)["error"]
    assert triton_openvino_vl.get(f"/v2/models/{MODEL}/ready")[0] == 200


async def test_response_format_through_triton_equals_in_process(
    triton_openvino_vl: RunningTriton, openvino_tiny_vl_engine
) -> None:
    """Structured output at the Triton door on OpenVINO: the same constrained answer as in-process, valid JSON."""
    from agent.engine.structured.schema import SchemaLimits, response_format_constraint

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "color", "schema": schema}}
    image = Image.new("RGB", (64, 64), (10, 200, 60))
    body = {
        "text_input": "Which color? JSON.",
        "image": [_png_b64(image)],
        "max_tokens": 16,
        "temperature": 0.0,
        "response_format": json.dumps(response_format),
    }
    status, raw = triton_openvino_vl.post(GENERATE, body)
    assert status == 200, raw
    text = json.loads(raw)["text_output"]
    assert json.loads(text)["color"] in ("red", "green")
    constraint = response_format_constraint(response_format, SchemaLimits())
    request = GenerationRequest(
        messages=(Message("user", (ImagePart(image), TextPart("Which color? JSON."))),),
        sampling=SamplingParams(max_new_tokens=16, temperature=0.0, constraint=constraint),
    )
    assert text == (await openvino_tiny_vl_engine.complete(request)).text
