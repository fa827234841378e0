"""Per-request sinkguard options carried by ``vllm_xargs``: validated at the API server (HTTP 400)
and parsed again, with the same code, in the worker."""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic import Field

from sinkguard.config import StrictModel, describe_validation_error
from sinkguard.errors import ConfigError

REQUEST_OPTION_PREFIX = "sinkguard_"


class RequestOptions(StrictModel):
    """Per-request sinkguard settings, sent as ``vllm_xargs`` (``SamplingParams.extra_args``).

    Keys carry the ``sinkguard_`` prefix on the wire (``{"vllm_xargs": {"sinkguard_detect":
    false}}``) because vLLM's ``vllm_xargs`` is a flat map of scalars. The API server validates
    them (HTTP 400 on error) and the worker parses them with the same :meth:`from_extra_args`.
    """

    detect: bool = True
    """Record sink events for this request (the detector always runs batch-wide; this keeps or
    drops the request's events and metrics)."""
    max_events: int = Field(256, ge=0, le=65536)
    """Keep at most this many events for the request (the rest are counted as dropped)."""
    policy: str | None = Field(None, min_length=1, max_length=64)
    """Name of a configured intervention policy (default: the server's default policy)."""

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> RequestOptions:
        """Parse the ``sinkguard_*`` keys of ``extra_args``; ConfigError names a bad key."""
        fields: dict[str, Any] = {}
        for key, value in (extra_args or {}).items():
            if key.startswith(REQUEST_OPTION_PREFIX):
                fields[key[len(REQUEST_OPTION_PREFIX):]] = value
        try:
            return cls.model_validate(fields)
        except pydantic.ValidationError as exc:
            problems = describe_validation_error(exc, prefix=f"vllm_xargs.{REQUEST_OPTION_PREFIX}")
            raise ConfigError(f"invalid sinkguard request option: {problems}") from None
