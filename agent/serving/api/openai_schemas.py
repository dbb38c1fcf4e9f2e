"""The subset of OpenAI's Chat Completions API that newbie-app serves (`/v1/chat/completions`, `/v1/models`).

Request fields we do not support (logprobs, n > 1, ...) are refused with 400 rather than silently ignored;
unknown fields are ignored, as OpenAI clients add new ones over time. `response_format`, `tools` and `tool_choice` are
checked by agent.serving.api.openai_structured (400 naming the problem).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.serving.api.schemas import MaxTokens, Seed, Temperature, Text, TopP, valid_unicode


class ImageURL(BaseModel):
    url: str = Field(description="a data: URL (data:image/png;base64,...); remote URLs are not fetched")
    detail: str | None = None


class TextContent(BaseModel):
    type: Literal["text"]
    text: Text


class ImageContent(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextContent | ImageContent, Field(discriminator="type")]


class FunctionCallIn(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON object's text")


class ToolCallIn(BaseModel):
    """An earlier assistant turn's tool call, sent back by the client."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="assistant turns: the tools it called")
    tool_call_id: str | None = Field(None, description="role tool: the call this result answers")

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        return valid_unicode(value) if isinstance(value, str) else value


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the served model's name (GET /v1/models); omitted: the loaded one")
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Text | list[Text] | None = Field(None, description="up to 4 non-empty strings of at most MAX_STOP_CHARS")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: generate exactly max_tokens (benchmarks)")
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    response_format: dict[str, Any] | None = Field(
        None, description="{'type': 'text' | 'json_object' | 'json_schema', 'json_schema': {name, schema, strict}}"
    )
    tools: list[dict[str, Any]] | None = Field(None, description="function tools the model may call")
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None, description="'auto' (default with tools), 'none', 'required', or {'type': 'function', 'function': {name}}"
    )
    parallel_tool_calls: bool = Field(True, description="false: at most one tool call per answer")

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageInfo


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """OpenAI's streamed tool call: `index` says which call a delta extends; the first delta carries id and name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "newbie-app"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    # Not OpenAI's (clients ignore it): gateway mode's Triton versions and the default one (docs/versioning.md).
    versions: dict[str, Any] | None = None
