"""Arms as model names: any OpenAI client (lm-evaluation-harness included) picks a policy by model name.

A server that serves ``smollm2`` with policies ``act`` and ``remove`` also lists ``smollm2:none``,
``smollm2:act`` and ``smollm2:remove`` in ``/v1/models``; a request for ``smollm2:act`` is served by
``smollm2`` under policy ``act`` (``vllm_xargs.sinkguard_policy`` is set for it). A request that
names an arm both ways, differently, is refused (HTTP 400) rather than guessed. Pure functions on
JSON payloads; the ASGI plumbing is in ``middleware.py``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sinkguard.errors import ConfigError

ARM_SEPARATOR = ":"
ARM_HEADER = "x-sinkguard-arm"


def split_arm(model: Any, arms: Collection[str]) -> tuple[Any, str | None]:
    """``("smollm2", "act")`` for ``"smollm2:act"`` when ``act`` is an arm; else ``(model, None)``."""
    if not isinstance(model, str) or ARM_SEPARATOR not in model:
        return model, None
    base, _, arm = model.rpartition(ARM_SEPARATOR)
    return (base, arm) if base and arm in arms else (model, None)


def route_arm(payload: dict[str, Any], arms: Collection[str], served: Collection[str] = ()) -> str | None:
    """Rewrite ``payload`` in place for the arm its model name selects; returns the arm (None: none
    named). ConfigError if ``vllm_xargs`` selects another policy, or if the name is a ``served``
    model's with an arm the server does not have (vLLM's own 404 would list the base model only)."""
    model = payload.get("model")
    base, arm = split_arm(model, arms)
    if arm is None:
        base, _, unknown = model.rpartition(ARM_SEPARATOR) if isinstance(model, str) else ("", "", "")
        if base in served and model not in served:
            raise ConfigError(f"model {model!r}: {unknown!r} is not an arm of {base!r} (arms: "
                              f"{', '.join(base + ARM_SEPARATOR + a for a in arms)})")
        return None
    xargs = payload.get("vllm_xargs")
    if xargs is None:
        xargs = payload["vllm_xargs"] = {}
    if not isinstance(xargs, dict):
        raise ConfigError("vllm_xargs must be a JSON object")
    chosen = xargs.get("sinkguard_policy")
    if chosen is not None and chosen != arm:
        raise ConfigError(f"model {payload['model']!r} selects arm {arm!r} but vllm_xargs.sinkguard_policy selects "
                          f"{chosen!r}; name one")
    if "sinkguard_inline_policy" in xargs:
        raise ConfigError(f"model {payload['model']!r} selects arm {arm!r}; an inline policy cannot be added to it")
    xargs["sinkguard_policy"] = arm
    payload["model"] = base
    return arm


def with_arm_models(models: dict[str, Any], arms: Collection[str]) -> dict[str, Any]:
    """``/v1/models``' answer with one ``<model>:<arm>`` entry per served model and arm."""
    data = models.get("data")
    if not isinstance(data, list):
        return models
    served = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    extra = [{**m, "id": f"{m['id']}{ARM_SEPARATOR}{arm}", "root": m.get("root", m["id"]), "parent": m["id"]}
             for m in served for arm in arms]
    return {**models, "data": [*data, *extra]}
