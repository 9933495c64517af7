"""OpenAI request bodies as strict pydantic models: wrong types are not coerced ("5" is not an
integer), unknown fields are refused, and fields OpenAI defines but a local model cannot honour
(n > 1, logprobs, tools) are refused only when they ask for something other than the default."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import OpenAIError

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Fields both endpoints take. top_k, min_p and repeat_penalty are llama.cpp's extensions."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    # accepted so that clients sending OpenAI's defaults work; 0 is the only value honoured
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    logprobs: Literal[False] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None

    def sampling(self) -> dict:
        """Keyword arguments for Model.stream. OpenAI's defaults: temperature 1, top_p 1, no
        top-k or min-p cut."""
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": self.top_k or 0,
            "min_p": self.min_p or 0.0,
            "repeat_penalty": self.repeat_penalty or 1.0,
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or []),
        }


class ChatRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # newer name of max_tokens

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role; chat templates know "system"
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class CompletionRequest(_Common):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] \
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None

    def limit(self) -> int:
        return self.max_tokens or 16  # OpenAI's default for completions

    def prompt_input(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and isinstance(p[0], str):
            return p[0]
        return p


def parse(model: type[_Strict], body: Any) -> _Strict:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    from pydantic import ValidationError

    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        if err["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif err["type"] == "missing":
            message = f"Missing required parameter: '{param}'"
        else:
            message = f"Invalid value for '{param}': {err['msg']} (got {err.get('input')!r:.80})"
        raise OpenAIError(400, message, param=param, code="invalid_value") from None


def _is_union_tag(part) -> bool:
    """pydantic names union members in error locations (`str`, `list[str]`, ...): not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))
