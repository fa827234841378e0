"""Live A/B of policies inside one server: arm assignment, the per-request log, and its report.

Assignment is deterministic per sticky key (a header such as a session id, or the OpenAI ``user``
field): ``sha256(seed, key)`` mapped to [0, 1) picks the arm by cumulative weight, so a user stays
on one arm across requests, processes and restarts, and the split follows the weights. Requests
without a key are assigned at random. An explicit arm (model name ``<model>:<arm>``,
``vllm_xargs.sinkguard_policy`` or the override header) always wins and is logged as such.

The log is JSON lines, one record per request, appended once: request id, arm, how it was
assigned, policy, latency, tokens, sink and intervention counts, the mean log-probability of the
generated tokens; no prompt text unless enabled.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sinkguard.config import StrictModel


class ABConfig(StrictModel):
    """``ab`` in the serve config: arms (policy names) and their traffic weights."""

    arms: dict[str, float] = Field(min_length=1)
    """Policy name -> weight (> 0; normalised). ``none`` is the usual control."""
    control: str = "none"
    sticky: str = "user"
    """``user`` (the OpenAI ``user`` field), ``header:<name>`` (e.g. ``header:x-session-id``), or ``none``."""
    override_header: str = "x-sinkguard-arm"
    seed: int = 0
    log: str | None = None
    """JSON-lines file every request is appended to (None: not logged)."""
    log_prompts: bool = False

    @field_validator("arms")
    @classmethod
    def _positive(cls, arms: dict[str, float]) -> dict[str, float]:
        bad = {name: weight for name, weight in arms.items() if not weight > 0}
        if bad:
            raise ValueError(f"arm weights must be > 0: {bad}")
        return arms

    @field_validator("sticky")
    @classmethod
    def _sticky(cls, sticky: str) -> str:
        if sticky not in ("user", "none") and not (sticky.startswith("header:") and len(sticky) > len("header:")):
            raise ValueError(f"sticky must be 'user', 'header:<name>' or 'none', not {sticky!r}")
        return sticky

    @model_validator(mode="after")
    def _control_is_an_arm(self) -> ABConfig:
        if self.control not in self.arms:
            raise ValueError(f"control arm {self.control!r} is not among the arms {sorted(self.arms)}")
        return self

    def check_policies(self, names: list[str]) -> None:
        """ConfigError naming an arm that is not a configured policy."""
        from sinkguard.errors import ConfigError

        unknown = [arm for arm in self.arms if arm not in names]
        if unknown:
            raise ConfigError(f"ab.arms: {unknown} are not configured policies (configured: {names})")


Assignment = Literal["sticky", "random", "explicit"]


def assign(config: ABConfig, key: str | None, rng: random.Random | None = None) -> tuple[str, Assignment]:
    """The arm for a request with sticky ``key`` (None: random), and how it was chosen."""
    if key:
        digest = hashlib.sha256(f"{config.seed}\0{key}".encode()).digest()
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
