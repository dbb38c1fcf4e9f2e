"""Request and response bodies of the seed's routes and the session routes (docs/api.md, "Door 1").

Shapes and types live here (pydantic -> 422); the request rules (ranges, MAX_NEW_TOKENS, stop strings, message
size, image count) are `agent.engine.limits`', the same at the Triton door: the sampling types only document their
ranges in the OpenAPI schema, and `ChatRequest.sampling` applies the rules (422).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator

from agent.config import Attention, Device, DType, LoadingStrategy, Quantization
from agent.engine import limits
from agent.engine.types import EngineInfo, SamplingParams
from agent.serving.api.history_store import SessionSummary, StoredTurn
from agent.serving.inference_engine import ChatReply


def valid_unicode(value: str) -> str:
    """Refuse lone UTF-16 surrogates (JSON allows `"\\ud800"`): they cannot be stored, tokenized or sent back."""
    problem = limits.unicode_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


Text = Annotated[str, AfterValidator(valid_unicode)]
SessionId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\w.:-]+$", examples=["default"])]
# Ranges are checked by agent.engine.limits (the same rule and message at both doors); here they only document.
Temperature = Annotated[
    float,
    Field(
        description="0 = greedy; default TEMPERATURE",
        json_schema_extra={"minimum": limits.TEMPERATURE_RANGE[0], "maximum": limits.TEMPERATURE_RANGE[1]},
    ),
]
TopP = Annotated[
    float,
    Field(
        description="default TOP_P",
        json_schema_extra={"exclusiveMinimum": limits.TOP_P_RANGE[0], "maximum": limits.TOP_P_RANGE[1]},
    ),
]
MaxTokens = Annotated[int, Field(description="at most MAX_NEW_TOKENS (its default)", json_schema_extra={"minimum": 1})]
Seed = Annotated[int, Field(description="0 to 2**63-1", json_schema_extra={"minimum": limits.SEED_RANGE[0]})]


class ChatRequest(BaseModel):
    """`POST /chat`: one user message (with an optional image) in a session."""

    message: Text = Field(description="the user's message (at most MAX_MESSAGE_CHARS characters)")
    image_base64: str | None = Field(None, description="an image as base64 or a data: URL (vision models only)")
    session_id: SessionId | None = Field(None, description="omitted: the default session")
    stream: bool = Field(False, description="true: an SSE stream of {delta} events and a final {done} event")
    max_new_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None

    @field_validator("message")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    def sampling(self, rules: limits.RequestLimits) -> SamplingParams:
        """The request's sampling values checked against the request rules (422), defaults filled in."""
        return limits.sampling_params(
            rules,
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            max_tokens_name="max_new_tokens",
        )


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class ChatResponse(BaseModel):
    response: str
    session_id: str
    response_time: float = Field(description="seconds from request to answer")
    usage: UsageOut
    finish_reason: str = Field(description="stop, length or abort")

    @classmethod
    def of(cls, reply: ChatReply) -> ChatResponse:
        return cls(
            response=reply.response,
            session_id=reply.session_id,
            response_time=round(reply.response_time, 4),
            usage=UsageOut(**asdict(reply.usage)),
            finish_reason=reply.finish_reason,
        )


class LoadModelRequest(BaseModel):
    """`POST /load_model`: fields left out keep their current values; `model_path: null` = the embedded default."""

    model_path: str | None = Field(None, max_length=4096, description="local folder, .gguf file or hub id")
    loading_strategy: LoadingStrategy | None = None
    quantization_type: Quantization | None = None
    attention_impl: Attention | None = None
    device: Device | None = None
    dtype: DType | None = None

    def changes(self) -> dict[str, Any]:
        """The settings to change: every field sent, except enum fields sent as null."""
        sent = self.model_dump(exclude_unset=True)
        return {k: v for k, v in sent.items() if v is not None or k == "model_path"}


class EngineInfoOut(BaseModel):
    model_name: str
    engine: str
    supports_images: bool
    context_length: int
    device: str
    model_path: str
    dtype: str
    quantization: str

    @classmethod
    def of(cls, info: EngineInfo) -> EngineInfoOut:
        return cls(**{k: str(v) if k in ("dtype", "quantization") else v for k, v in asdict(info).items()})


class LoadModelResponse(BaseModel):
    status: Literal["loaded"] = "loaded"
    model: EngineInfoOut


class HealthResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: EngineInfoOut
    engine: str
    running: int
    waiting: int
    versions: dict[str, Any] | None = Field(
        None, description="gateway mode: the Triton model's versions and the default one (docs/versioning.md)"
    )


class ClearHistoryRequest(BaseModel):
    session_id: SessionId | None = None


class ClearHistoryResponse(BaseModel):
    status: Literal["cleared"] = "cleared"
    session_id: str


class TurnOut(BaseModel):
    role: Literal["user", "assistant"]
    content: str
    has_image: bool = Field(description="the turn carried an image (images themselves are not stored)")
    created_at: float = Field(description="Unix time")

    @classmethod
    def of(cls, turn: StoredTurn) -> TurnOut:
        return cls(**asdict(turn))


class HistoryResponse(BaseModel):
    session_id: str
    history: list[TurnOut]


class SessionOut(BaseModel):
    session_id: str
    title: str = Field(description="the session's first message, shortened")
    turns: int = Field(description="user + assistant pairs")
    updated_at: float = Field(description="Unix time")
    owner: str = Field("local", description="the principal the session belongs to")

    @classmethod
    def of(cls, session: SessionSummary) -> SessionOut:
        return cls(**asdict(session))


class SessionsResponse(BaseModel):
    sessions: list[SessionOut]


class SessionCreated(BaseModel):
    session_id: str


class SessionDeleted(BaseModel):
    status: Literal["deleted"] = "deleted"
    session_id: str
