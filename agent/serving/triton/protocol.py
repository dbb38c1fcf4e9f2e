"""The Triton door's tensor contract (docs/api.md "Door 2"), shared by model.py, the gateway engine and the clients.

Pure numpy: no Triton import, so every encode/decode rule is unit-tested without a server. The request rules (limits,
defaults) are agent.engine.limits', the same functions the FastAPI door calls.

Shapes: the model is configured with `max_batch_size: 0`, as NVIDIA's vllm_backend is, so a request's tensors carry no
batch dimension (`[1]`, images and stop strings `[N]`): exactly what vllm_backend clients, genai-perf and
perf_analyzer send. The decoder reads any shape holding one value (`[1]` or a batched `[1, 1]`), so a config switched
back to `max_batch_size > 0` keeps working with clients that send the batch dimension (`encode_request(batched=True)`).

vllm_backend's interface is accepted too: `sampling_parameters` (a JSON object whose numbers may be strings, as
genai-perf sends `{"max_tokens": "64"}`; Triton request parameters are read the same way) and
`exclude_input_in_output`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.engine import errors
from agent.engine import limits as rules
from agent.engine.images import data_url, decode_b64_image
from agent.engine.limits import RequestLimits
from agent.engine.structured.schema import (
    constraint_response_format,
    json_schema_constraint,
    response_format_constraint,
)
from agent.engine.structured.tools import check_tools
from agent.engine.types import (
    GenerationChunk,
    GenerationRequest,
    ImagePart,
    Message,
    OutputConstraint,
    Part,
    SamplingParams,
    TextPart,
    ToolCall,
    new_request_id,
)

TEXT_INPUT = "text_input"
MESSAGES = "messages"
IMAGE = "image"
MAX_TOKENS = "max_tokens"
TEMPERATURE = "temperature"
TOP_P = "top_p"
SEED = "seed"
STREAM = "stream"
IGNORE_EOS = "ignore_eos"
STOP = "stop"
# vllm_backend's inputs: a JSON object of sampling values, and whether the answer leaves out the prompt.
SAMPLING_PARAMETERS = "sampling_parameters"
EXCLUDE_INPUT_IN_OUTPUT = "exclude_input_in_output"
# Structured output and tools (JSON texts in OpenAI's shapes): `response_format` {"type": "json_object"} or
# {"type": "json_schema", "json_schema": {"schema": ...}}; `tools` a list of function tools for the prompt.
RESPONSE_FORMAT = "response_format"
TOOLS = "tools"

TEXT_OUTPUT = "text_output"
FINISH_REASON = "finish_reason"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
OUTPUT_NAMES = (TEXT_OUTPUT, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS)

# Triton datatype of every input, as tritonclient's InferInput wants it.
INPUT_DATATYPES: dict[str, str] = {
    TEXT_INPUT: "BYTES",
    MESSAGES: "BYTES",
    IMAGE: "BYTES",
    MAX_TOKENS: "INT32",
    TEMPERATURE: "FP32",
    TOP_P: "FP32",
    SEED: "INT64",
    STREAM: "BOOL",
    IGNORE_EOS: "BOOL",
    STOP: "BYTES",
    SAMPLING_PARAMETERS: "BYTES",
    EXCLUDE_INPUT_IN_OUTPUT: "BOOL",
    RESPONSE_FORMAT: "BYTES",
    TOOLS: "BYTES",
}

# Keys of `sampling_parameters` (and of Triton request parameters) and the type each is converted to; numbers may be
# strings ("64"), booleans "true"/"false". `min_tokens` equal to `max_tokens` means generate exactly that many
# (genai-perf's deterministic output length); any other non-zero `min_tokens` cannot be honoured and is refused.
SAMPLING_KEYS: dict[str, type] = {
    "max_tokens": int,
    "min_tokens": int,
    "temperature": float,
    "top_p": float,
    "seed": int,
    "ignore_eos": bool,
    "stop": list,
    # Structured output as vllm_backend clients send it: {"json": schema} or {"json_object": true} (newer vLLM's
    # `structured_outputs`, older vLLM's `guided_decoding`), or OpenAI's `response_format`.
    "structured_outputs": dict,
    "guided_decoding": dict,
    "response_format": dict,
}

_ROLES = ("system", "user", "assistant", "tool")
# Triton may prefix our message (e.g. "[request id: 1] "): search for "<status> <code>: " anywhere at a word start.
_ERROR_PREFIX = re.compile(r"(?:^|\s)(?P<status>\d{3}) (?P<code>[a-z_]+): (?P<message>.*)$", re.S)

TensorGetter = Callable[[str], "np.ndarray | None"]


__all__ = ["RequestLimits"]  # re-exported: the backend builds the rules from its settings through this module


@dataclass(frozen=True)
class DecodedRequest:
    """One Triton request translated for the engine, plus how the answer goes back.

    `echo`: text put before the whole (non-streamed) answer, vllm_backend's `exclude_input_in_output: false`.
    """

    request: GenerationRequest
    stream: bool
    echo: str = ""


# --------------------------------------------------------------------------------------------------------- errors
def error_message(exc: errors.EngineError) -> str:
    """The Triton error text for an engine error: starts with the status and code, e.g. `400 invalid_request: ...`."""
    return f"{exc.status} {exc.code}: {exc.message}"


_BY_CODE: dict[str, type[errors.EngineError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidRequestError,
        errors.UnsupportedInputError,
        errors.PayloadTooLargeError,
        errors.NotFoundError,
        errors.OverloadedError,
        errors.NotReadyError,
        errors.ModelLoadError,
        errors.EngineFailure,
        errors.InvalidValueError,
    )
}


def error_from_message(message: str) -> errors.EngineError:
    """Inverse of `error_message` for the gateway: a Triton error text -> the engine error it came from.

    Errors raised by Triton itself (wrong dtype or shape, unknown model) carry no code: they are bad requests when
    Triton says so, else engine failures.
    """
    match = _ERROR_PREFIX.search(message.strip())
    if match and match.group("code") in _BY_CODE:
        return _BY_CODE[match.group("code")](match.group("message"))
    lowered = message.lower()
    if any(word in lowered for word in ("data-type", "datatype", "unexpected shape", "expects", "expected")):
        return errors.InvalidRequestError(message)
    if "unknown model" in lowered or "not found" in lowered:  # 404, as agent.client.errors says too
        return errors.NotFoundError(message)
    if "unavailable" in lowered or "not ready" in lowered:
        return errors.NotReadyError(message, retry_after=1.0)
    return errors.EngineFailure(message)


# --------------------------------------------------------------------------------------------------------- decoding
def _scalar(get: TensorGetter, name: str) -> Any | None:
    array = get(name)
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise errors.InvalidRequestError(f"{name}: expected one value per request, got {flat.size}")
    return flat[0]


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise errors.InvalidRequestError(f"{name}: not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise errors.InvalidRequestError(f"{name}: expected a UTF-8 string")


def _image_from_url(part: dict[str, Any]) -> str:
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise errors.InvalidRequestError("messages: image_url part needs a data URL")
    return url


@dataclass(frozen=True)
class _PendingImage:
    """An image part whose base64 is decoded after the part count is checked against MAX_IMAGES_PER_REQUEST."""

    b64: str


def _unicode(text: str) -> str:
    """JSON allows lone UTF-16 surrogates (`"\\ud800"`); tokenizers and UTF-8 outputs do not (the shared rule)."""
    return rules.check_unicode(text, MESSAGES)


def _parts(content: Any) -> list[Part | _PendingImage]:
    """OpenAI-shaped content (a string or a list of `text` / `image_url` parts) -> parts with images pending."""
    if isinstance(content, str):
        return [TextPart(_unicode(content))]
    if not isinstance(content, list):
        raise errors.InvalidRequestError("messages: content must be a string or a list of parts")
    parts: list[Part | _PendingImage] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(TextPart(_unicode(part["text"])))
        elif kind == "image_url":
            parts.append(_PendingImage(_image_from_url(part)))
        else:
            raise errors.InvalidRequestError(f"messages: unsupported content part {kind!r}")
    return parts


def parse_messages(raw: str, limits: RequestLimits) -> list[Message]:
    """The `messages` JSON (OpenAI shape) -> engine messages with decoded, size-checked images."""
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise errors.InvalidRequestError(f"messages: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise errors.InvalidRequestError("messages: JSON nested too deeply") from None
    if not isinstance(items, list):
        raise errors.InvalidRequestError("messages: expected a JSON list of {role, content}")
    pending: list[tuple[str, list[Part | _PendingImage]]] = []
    for item in items:
        if not isinstance(item, dict) or item.get("role") not in _ROLES:
            raise errors.InvalidRequestError(f"messages: each item needs a role in {_ROLES}")
        content = item.get("content")
        pending.append((item["role"], _parts("" if content is None else content)))
    for _, parts in pending:
        rules.check_message_chars(sum(len(p.text) for p in parts if isinstance(p, TextPart)), limits)
    rules.check_image_count(sum(isinstance(p, _PendingImage) for _, parts in pending for p in parts), limits)
    return [
        Message(
            role=role,  # type: ignore[arg-type]
            parts=tuple(
                ImagePart(decode_b64_image(p.b64, limits.image)) if isinstance(p, _PendingImage) else p for p in parts
            ),
            tool_calls=_tool_calls(item.get("tool_calls")),
            tool_call_id=item.get("tool_call_id") if isinstance(item.get("tool_call_id"), str) else None,
        )
        for (role, parts), item in zip(pending, items, strict=True)
    ]


def _tool_calls(raw: Any) -> tuple[ToolCall, ...]:
    """An assistant message's `tool_calls` (OpenAI shape) -> engine tool calls."""
    if raw is None:
        return ()
    calls = []
    for call in raw if isinstance(raw, list) else [None]:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise errors.InvalidRequestError("messages: tool_calls items need function.name and function.arguments")
        arguments = fn.get("arguments", "{}")
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(str(call.get("id", "")), fn["name"], text))
    return tuple(calls)


def _structured(get: TensorGetter, values: dict[str, Any], limits: RequestLimits) -> OutputConstraint | None:
    """The request's constraint: the `response_format` tensor, else `sampling_parameters`' response_format /
    structured_outputs / guided_decoding (the FastAPI door's rules: agent.engine.structured.schema)."""
    raw = _scalar(get, RESPONSE_FORMAT)
    if raw is not None:
        try:
            response_format = json.loads(_text(raw, RESPONSE_FORMAT))
        except (json.JSONDecodeError, RecursionError):
            raise errors.InvalidRequestError(f"{RESPONSE_FORMAT}: expected a JSON object") from None
        return response_format_constraint(response_format, limits.schema)
    if "response_format" in values:
        return response_format_constraint(values["response_format"], limits.schema)
    for key in ("structured_outputs", "guided_decoding"):
        if key in values:
            spec = values[key]
            if spec.get("json_object"):
                return OutputConstraint("json_object")
            schema = spec.get("json")
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except (json.JSONDecodeError, RecursionError):
                    raise errors.InvalidRequestError(f"{SAMPLING_PARAMETERS}.{key}.json: invalid JSON") from None
            if schema is None or set(spec) - {"json", "json_object"}:
                raise errors.InvalidRequestError(
                    f"{SAMPLING_PARAMETERS}.{key}: only `json` (a JSON Schema) or `json_object` is supported"
                )
            return json_schema_constraint(schema, limits.schema, field=f"{SAMPLING_PARAMETERS}.{key}.json")
    return None


def _tools(get: TensorGetter, limits: RequestLimits) -> tuple[dict[str, Any], ...]:
    raw = _scalar(get, TOOLS)
    if raw is None:
        return ()
    try:
        items = json.loads(_text(raw, TOOLS))
    except (json.JSONDecodeError, RecursionError):
        raise errors.InvalidRequestError(f"{TOOLS}: expected a JSON list of tools") from None
    if not isinstance(items, list):
        raise errors.InvalidRequestError(f"{TOOLS}: expected a JSON list of tools")
    return check_tools(items, limits.schema)


def _float(value: Any) -> float:
    # FP32 on the wire: 0.7 arrives as 0.699999988; its shortest decimal form is what the sender meant.
    return float(str(np.float32(value)))


def _json_value(key: str, value: Any, name: str) -> Any:
    """One `sampling_parameters` value converted to its key's type; strings are parsed ("64", "0.5", "true")."""
    kind = SAMPLING_KEYS[key]
    where = f"{name}.{key}"
    if kind is dict:
        if not isinstance(value, dict):
            raise errors.InvalidRequestError(f"{where}: expected a JSON object")
        return value
    if kind is list:
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(v, str) for v in stops):
            raise errors.InvalidValueError(f"{where}: expected a string or a list of strings")
        return stops
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise errors.InvalidValueError(f"{where}: expected true or false, got {value!r}")
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int | float) or number != number:  # bools, NaN
        raise errors.InvalidValueError(f"{where}: expected a number, got {value!r}")
    if kind is int:
        if not float(number).is_integer():
            raise errors.InvalidValueError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    return float(number)


def parse_sampling_json(raw: str, name: str = SAMPLING_PARAMETERS) -> dict[str, Any]:
    """vllm_backend's sampling parameters (a JSON object) -> {key: typed value}; null values are left out.

    Unknown keys are refused (422, naming the supported ones) rather than ignored: a sampling value that silently does
    nothing would change answers without a word.
    """
    try:
        items = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, RecursionError):
        raise errors.InvalidRequestError(f"{name}: expected a JSON object") from None
    if not isinstance(items, dict):
        raise errors.InvalidRequestError(f"{name}: expected a JSON object")
    unknown = sorted(set(items) - set(SAMPLING_KEYS))
    if unknown:
        raise errors.InvalidValueError(f"{name}: unsupported key(s) {unknown}; supported: {sorted(SAMPLING_KEYS)}")
    return {key: _json_value(key, value, name) for key, value in items.items() if value is not None}


def _tensor_sampling(get: TensorGetter) -> dict[str, Any]:
    """The sampling values sent as their own tensors (None when absent)."""
    stop_array = get(STOP)
    values: dict[str, Any] = {
        "max_tokens": _scalar(get, MAX_TOKENS),
        "temperature": _scalar(get, TEMPERATURE),
        "top_p": _scalar(get, TOP_P),
        "seed": _scalar(get, SEED),
        "ignore_eos": _scalar(get, IGNORE_EOS),
        "stop": None if stop_array is None else [_text(v, STOP) for v in np.asarray(stop_array).reshape(-1)],
    }
    for key in ("temperature", "top_p"):
        if values[key] is not None:
            values[key] = _float(values[key])
    for key in ("max_tokens", "seed"):
        if values[key] is not None:
            values[key] = int(values[key])
    if values["ignore_eos"] is not None:
        values["ignore_eos"] = bool(values["ignore_eos"])
    return {k: v for k, v in values.items() if v is not None}


def _sampling(get: TensorGetter, limits: RequestLimits, parameters: str | None) -> SamplingParams:
    """Sampling values from, lowest precedence first: the request parameters, `sampling_parameters`, own tensors;
    then the shared rules (agent.engine.limits) check them and fill in the defaults."""
    values: dict[str, Any] = {}
    if parameters:
        values.update(parse_sampling_json(parameters, "parameters"))
    raw = _scalar(get, SAMPLING_PARAMETERS)
    if raw is not None:
        values.update(parse_sampling_json(_text(raw, SAMPLING_PARAMETERS)))
    values.update(_tensor_sampling(get))
    max_tokens = values.get("max_tokens")
    ignore_eos = bool(values.get("ignore_eos", False))
    min_tokens = values.get("min_tokens", 0)
    if min_tokens:
        wanted = rules.check_max_tokens(max_tokens, limits)
        if min_tokens != wanted:
            raise errors.InvalidValueError(
                f"{SAMPLING_PARAMETERS}.min_tokens: only 0 or equal to max_tokens ({wanted}) is supported, "
                f"got {min_tokens}"
            )
        ignore_eos = True  # at least and at most max_tokens: exactly max_tokens
    sampling = rules.sampling_params(
        limits,
        max_tokens=max_tokens,
        temperature=values.get("temperature"),
        top_p=values.get("top_p"),
        seed=values.get("seed"),
        stop=values.get("stop", ()),
        ignore_eos=ignore_eos,
    )
    return dataclasses.replace(sampling, constraint=_structured(get, values, limits))


def _echo(get: TensorGetter, stream: bool, messages: Sequence[Message]) -> str:
    """vllm_backend's `exclude_input_in_output`: false puts the input (the last user message's text) before the
    answer. Absent means true here (the answer alone, what this door always sent); false with streaming is refused,
    as vllm_backend refuses it."""
    exclude = _scalar(get, EXCLUDE_INPUT_IN_OUTPUT)
    if exclude is None or bool(exclude):
        return ""
    if stream:
        raise errors.InvalidRequestError(f"{EXCLUDE_INPUT_IN_OUTPUT}: false is not allowed when streaming")
    return messages[-1].text_content


def decode_request(
    get: TensorGetter, limits: RequestLimits, request_id: str | None = None, parameters: str | None = None
) -> DecodedRequest:
    """Input tensors (looked up by name; None when absent) and the request's Triton parameters (a JSON object's
    text, or None) -> the engine request. Raises EngineError subclasses."""
    raw_messages = _scalar(get, MESSAGES)
    text = _scalar(get, TEXT_INPUT)
    if raw_messages is None and text is None:
        raise errors.InvalidRequestError(f"one of the inputs {TEXT_INPUT!r} or {MESSAGES!r} is required")
    messages = [] if raw_messages is None else parse_messages(_text(raw_messages, MESSAGES), limits)
    image_array = get(IMAGE)
    b64_images = [] if image_array is None else [_text(v, IMAGE) for v in np.asarray(image_array).reshape(-1)]
    rules.check_image_count(len(b64_images) + sum(len(m.images) for m in messages), limits, IMAGE)
    images = [ImagePart(decode_b64_image(b64, limits.image)) for b64 in b64_images]
    if text is not None:
        user_text = rules.check_unicode(_text(text, TEXT_INPUT), TEXT_INPUT)
        rules.check_message_chars(len(user_text), limits, TEXT_INPUT)
        messages.append(Message(role="user", parts=(*images, TextPart(user_text))))
    elif images:
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        if not users:
            raise errors.InvalidRequestError("image: needs a user message to attach to")
        last = messages[users[-1]]
        messages[users[-1]] = Message(role="user", parts=(*images, *last.parts))
    if not messages or messages[-1].role != "user":
        raise errors.InvalidRequestError("messages: the conversation must end with a user message")
    stream_value = _scalar(get, STREAM)
    stream = bool(stream_value) if stream_value is not None else False
    request = GenerationRequest(
        messages=tuple(messages),
        sampling=_sampling(get, limits, parameters),
        request_id=request_id or new_request_id(),
        tools=_tools(get, limits),
    )
    return DecodedRequest(request=request, stream=stream, echo=_echo(get, stream, messages))


# --------------------------------------------------------------------------------------------------------- encoding
def _bytes_tensor(values: Sequence[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


def messages_json(messages: Sequence[Message]) -> str:
    """Engine messages -> the `messages` JSON (images as data URLs of their original files, so both doors decode the
    same bytes to the same pixels)."""
    items = []
    for m in messages:
        parts: list[dict[str, Any]] = []
        for p in m.parts:
            if isinstance(p, ImagePart):
                # The file as the client sent it (checked once at each door, never re-encoded), else a lossless PNG.
                parts.append({"type": "image_url", "image_url": {"url": data_url(p)}})
            else:
                parts.append({"type": "text", "text": p.text})
        item: dict[str, Any] = {"role": m.role, "content": parts}
        if m.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        items.append(item)
    return json.dumps(items, ensure_ascii=False)


def encode_request(request: GenerationRequest, *, stream: bool, batched: bool = False) -> dict[str, np.ndarray]:
    """An engine request -> input tensors, as the gateway engine sends them: `[1]` (images, stops `[N]`), or with a
    leading batch dimension of 1 when the model's config has `max_batch_size > 0` (`batched`)."""
    s = request.sampling
    tensors = {
        MESSAGES: _bytes_tensor([messages_json(request.messages)]),
        MAX_TOKENS: np.array([s.max_new_tokens], dtype=np.int32),
        TEMPERATURE: np.array([s.temperature], dtype=np.float32),
        TOP_P: np.array([s.top_p], dtype=np.float32),
        STREAM: np.array([stream], dtype=np.bool_),
    }
    if s.seed is not None:
        tensors[SEED] = np.array([s.seed], dtype=np.int64)
    if s.ignore_eos:
        tensors[IGNORE_EOS] = np.array([True], dtype=np.bool_)
    if s.stop:
        tensors[STOP] = _bytes_tensor(list(s.stop))
    if s.constraint is not None:
        tensors[RESPONSE_FORMAT] = _bytes_tensor([json.dumps(constraint_response_format(s.constraint))])
    if request.tools:
        tensors[TOOLS] = _bytes_tensor([json.dumps(list(request.tools), ensure_ascii=False)])
    if batched:
        return {name: array[np.newaxis, ...] for name, array in tensors.items()}
    return tensors


def chunk_outputs(text: str, chunk: GenerationChunk) -> dict[str, np.ndarray]:
    """Output tensors for one response (shape `[1]` each): `text` (a delta or the whole answer) and the chunk's counts
    and reason."""
    return {
        TEXT_OUTPUT: np.array([text.encode("utf-8")], dtype=np.object_),
        FINISH_REASON: np.array([(chunk.finish_reason or "").encode()], dtype=np.object_),
        PROMPT_TOKENS: np.array([chunk.prompt_tokens], dtype=np.int32),
        COMPLETION_TOKENS: np.array([chunk.completion_tokens], dtype=np.int32),
    }


def chunk_from_raw(names: Sequence[str], raw: Sequence[bytes], request_id: str) -> GenerationChunk | None:
    """One response's outputs as they come off the wire (output names and their raw little-endian contents) -> a
    chunk, without numpy: the gateway's per-token path (a third of the time of `outputs_chunk` over tritonclient's
    `as_numpy`, measured). None when an output is not the one element this model sends: the caller then uses
    `outputs_chunk`."""
    if len(names) != len(raw):
        return None
    values: dict[str, str | int] = {}
    for name, content in zip(names, raw, strict=True):
        if name in (TEXT_OUTPUT, FINISH_REASON):
            size = int.from_bytes(content[:4], "little") if len(content) >= 4 else -1
            if size != len(content) - 4:
                return None
            try:
                values[name] = content[4:].decode("utf-8")
            except UnicodeDecodeError:
                raise errors.EngineFailure(f"{name}: not valid UTF-8") from None
        elif name in (PROMPT_TOKENS, COMPLETION_TOKENS):
            if len(content) != 4:
                return None
            values[name] = int.from_bytes(content, "little", signed=True)
    finish = str(values.get(FINISH_REASON, ""))
    return GenerationChunk(
        request_id=request_id,
        text=str(values.get(TEXT_OUTPUT, "")),
        prompt_tokens=int(values.get(PROMPT_TOKENS, 0)),
        completion_tokens=int(values.get(COMPLETION_TOKENS, 0)),
        finish_reason=finish or None,  # type: ignore[arg-type]
    )


def outputs_chunk(get: TensorGetter, request_id: str) -> GenerationChunk:
    """Output tensors of one response -> a chunk (the gateway engine's side)."""
    text = _scalar(get, TEXT_OUTPUT)
    reason = _scalar(get, FINISH_REASON)
    prompt = _scalar(get, PROMPT_TOKENS)
    completion = _scalar(get, COMPLETION_TOKENS)
    finish = _text(reason, FINISH_REASON) if reason is not None else ""
    return GenerationChunk(
        request_id=request_id,
        text="" if text is None else _text(text, TEXT_OUTPUT),
        prompt_tokens=0 if prompt is None else int(prompt),
        completion_tokens=0 if completion is None else int(completion),
        finish_reason=finish or None,  # type: ignore[arg-type]
    )
