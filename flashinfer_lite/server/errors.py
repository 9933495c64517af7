"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the status code
OpenAI would send, so clients (the openai package raises BadRequestError, AuthenticationError,
NotFoundError, ... from them) show users a sensible message."""

from __future__ import annotations

from ..errors import ContextLengthError, FlashInferError

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class OpenAIError(Exception):
    """An error answered to the client: HTTP status plus OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}

    @classmethod
    def from_library(cls, exc: FlashInferError) -> OpenAIError:
        """A library error raised by a request (a prompt past the context, a bad sampling value)
        is the client's mistake: 400; a prompt too long gets OpenAI's own code for it."""
        if isinstance(exc, ContextLengthError):
            return cls(400, str(exc), code="context_length_exceeded")
        return cls(400, str(exc), code="invalid_value")
