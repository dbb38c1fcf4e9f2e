"""One error table for every door: each engine/service error carries its HTTP status (ARCHITECTURE principle 6)."""

from __future__ import annotations


class EngineError(Exception):
    """Base of all errors the doors translate into responses. `status` is the HTTP status code."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidRequestError(EngineError):
    status, code = 400, "invalid_request"


class UnsupportedInputError(InvalidRequestError):
    """E.g. an image sent to a text-only model."""

    code = "unsupported_input"


class InvalidValueError(EngineError):
    """A value outside its rule (range, count, length): 422 at both doors (the rules: agent.engine.limits)."""

    status, code = 422, "validation_error"


class PayloadTooLargeError(EngineError):
    status, code = 413, "payload_too_large"


class NotFoundError(EngineError):
    status, code = 404, "not_found"


class OverloadedError(EngineError):
    status, code = 429, "overloaded"


class NotReadyError(EngineError):
    status, code = 503, "not_ready"


class ModelLoadError(EngineError):
    """The requested model/settings cannot be loaded here (bad path, impossible combination)."""

    status, code = 422, "model_load_failed"


class EngineFailure(EngineError):
    """A bug or crash inside an engine: 500 and logged, never disguised as 4xx."""

    status, code = 500, "engine_failure"
