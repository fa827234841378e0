"""Per-request sinkguard options carried by ``vllm_xargs``: validated at the API server (HTTP 400)
and parsed again, with the same code, in the worker."""

from __future__ import annotations

import json
from typing import Any

import pydantic
from pydantic import Field, model_validator

from sinkguard.core.settings import WireModel, describe_validation_error
from sinkguard.errors import ConfigError

REQUEST_OPTION_PREFIX = "sinkguard_"


class RequestOptions(WireModel):
    """Per-request sinkguard settings, sent as ``vllm_xargs`` (``SamplingParams.extra_args``).

    Keys carry the ``sinkguard_`` prefix on the wire (``{"vllm_xargs": {"sinkguard_detect":
    false}}``) because vLLM's ``vllm_xargs`` is a flat map of scalars. The API server validates
    them (HTTP 400 on error) and the worker parses them with the same :meth:`from_extra_args`.
    Types are strict: ``"yes"`` is no bool and ``"10"`` no int.
    """

    detect: bool = True
    """Record sink events for this request (the detector always runs batch-wide; this keeps or
    drops the request's events and metrics)."""
    max_events: int = Field(256, ge=0, le=65536)
    """Keep at most this many events for the request (the rest are counted as dropped)."""
    policy: str | None = Field(None, min_length=1, max_length=64)
    """Name of a configured intervention policy (default: the server's default policy)."""
    inline_policy: str | None = Field(None, min_length=2, max_length=16384)
    """A whole policy as a JSON string (``{"interventions": [...]}``), where the operator allows
    inline policies (``allow_inline: true`` in the policy file). ``vllm_xargs`` holds scalars only,
    hence a string. Reported and counted under the policy name ``inline``."""

    @model_validator(mode="after")
    def _one_policy(self) -> RequestOptions:
        if self.policy is not None and self.inline_policy is not None:
            raise ValueError("give sinkguard_policy or sinkguard_inline_policy, not both")
        return self

    def resolved_policy(self, policies: Any, scope: Any) -> Any:
        """The :class:`~sinkguard.interventions.policy.Policy` this request runs under (the server's default when it
        names none); ConfigError names what is wrong. The API server and the workers both call this."""
        from sinkguard.interventions.policy import INLINE_POLICY, Policy, check_scope

        if self.inline_policy is None:
            return policies.get(self.policy or policies.default)
        if not policies.allow_inline:
            raise ConfigError("vllm_xargs.sinkguard_inline_policy: inline policies are disabled on this server "
                              "(allow_inline: false in its policy file); select a configured policy by name")
        try:
            data = json.loads(self.inline_policy)
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object with an 'interventions' list")
            policy = Policy.model_validate({**data, "name": INLINE_POLICY})
            if not policy.interventions:
                raise ValueError("interventions: an inline policy needs at least one intervention")
        except RecursionError:
            raise ConfigError("vllm_xargs.sinkguard_inline_policy: JSON nested too deeply") from None
        except (ValueError, pydantic.ValidationError) as exc:
            detail = describe_validation_error(exc) if isinstance(exc, pydantic.ValidationError) else str(exc)
            raise ConfigError(f"vllm_xargs.sinkguard_inline_policy: {detail}") from None
        if scope is not None:  # None: no model to check against (an API server without sinkguard's config)
            try:
                check_scope([policy], scope, policies.budget)
            except ConfigError as exc:
                raise ConfigError(f"vllm_xargs.sinkguard_inline_policy: {exc}") from None
        return policy

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None, strict: bool = True) -> RequestOptions:
        """Parse the ``sinkguard_*`` keys of ``extra_args``; ConfigError names a bad key. ``strict=False``
        in the worker: vLLM's protocol model has already coerced the client's values (its
        ``vllm_xargs`` holds ``str | int | float``: ``false`` arrives as ``0``), and the API server
        checked the client's own JSON types strictly before that."""
        fields: dict[str, Any] = {}
        for key, value in (extra_args or {}).items():
            if key.startswith(REQUEST_OPTION_PREFIX):
                fields[key[len(REQUEST_OPTION_PREFIX):]] = value
        try:
            return cls.model_validate(fields, strict=strict)
        except pydantic.ValidationError as exc:
            problems = describe_validation_error(exc, prefix=f"vllm_xargs.{REQUEST_OPTION_PREFIX}")
            raise ConfigError(f"invalid sinkguard request option: {problems}") from None


def policy_cache_key(policy: Any) -> str:
    """What a request's KV depends on besides its tokens: ``none`` for a policy without
    interventions (its activations are plain vLLM's), else a digest of the policy's content (two
    names for the same edits share it; an edited policy file does not)."""
    import hashlib

    if policy is None or not policy.interventions:
        return "none"
    content = json.dumps([spec.model_dump(mode="json") for spec in policy.interventions], sort_keys=True)
    return "policy-" + hashlib.sha256(content.encode()).hexdigest()[:24]


def policy_cache_salt(user_salt: str | None, policy: Any) -> str | None:
    """The prefix-cache salt of a request under ``policy``: KV computed under one policy's edits is
    never reused by a request under another, while requests of one policy (or of none) share it.
    The client's own salt is kept inside it (requests without interventions keep it unchanged)."""
    key = policy_cache_key(policy)
    if key == "none":
        return user_salt
    return f"sinkguard:{key}" + (f":{user_salt}" if user_salt else "")
