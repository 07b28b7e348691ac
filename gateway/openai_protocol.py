"""Request and response bodies of the HTTP API, as in the OpenAI API reference plus vLLM's extras.

Request models validate ranges (an out-of-range value is answered with HTTP 400, never 500).
Unknown fields of a request body are ignored with one warning per request naming them, as vLLM
does (the OpenAI API refuses them, but clients written for other servers often send a few).
Response models document the replies in the OpenAPI schema (``/openapi.json``); the routes build
plain dicts of exactly these shapes.

Integers that travel to the executor are bounded so that they always fit msgpack's 64-bit
encoding, and floats refuse NaN and infinity.
"""

from __future__ import annotations

import logging
from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

log = logging.getLogger("pagedserve.gateway")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # most choices per prompt, as OpenAI allows
MAX_LOGPROBS = 20  # most alternatives per token (OpenAI: 5 for completions, 20 for chat)

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


def _check_text(value, path: str = "") -> None:
    """Raise ValueError for a string holding a lone surrogate (JSON ``"\\ud800"``): it is not
    Unicode text, and no tokenizer or UTF-8 encoder accepts it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{path or 'a string'} is not valid Unicode text (it holds a lone surrogate)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, path)
            _check_text(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{path}[{i}]")


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data):
        _check_text(data)
        return data


def at_least_one(name: str, value, note: str = "") -> str:
    """The message for a token count below 1, the same on every endpoint (vLLM's wording), with an
    endpoint's ``note`` in parentheses after it."""
    return f"{name} must be at least 1, got {value}" + (f" ({note})" if note else "")


ECHO_ONLY = "0 is allowed only with echo"  # the completions endpoint's note on max_tokens


def _count_below(value, minimum: int) -> bool:
    """Whether ``value`` is a number (not a bool) below ``minimum``; other input is pydantic's to judge."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum


_MAX_NAMED = 10  # unknown fields named in the warning, at most
_NAME_CHARS = 40  # characters of each name shown, at most


def _unknown_fields(model: BaseModel, data, prefix: str = "") -> list[str]:
    """Paths of the keys of ``data`` (the JSON that validated into ``model``) that no field of
    ``model`` or of its nested models took: ``foo``, ``stream_options.foo``, ``messages[2].foo``."""
    if not isinstance(data, dict):
        return []
    fields = type(model).model_fields
    unknown = [f"{prefix}{k}" for k in data if k not in fields]
    for name in fields:
        value, raw = getattr(model, name, None), data.get(name)
        if isinstance(value, BaseModel):
            unknown += _unknown_fields(value, raw, f"{prefix}{name}.")
        elif isinstance(value, list) and isinstance(raw, list):
            for i, (item, raw_item) in enumerate(zip(value, raw)):
                if isinstance(item, BaseModel):
                    unknown += _unknown_fields(item, raw_item, f"{prefix}{name}[{i}].")
    return unknown


class RequestBody(_Base):
    """A top-level HTTP request body: its unknown fields, nested ones included
    (``messages[0].foo``), are logged (one warning line) and ignored.

    ``endpoint`` names the route in that line. The names are client text: shown with ``repr`` (no
    line breaks reach the log), cut to 40 characters, at most 10 of them.
    """

    endpoint: ClassVar[str] = "a request"

    @model_validator(mode="wrap")
    @classmethod
    def _warn_unknown(cls, data, handler):
        body = handler(data)
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in _unknown_fields(body, data))
            if unknown:
                shown = ", ".join(repr(k[:_NAME_CHARS]) for k in unknown[:_MAX_NAMED])
                more = f" and {len(unknown) - _MAX_NAMED} more" if len(unknown) > _MAX_NAMED else ""
                log.warning("%s: ignored unknown fields %s%s", cls.endpoint, shown, more)
        return body


# --------------------------------------------------------------------------------- requests
class TextPart(_Base):
    """One part of a message's content; only text parts are supported."""

    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    @model_validator(mode="after")
    def _content_unless_assistant(self):
        # As the OpenAI API: only an assistant turn may come without content (a misspelt
        # "content" key would otherwise pass as an empty message).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Base):
    include_usage: bool = False


class SamplingFields(RequestBody):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extra body)."""

    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = Field(None, description="up to 4 stop strings (--max-stop-strings) of at "
                                              "most 256 characters (--max-stop-string-chars); the text ends "
                                              "before the first")
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]]] = Field(
        None, description="token id (as a string) -> bias in [-100, 100], added to that token's logit before "
                          "sampling (greedy too); -100 bans a token, 100 all but forces it")
    # vLLM's extra body fields
    top_k: int = Field(0, ge=-1, le=2**31 - 1, description="0 or -1 keeps every token")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=1024)
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=1024)
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX, description="lower runs earlier; within "
                          "[-1000, 1000] by default (--max-abs-priority)")
    request_timeout: Optional[float] = Field(
        None, ge=1, description="deadline in seconds from arrival (at most the server's --request-timeout), "
                                "after which the request ends with a deadline_exceeded error")
    use_beam_search: bool = False
    beam_width: Optional[int] = Field(None, ge=1, le=MAX_N, description="beams kept by use_beam_search "
                                      "(default: best_of, else the executor's default)")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    endpoint: ClassVar[str] = "POST /v1/completions"

    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    max_tokens: Optional[int] = Field(16, ge=0, le=2**31 - 1, description="0 only with echo (the prompt alone)")
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N, description="beam width with use_beam_search; else must equal n")
    suffix: Optional[str] = None

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _max_tokens(cls, value):
        # 0 passes: it is valid with echo, which the route checks (echo is validated after this field).
        if _count_below(value, 0):
            raise ValueError(at_least_one("max_tokens", value, ECHO_ONLY))
        return value


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    endpoint: ClassVar[str] = "POST /v1/chat/completions"

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=2**31 - 1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    @field_validator("max_tokens", "max_completion_tokens", mode="before")
    @classmethod
    def _at_least_one(cls, value, info: ValidationInfo):
        # Before pydantic's own bound check, so that both endpoints word it alike.
        if _count_below(value, 1):
            raise ValueError(at_least_one(info.field_name, value))
        return value


class TokenizeRequest(RequestBody):
    """POST /tokenize: a prompt, or chat messages formatted with the model's template."""

    endpoint: ClassVar[str] = "POST /tokenize"

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(RequestBody):
    """POST /detokenize."""

    endpoint: ClassVar[str] = "POST /detokenize"

    model: Optional[str] = None
    tokens: list[TokenId]


# -------------------------------------------------------------------------------- responses
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error, whatever the status: ``{"error": {...}}``."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class Completion(BaseModel):
    """A completion; also the shape of each streamed chunk (``object`` is the same)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None
    refusal: Optional[list[TokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str] = None
    refusal: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: Optional[str] = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class HealthResponse(BaseModel):
    status: str
    executors: Optional[int] = None
    problems: Optional[list[str]] = None
