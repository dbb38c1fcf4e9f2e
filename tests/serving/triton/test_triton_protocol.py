"""The Triton tensor contract (docs/api.md Door 2): decoding, encoding, errors. No server needed."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from agent.engine import errors
from agent.engine.images import ImageLimits
from agent.engine.types import GenerationChunk, GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from agent.serving.triton import protocol as proto
from agent.serving.triton.metrics import parse_model_info

LIMITS = proto.RequestLimits(max_new_tokens=64, default_temperature=0.5, default_top_p=0.8, max_images=2)


def png_b64(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tensors(batched: bool = False, **values: object) -> dict[str, np.ndarray]:
    """Inputs as a client sends them: shape [1] (images [N]), or [1, 1] with a batch dimension."""
    out: dict[str, np.ndarray] = {}
    for name, value in values.items():
        dtype = {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}
        kind = dtype[proto.INPUT_DATATYPES[name]]
        items = value if isinstance(value, list) else [value]
        items = [v.encode() if isinstance(v, str) else v for v in items]
        out[name] = np.array([items] if batched else items, dtype=kind)
    return out


def decode(parameters: str | None = None, **values: object) -> proto.DecodedRequest:
    return proto.decode_request(tensors(**values).get, LIMITS, "rid", parameters=parameters)


def test_text_input_uses_defaults() -> None:
    decoded = decode(text_input="What is a heap?")
    assert decoded.request.messages == (Message.text("user", "What is a heap?"),)
    assert decoded.request.sampling == SamplingParams(max_new_tokens=64, temperature=0.5, top_p=0.8, seed=None)
    assert decoded.request.request_id == "rid" and decoded.stream is False


def test_sampling_inputs() -> None:
    decoded = decode(text_input="hi", max_tokens=64, temperature=0.0, top_p=0.5, seed=7, stream=True)
    s = decoded.request.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.seed) == (64, 0.0, 0.5, 7)
    assert decoded.stream is True


def test_batched_and_batchless_shapes_decode_alike() -> None:
    values = {"text_input": "hi", "max_tokens": 5, "temperature": 0.0, "stream": True, "image": [png_b64()] * 2}
    flat = proto.decode_request(tensors(**values).get, LIMITS, "r")
    batched = proto.decode_request(tensors(batched=True, **values).get, LIMITS, "r")
    assert flat == batched and flat.request.sampling.max_new_tokens == 5 and len(flat.request.images) == 2


def test_vllm_backend_sampling_parameters_as_genai_perf_sends_them() -> None:
    """genai-perf's vLLM payload: numbers as strings, min_tokens = max_tokens for an exact output length."""
    sampling = json.dumps({"max_tokens": "48", "min_tokens": "48", "temperature": "0", "top_p": 0.5, "seed": None})
    decoded = decode(text_input="hi", stream=True, exclude_input_in_output=True, sampling_parameters=sampling)
    s = decoded.request.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.ignore_eos, s.seed) == (48, 0.0, 0.5, True, None)
    assert decoded.stream is True and decoded.echo == ""
    stops = decode(text_input="hi", sampling_parameters='{"stop": "END", "ignore_eos": "true"}').request.sampling
    assert stops.stop == ("END",) and stops.ignore_eos is True


def test_sampling_precedence_parameters_then_json_then_own_tensors() -> None:
    params = '{"max_tokens": 10, "temperature": 0.3, "top_p": 0.4}'
    decoded = decode(
        params, text_input="hi", sampling_parameters='{"max_tokens": "20", "temperature": 0.6}', max_tokens=30
    )
    s = decoded.request.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p) == (30, 0.6, 0.4)


def test_exclude_input_in_output_false_echoes_the_input_unless_streaming() -> None:
    assert decode(text_input="Say hi.", exclude_input_in_output=False).echo == "Say hi."
    assert decode(text_input="Say hi.").echo == ""  # absent: the answer alone, as this door always sent it
    with pytest.raises(errors.InvalidRequestError, match="exclude_input_in_output"):
        decode(text_input="x", stream=True, exclude_input_in_output=False)


def test_messages_with_image_parts_and_text_input_appended() -> None:
    url = "data:image/png;base64," + png_b64()
    conversation = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        },
        {"role": "assistant", "content": "A red square."},
    ]
    decoded = decode(messages=json.dumps(conversation), text_input="And now?")
    msgs = decoded.request.messages
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user"]
    assert isinstance(msgs[1].parts[1], ImagePart) and msgs[1].parts[1].image.getpixel((0, 0)) == (255, 0, 0)
    assert msgs[3].text_content == "And now?"


def test_image_tensor_attaches_to_last_user_turn() -> None:
    decoded = decode(text_input="What colour?", image=[png_b64((0, 0, 255)), "data:image/png;base64," + png_b64()])
    (user,) = decoded.request.messages
    assert [type(p) for p in user.parts] == [ImagePart, ImagePart, TextPart]
    assert user.images[0].getpixel((1, 1)) == (0, 0, 255)


@pytest.mark.parametrize(
    ("values", "error", "needle"),
    [
        ({"max_tokens": 4}, errors.InvalidRequestError, "text_input"),
        ({"text_input": "x", "image": ["!!!not base64"]}, errors.InvalidRequestError, "invalid base64"),
        ({"text_input": "x", "image": [png_b64()] * 3}, errors.PayloadTooLargeError, "MAX_IMAGES_PER_REQUEST"),
        ({"messages": "{not json"}, errors.InvalidRequestError, "invalid JSON"),
        ({"messages": json.dumps([{"role": "robot", "content": "x"}])}, errors.InvalidRequestError, "role"),
        ({"messages": json.dumps([{"role": "assistant", "content": "x"}])}, errors.InvalidRequestError, "end with"),
        ({"text_input": "x", "temperature": 3.0}, errors.InvalidValueError, "temperature"),
        ({"text_input": "x", "top_p": 0.0}, errors.InvalidValueError, "top_p"),
        ({"text_input": "x", "max_tokens": 0}, errors.InvalidValueError, "max_tokens"),
        ({"text_input": "x", "max_tokens": 1000}, errors.InvalidValueError, "MAX_NEW_TOKENS=64"),
        ({"text_input": "x", "sampling_parameters": '{"max_tokens": "1000"}'}, errors.InvalidValueError, "MAX_NEW"),
        ({"text_input": "x", "sampling_parameters": '{"max_tokens": "ten"}'}, errors.InvalidValueError, "number"),
        ({"text_input": "x", "sampling_parameters": '{"max_tokens": "2.5"}'}, errors.InvalidValueError, "integer"),
        ({"text_input": "x", "sampling_parameters": '{"top_k": 5}'}, errors.InvalidValueError, "top_k"),
        ({"text_input": "x", "sampling_parameters": "[1, 2]"}, errors.InvalidRequestError, "JSON object"),
        ({"text_input": "x", "sampling_parameters": '{"ignore_eos": "maybe"}'}, errors.InvalidValueError, "true"),
        (
            {"text_input": "x", "sampling_parameters": '{"max_tokens": 8, "min_tokens": 4}'},
            errors.InvalidValueError,
            "min_tokens",
        ),
    ],
)
def test_bad_inputs_raise_table_errors(values: dict, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle):
        decode(**values)


def test_oversized_image_is_413_before_decoding_pixels() -> None:
    limits = proto.RequestLimits(image=ImageLimits(max_bytes=10_000, max_pixels=64 * 64))
    big = png_b64(size=(100, 100))
    with pytest.raises(errors.PayloadTooLargeError, match="MAX_IMAGE_PIXELS"):
        proto.decode_request(tensors(text_input="x", image=[big]).get, limits)


def test_gateway_encoding_roundtrips_through_the_model_decoder() -> None:
    """What the gateway sends decodes, in the model, to the same conversation (pixels included) and sampling."""
    img = Image.new("RGB", (8, 4), (10, 200, 30))
    request = GenerationRequest(
        messages=(
            Message.text("system", "sys"),
            Message(role="user", parts=(ImagePart(img), TextPart("what is this?"))),
            Message.text("assistant", "green"),
            Message.text("user", "sure?"),
        ),
        sampling=SamplingParams(
            max_new_tokens=9, temperature=0.0, top_p=0.7, seed=3, stop=("\n\n", "END"), ignore_eos=True
        ),
    )
    encoded = proto.encode_request(request, stream=True)
    assert encoded[proto.MESSAGES].shape == (1,) and encoded[proto.STOP].shape == (2,)  # no batch dimension
    batched = proto.encode_request(request, stream=True, batched=True)
    assert batched[proto.MESSAGES].shape == (1, 1) and batched[proto.STOP].shape == (1, 2)
    assert proto.decode_request(batched.get, LIMITS, request.request_id) == proto.decode_request(
        encoded.get, LIMITS, request.request_id
    )
    decoded = proto.decode_request(encoded.get, LIMITS, request.request_id)
    assert decoded.stream is True
    assert decoded.request.sampling == request.sampling
    got, want = decoded.request.messages, request.messages
    assert [(m.role, m.text_content) for m in got] == [(m.role, m.text_content) for m in want]
    assert got[1].images[0].tobytes() == img.tobytes()


def test_the_gateway_forwards_the_image_file_as_sent() -> None:
    """An image that came in as a file (JPEG here) goes to Triton as those bytes, not re-encoded, and decodes there to
    the pixels the FastAPI door saw."""
    from agent.engine.images import image_part

    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (120, 30, 200)).save(buf, format="JPEG", quality=70)
    sent = base64.b64encode(buf.getvalue()).decode()
    part = image_part(f"data:image/jpeg;base64,{sent}", ImageLimits())
    request = GenerationRequest(
        messages=(Message(role="user", parts=(part, TextPart("what colour?"))),), sampling=SamplingParams(8)
    )
    items = json.loads(proto.encode_request(request, stream=True)[proto.MESSAGES][0].decode())
    assert items[0]["content"][0]["image_url"]["url"] == f"data:image/jpeg;base64,{sent}"
    decoded = proto.decode_request(proto.encode_request(request, stream=False).get, LIMITS)
    assert decoded.request.messages[0].images[0].tobytes() == part.image.tobytes()


def test_outputs_roundtrip_and_errors() -> None:
    chunk = GenerationChunk("r", " tree", prompt_tokens=12, completion_tokens=5, finish_reason="length")
    outputs = proto.chunk_outputs("a binary tree", chunk)
    back = proto.outputs_chunk(outputs.get, "r")
    assert back == GenerationChunk("r", "a binary tree", 12, 5, "length")
    mid = proto.outputs_chunk(proto.chunk_outputs("x", GenerationChunk("r", "x", 1, 1)).get, "r")
    assert mid.finish_reason is None

    err = errors.PayloadTooLargeError("image: more than MAX_IMAGE_PIXELS=4")
    text = proto.error_message(err)
    assert text == "413 payload_too_large: image: more than MAX_IMAGE_PIXELS=4"
    back_err = proto.error_from_message("[request id: 1] " + text)
    assert type(back_err) is errors.PayloadTooLargeError and back_err.message == err.message
    assert isinstance(
        proto.error_from_message("unexpected datatype TYPE_FP32 for inference input"), errors.InvalidRequestError
    )
    assert isinstance(proto.error_from_message("segfault"), errors.EngineFailure)


def test_model_info_metric_is_parsed() -> None:
    text = (
        "# TYPE dsa_triton_model_info gauge\n"
        'dsa_triton_model_info{context_length="8192",device="cpu",dtype="float32",engine="transformers",'
        'model="qwen3-vl",model_name="tiny",model_path="/m",quantization="none",supports_images="True",version="1"} 1\n'
        'dsa_triton_model_info{model="other",model_name="x",version="1"} 1\n'
    )
    replaced = text.replace('version="1"} 1', 'loaded_at="5.0",version="1"} 1', 1)
    newer = 'dsa_triton_model_info{model="qwen3-vl",model_name="newer",loaded_at="9.5",version="1"} 1\n'
    assert parse_model_info(replaced + newer, "qwen3-vl").model_name == "newer"  # type: ignore[union-attr]
    info = parse_model_info(text, "qwen3-vl")
    assert info is not None and (info.model_name, info.engine, info.supports_images, info.context_length) == (
        "tiny",
        "transformers",
        True,
        8192,
    )
    assert parse_model_info(text.replace("} 1\n", "} 0\n", 1), "qwen3-vl") is None


@pytest.mark.parametrize(
    "message",
    [
        "Request for unknown model: 'nope' is not found",
        "Request for unknown model: 'qwen3-vl' version 7 is not found",
        "Request for unknown model: 'qwen3-vl' has no available versions",
    ],
)
def test_unknown_model_is_404_in_the_gateway_and_the_client(message: str) -> None:
    from agent.client.errors import error_from_message as client_error

    gateway = proto.error_from_message(message)
    assert type(gateway) is errors.NotFoundError and gateway.status == 404
    assert client_error(message).status == gateway.status


def _raw(array: np.ndarray) -> bytes:
    """An output's raw contents as Triton puts them on the wire (BYTES: 4-byte little-endian length, then the bytes)."""
    if array.dtype == np.object_:
        return b"".join(len(v).to_bytes(4, "little") + v for v in array.reshape(-1))
    return array.tobytes()


def test_the_gateways_wire_decoder_matches_the_tensor_decoder() -> None:
    chunk = GenerationChunk("r", " ünïcode", prompt_tokens=12, completion_tokens=5, finish_reason="stop")
    outputs = proto.chunk_outputs(chunk.text, chunk)
    names, raw = list(outputs), [_raw(a) for a in outputs.values()]
    assert proto.chunk_from_raw(names, raw, "r") == proto.outputs_chunk(outputs.get, "r") == chunk
    two = _raw(np.array([b"a", b"b"], dtype=np.object_))  # not the one element the model sends: fall back
    assert proto.chunk_from_raw([proto.TEXT_OUTPUT], [two], "r") is None
    assert proto.chunk_from_raw([proto.COMPLETION_TOKENS], [np.array([1, 2], np.int32).tobytes()], "r") is None
