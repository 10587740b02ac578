"""The request bodies `swarm api` takes, checked before any work is done.

Types are strict (`"0.5"` is not a temperature, `true` is not a token count) and each range is
OpenAI's. A bad body is refused with one error that names the first bad parameter the way
OpenAI's API does (`messages[0].content`). Parameters we do not know are ignored, as OpenAI-
compatible servers do; ones we know but cannot honour (n > 1, logprobs) are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import bad_parameter

MAX_STOP_SEQUENCES = 4  # OpenAI's limit


@dataclass(frozen=True)
class Sampling:
    """How to pick the completion's tokens; temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class CompletionParameters(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Any = Field(None, validate_default=True)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("should be a string or a list of strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence is empty")
        return tuple(stops)

    @field_validator("n")
    @classmethod
    def _n(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n = 1 is supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: Any) -> Any:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def completion_limit(self) -> int | None:
        return self.max_tokens

    def sampling(self, default_max_tokens: int) -> Sampling:
        limit = self.completion_limit()
        return Sampling(max_tokens=default_max_tokens if limit is None else limit,
                        temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=self.stop)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str:
        """A string, or OpenAI's list of content parts of which only text ones are understood."""
        if value is None or isinstance(value, str):
            return value or ""
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                           and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise ValueError('should be a string or a list of {"type": "text", "text": ...} parts')


class ChatRequest(CompletionParameters):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """The messages as a chat template takes them (OpenAI's "developer" is a system message)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in self.messages]


class TextRequest(CompletionParameters):
    """POST /v1/completions: `prompt` is a string, or a list holding one."""

    prompt: Any
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise ValueError("should be a string (one prompt per request)")
        return value

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value


def parse_body(raw: bytes, kind: type[CompletionParameters]) -> CompletionParameters:
    """The request `raw` holds, or an ApiError (400) naming the first parameter that is wrong."""
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise bad_parameter(None, f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_parameter(None, "the request body should be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        raise _first_problem(e) from None


def _first_problem(error: ValidationError):
    problem = error.errors()[0]
    param = _param_name(problem["loc"])
    if problem["type"] == "missing":
        missing = bad_parameter(param, f"Missing required parameter: {param!r}")
        missing.code = "missing_required_parameter"
        return missing
    message = problem["msg"].removeprefix("Value error, ")
    return bad_parameter(param, f"Invalid value for {param!r}: {message} (got {json.dumps(problem['input'])[:80]})")


def _param_name(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name
