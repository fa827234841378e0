"""Prefix-cache isolation between policies: every request's ``cache_salt`` carries its policy.

vLLM's prefix cache keys KV blocks on the tokens and the request's ``cache_salt``. Under an
intervention the KV of every layer after the first edit differs from plain vLLM's, so a request
under one policy must never reuse KV computed under another (its output would silently be the
other policy's). The plugin wraps ``InputProcessor.process_inputs`` (the frontend process, API
server or offline ``LLM``, the one place every request passes before the engine core hashes its
blocks) and salts each request with its resolved policy: requests of one policy still share
cached KV, and requests without interventions keep the client's salt and share KV with plain
vLLM's.
"""

from __future__ import annotations

import functools
from typing import Any

from sinkguard.errors import ConfigError
from sinkguard.serving.options import RequestOptions, policy_cache_salt


def salt_request(request: Any, policies: Any) -> None:
    """Set ``request.cache_salt`` (an ``EngineCoreRequest``) from the policy it will run under."""
    params = getattr(request, "sampling_params", None)
    if params is None:  # pooling requests run no policy
        return
    try:
        policy = RequestOptions.from_extra_args(params.extra_args, strict=False).resolved_policy(policies, None)
    except ConfigError:
        return  # the workers serve it without interventions (and the API server answers 400 first)
    request.cache_salt = policy_cache_salt(request.cache_salt, policy)


def wrap_input_processor(policies: Any) -> None:
    """Salt every request vLLM's input processor builds (idempotent)."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_sinkguard_wrapped", False):
        return

    @functools.wraps(original)
    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = original(self, *args, **kwargs)
        salt_request(request, policies)
        return request

    process_inputs._sinkguard_wrapped = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs
