"""Live A/B of policies inside one server: arm assignment, the per-request log, and its report.

Assignment is deterministic per sticky key (a header such as a session id, or the OpenAI ``user``
field): ``sha256(seed, key)`` mapped to [0, 1) picks the arm by cumulative weight, so a user stays
on one arm across requests, processes and restarts, and the split follows the weights. Requests
without a key are assigned at random. An explicit arm (model name ``<model>:<arm>``,
``vllm_xargs.sinkguard_policy`` or the override header) always wins and is logged as such.

The log is JSON lines, one record per request, appended once: request id, arm, how it was
assigned, policy, latency, tokens, sink and intervention counts, the mean log-probability of the
generated tokens; no prompt text unless enabled.

Everything here is engine independent and speaks the OpenAI protocol on plain JSON: deciding a
request's arm (:func:`decide_arm`), asking for the log-probabilities the log needs
(:func:`request_logprobs`) and reading a response, whole or streamed (:class:`ResponseObserver`).
The ASGI plumbing and the sink counts from the workers are in ``engines/vllm/ab_traffic.py``.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sinkguard.errors import ConfigError
from sinkguard.serving.settings import ABConfig

__all__ = ["ABConfig", "ABLog", "Decision", "ResponseObserver", "assign", "decide_arm", "read_log",
           "request_logprobs", "sticky_key"]


Assignment = Literal["sticky", "random", "explicit"]


def key_digest(config: ABConfig, key: str) -> bytes:
    """``sha256(seed, key)``: places a sticky key on [0, 1) and, truncated, stands for it in the log."""
    return hashlib.sha256(f"{config.seed}\0{key}".encode()).digest()


def assign(config: ABConfig, key: str | None, rng: random.Random | None = None) -> tuple[str, Assignment]:
    """The arm for a request with sticky ``key`` (None: random), and how it was chosen."""
    if key:
        digest = key_digest(config, key)
        point, how = int.from_bytes(digest[:8], "big") / 2**64, "sticky"
    else:
        point, how = (rng or random).random(), "random"
    total = sum(config.arms.values())
    cumulative = 0.0
    for arm, weight in config.arms.items():
        cumulative += weight / total
        if point < cumulative:
            return arm, how
    return next(reversed(config.arms)), how


def sticky_key(config: ABConfig, headers: dict[str, str], payload: dict[str, Any]) -> str | None:
    if config.sticky == "user":
        user = payload.get("user")
        return user if isinstance(user, str) and user else None
    if config.sticky.startswith("header:"):
        return headers.get(config.sticky[len("header:"):].lower()) or None
    return None


@dataclass(frozen=True)
class Decision:
    arm: str
    assignment: Assignment
    key_hash: str | None  # a hash of the sticky key (the log never holds the key itself)


def decide_arm(config: ABConfig, payload: dict[str, Any], headers: dict[str, str], named_arm: str | None,
               policies: list[str], rng: random.Random) -> Decision:
    """The arm of a request (``payload`` is rewritten in place to run under it).

    Explicit choices win: an arm model name (``named_arm``, already routed), ``vllm_xargs``'
    policy or inline policy, or the override header (any of ``policies``). Two explicit choices
    that disagree, or an override naming no policy, are a ConfigError (HTTP 400)."""
    xargs = payload.get("vllm_xargs")
    xargs = xargs if isinstance(xargs, dict) else {}
    override = headers.get(config.override_header.lower())
    chosen = named_arm or xargs.get("sinkguard_policy")
    if "sinkguard_inline_policy" in xargs:
        chosen = "inline"
    if override is not None:
        if override not in policies:
            raise ConfigError(f"header {config.override_header}: {override!r} is not a configured policy "
                              f"(configured: {policies})")
        if chosen is not None and chosen != override:
            raise ConfigError(f"header {config.override_header} selects arm {override!r} but the request selects "
                              f"{chosen!r}; name one")
        chosen = override
    key = sticky_key(config, headers, payload)
    key_hash = key_digest(config, key).hex()[:16] if key else None
    if chosen is not None:
        decision = Decision(chosen, "explicit", key_hash)
    else:
        arm, how = assign(config, key, rng)
        decision = Decision(arm, how, key_hash)
    if decision.arm != "inline":
        if not isinstance(payload.get("vllm_xargs"), dict):
            payload["vllm_xargs"] = {}
        payload["vllm_xargs"]["sinkguard_policy"] = decision.arm
    return decision


def request_logprobs(payload: dict[str, Any], chat: bool) -> bool:
    """Ask for the generated tokens' log-probabilities if the client did not; True when they were
    added (the response must then lose them again). Not with ``echo``: that would also compute the
    prompt's log-probabilities."""
    if chat:
        if payload.get("logprobs"):
            return False
        payload["logprobs"], payload["top_logprobs"] = True, 0
        return True
    if payload.get("logprobs") is not None or payload.get("echo"):
        return False
    payload["logprobs"] = 0  # the sampled token's only
    return True


@dataclass
class ResponseObserver:
    """Reads what the log needs from an OpenAI completions / chat response, whole or streamed, and
    removes the log-probabilities sinkguard asked for (``strip``) before the client sees them."""

    chat: bool
    stream: bool
    strip: bool
    echo: bool = False
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    response_id: str | None = None
    logprobs: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: int = 0
    failed: bool = False  # reading the response failed: it passes through untouched from then on
    _pending: bytes = b""

    def body(self, data: bytes, more: bool) -> bytes:
        """A body message of the response; returns the bytes to send on (possibly fewer, held back).
        Fail-open: if reading fails, everything held and all that follows passes through untouched."""
        if not more:
            self.finished_at = time.perf_counter()
        if self.status == 200 and not self.failed:
            try:
                return self._observe(data, more)
            except Exception:
                self.failed = True
        held, self._pending = self._pending + data, b""
        if not self.stream and self.status == 200 and more:
            self._pending = held  # a whole answer is sent when complete (its length is set then)
            return b""
        return held

    def _observe(self, data: bytes, more: bool) -> bytes:
        buffer = self._pending + data
        if not self.stream:
            if more:
                self._pending = buffer
                return b""
            try:
                payload = json.loads(buffer)
            except (json.JSONDecodeError, UnicodeDecodeError):
                payload = None
            sent = json.dumps(payload).encode() if payload is not None and self._read(payload) else buffer
            self._pending = b""  # only once read: on a failure, body() sends what was held
            return sent
        events, _, rest = buffer.rpartition(b"\n\n")
        if not more and rest:  # a last event without its blank line
            events, rest = events + b"\n\n" + rest, b""
        sent = b"".join(self._event(e) for e in events.split(b"\n\n") if e) if events else b""
        self._pending = rest
        return sent

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data:") or event.strip() == b"data: [DONE]":
            return event + b"\n\n"
        try:
            payload = json.loads(event[5:])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return event + b"\n\n"
        changed = self._read(payload)
        return (b"data: " + json.dumps(payload).encode() if changed else event) + b"\n\n"

    def _read(self, payload: Any) -> bool:
        """Record ids, usage and log-probabilities of one response object; True if it was edited."""
        if not isinstance(payload, dict):
            return False
        self.response_id = self.response_id or payload.get("id")
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
        changed = False
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if text and self.stream and self.first_token_at is None:  # a whole answer has no first token time
                self.first_token_at = time.perf_counter()
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):
                if self.chat:
                    self.logprobs += [float(t["logprob"]) for t in logprobs.get("content") or ()
                                      if isinstance(t, dict) and t.get("logprob") is not None]
                else:
                    self.logprobs += [float(x) for x in logprobs.get("token_logprobs") or () if x is not None]
            if self.strip and "logprobs" in choice:
                choice["logprobs"], changed = None, True
        return changed

    def summary(self) -> dict[str, Any]:
        """The response's part of the log record."""
        end = self.finished_at or time.perf_counter()
        generated = self.logprobs
        if self.echo:  # echoed prompt tokens come first
            generated = generated[-self.completion_tokens:] if self.completion_tokens else []
        completion = self.completion_tokens if self.completion_tokens is not None else (len(generated) or None)
        return {"status": self.status, "response_id": self.response_id,
                "latency_s": round(end - self.started, 6),
                "ttft_s": round(self.first_token_at - self.started, 6) if self.first_token_at else None,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "mean_logprob": sum(generated) / len(generated) if generated else None}


class ABLog:
    """Append-only JSON-lines log; one line per request, written whole under a lock."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)


def read_log(path: Path | str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number + 1}: not a JSON line") from None
    return rows
