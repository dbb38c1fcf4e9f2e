"""Request and response types shared by every engine and both doors."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class ImagePart:
    """A decoded, size-checked image (see agent.engine.images).

    `source` is the image file as the client sent it (None when the image was made here): a gateway forwards those
    bytes as they are, instead of re-encoding the decoded pixels. `mime` is its type.
    """

    image: Image.Image
    type: Literal["image"] = "image"
    source: bytes | None = field(default=None, repr=False, compare=False)
    mime: str = field(default="image/png", compare=False)


Part = TextPart | ImagePart


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made (OpenAI's `tool_calls[i]`): `arguments` is a JSON object's text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns that called tools
    tool_call_id: str | None = None  # role "tool": the call this message answers

    @classmethod
    def text(cls, role: Role, text: str) -> Message:
        return cls(role=role, parts=(TextPart(text),))

    @property
    def images(self) -> list[Image.Image]:
        return [p.image for p in self.parts if isinstance(p, ImagePart)]

    @property
    def text_content(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


ConstraintKind = Literal["json_object", "json_schema"]


@dataclass(frozen=True)
class OutputConstraint:
    """Structured output: the generated text must match it (compiled and enforced by agent.engine.structured).

    `json_object`: any JSON object; `json_schema`: `schema` (a JSON Schema as compact JSON text, so equal
    schemas share one compiled grammar).
    """

    kind: ConstraintKind
    schema: str = ""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: generate exactly max_new_tokens
    constraint: OutputConstraint | None = None  # structured output (JSON object / JSON schema)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[Message, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=new_request_id)
    # OpenAI function tools the model may call (`{"type": "function", "function": {name, description, parameters}}`),
    # rendered into the prompt (agent.engine.structured.tools); empty: none.
    tools: tuple[dict[str, Any], ...] = ()

    @property
    def images(self) -> list[Image.Image]:
        return [img for m in self.messages for img in m.images]


@dataclass(frozen=True)
class GenerationChunk:
    """One step of a generation stream: new text, running token counts and, on the last chunk, why it ended."""

    request_id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass(frozen=True)
class EngineInfo:
    model_name: str
    engine: str  # "transformers" | "vllm" | "onnx" | "triton" | "fake"
    supports_images: bool
    context_length: int
    device: str
    model_path: str
    dtype: str = "auto"
    quantization: str = "none"


@dataclass
class EngineStats:
    """Live counters for /metrics and tests: requests running, waiting, and the sizes of recent forward batches."""

    running: int = 0
    waiting: int = 0
    steps: int = 0
    max_batch_seen: int = 0
    batch_size_sum: int = 0
    prefix_cached_tokens: int = 0  # prompt tokens taken from a prefix cache instead of computed (ONNX engine)

    def record_step(self, batch_size: int) -> None:
        self.steps += 1
        self.batch_size_sum += batch_size
        self.max_batch_seen = max(self.max_batch_seen, batch_size)
