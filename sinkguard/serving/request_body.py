"""A client's JSON request body, read once and bounded before anyone trusts it.

The API server's middleware parses every JSON POST body once (then routes, validates and assigns
arms on the parsed object). A body nested thousands deep makes Python's and vLLM's parsers raise
``RecursionError`` (an HTTP 500 with a traceback, and a dropped connection): such a body is a
client error, refused here with HTTP 400 before anything else reads it.
"""

from __future__ import annotations

import json
from typing import Any

from sinkguard.errors import ConfigError

MAX_JSON_DEPTH = 64  # OpenAI request bodies nest a few levels (messages -> content parts -> fields)


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep ``value`` nests (a scalar is 0); counting stops once it passes ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json_body(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The parsed body (None when it is not JSON: vLLM answers that itself); ConfigError (HTTP 400)
    for a body nested deeper than ``max_depth``."""
    too_deep = f"request body: JSON nested deeper than {max_depth} levels"
    try:
        payload = json.loads(body)
    except RecursionError:
        raise ConfigError(too_deep) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if json_depth(payload, max_depth) > max_depth:
        raise ConfigError(too_deep)
    return payload
