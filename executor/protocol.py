"""Wire protocol between the gateway and an executor: msgpack maps over ZeroMQ DEALER/ROUTER.

Gateway -> executor:

- ``{"op": "generate", "request_id", "prompt_token_ids": [int], "params": {SamplingParams fields},
  "priority": int, "cache_salt": str|None}``: ``params`` holds any fields of
  :class:`executor.request.SamplingParams` (unknown ones are refused); ``priority`` (default 0):
  lower values are scheduled first, ties first come first served; ``cache_salt``: prefix-cache
  blocks are shared only between requests with the same salt; ``output_token_ids`` (optional,
  ``n == 1`` only): tokens the request already generated on an executor that died, so it resumes
  here by recompute and continues exactly (see :meth:`executor.engine.Engine.add_request`).
- ``{"op": "abort", "request_id", "index"?}``: the request with all its completions, or with an
  integer ``index`` only that completion of an n > 1 request (no more outputs come for it).
- ``{"op": "info", "nonce"}``, ``{"op": "ping", "nonce"}`` and ``{"op": "sequences", "nonce"}``:
  answered with the same nonce.

Executor -> gateway:

- ``{"op": "output", "request_id", "index": int, "token_ids": [int], "finished": bool,
  "finish_reason": str|None, "error": str|None, "num_prompt_tokens": int,
  "num_cached_tokens": int, "logprobs": [entry]|None, "prompt_logprobs": [None, entry, ...]|None}``.
  ``index`` says which of the request's ``n`` completions it belongs to. A request the executor
  refuses (bad parameters) gets one output with ``finish_reason == "error"`` and the reason in
  ``error``.

  ``logprobs`` is present when the request set ``params.logprobs``: one entry per item of
  ``token_ids``, ``{"token_id": int, "logprob": float, "top": [[token_id, logprob], ...]}`` with
  ``top`` the ``params.logprobs`` most likely tokens, best first (it may include ``token_id``).
  ``prompt_logprobs`` is on the first output of a request that set ``params.prompt_logprobs``: one
  item per prompt token, None for the first (nothing predicts it), then entries of the same shape
  (``top`` with ``params.prompt_logprobs`` tokens). Both are natural-log probabilities of the
  model's raw next-token distribution, before penalties, temperature and top-k/top-p/min-p
  filtering (vLLM's default); see :mod:`executor.sampler`.
- ``{"op": "outputs", "outputs": [output, ...]}``: one step's outputs for one gateway, each an
  ``output`` message's fields without ``op`` (one message per step rather than per sequence); an
  output with ``prompt_logprobs`` comes alone as an ``output`` message.
- ``{"op": "reply", "nonce", ...fields}``.
- ``{"op": "error", "error": str, "nonce"?}``: a message the executor refused (undecodable,
  unknown op, a malformed field, or one its sender may not send); ``nonce`` when it had one.

Every message is validated against the models below before it reaches the engine: exact types
(an int field refuses 2.5 and true), finite floats, bounded sizes, and ``params`` against the
fields of :class:`executor.request.SamplingParams` (then its own range checks).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal, Union

import msgpack
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, create_model

from blockmgr.protocol import validate
from executor.request import SamplingParams

MAX_ID_CHARS = 256
MAX_SALT_CHARS = 1024
MAX_PROMPT_TOKENS = 2**20
#: Children of one request (``n``, ``beam_width``): more is not a request but an attack.
MAX_CHILDREN = 1024

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)
Id = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)]
Int64 = Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)]


def _params_model() -> type[BaseModel]:
    """A strict model of SamplingParams' fields, derived from the dataclass so the two never drift."""
    hints = typing.get_type_hints(SamplingParams)
    fields = {}
    for f in dataclasses.fields(SamplingParams):
        default = f.default if f.default is not dataclasses.MISSING else Field(default_factory=f.default_factory)
        fields[f.name] = (hints[f.name], default)
    return create_model("SamplingParamsWire", __config__=_STRICT, **fields)


Params = _params_model()


class _Message(BaseModel):
    model_config = _STRICT


class Generate(_Message):
    op: Literal["generate"]
    request_id: Id
    prompt_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0, lt=2**31)]],
                                Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]
    params: Params = Field(default_factory=Params)
    priority: Int64 = 0
    cache_salt: Union[Annotated[StrictStr, Field(max_length=MAX_SALT_CHARS)], None] = None
    output_token_ids: Union[Annotated[list[Annotated[StrictInt, Field(ge=0, lt=2**31)]],
                                      Field(max_length=MAX_PROMPT_TOKENS)], None] = None

    def sampling_params(self) -> SamplingParams:
        """The request's SamplingParams, range-checked.

        Raises:
            ValueError: a field out of its range (SamplingParams.validate), or too many children.
        """
        params = SamplingParams(**{k: getattr(self.params, k) for k in type(self.params).model_fields})
        params.validate()
        for name in ("n", "beam_width"):
            if getattr(params, name) > MAX_CHILDREN:
                raise ValueError(f"{name} must be <= {MAX_CHILDREN}, got {getattr(params, name)}")
        return params


class Abort(_Message):
    op: Literal["abort"]
    request_id: Id
    index: Union[Annotated[StrictInt, Field(ge=0, lt=MAX_CHILDREN)], None] = None


class Query(_Message):
    op: Literal["info", "ping", "sequences"]
    nonce: Union[Int64, Id, None] = None


Request = Annotated[Union[Generate, Abort, Query], Field(discriminator="op")]
_REQUEST = TypeAdapter(Request)
OPS = ("generate", "abort", "info", "ping", "sequences")


def parse_request(message: dict[str, Any]) -> BaseModel:
    """Validate a decoded gateway message.

    Raises:
        ValueError: unknown op, or a field of the wrong type, out of range, too long, or unknown.
    """
    return validate(_REQUEST, OPS, message, ValueError)


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(frame: bytes) -> dict[str, Any]:
    """Raises ValueError for a frame that is not a msgpack map."""
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ValueError(f"undecodable frame: {exc}") from None
    if not isinstance(message, dict):
        raise ValueError(f"expected a map, got {type(message).__name__}")
    return message
