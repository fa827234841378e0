"""Settings of the vLLM plugin (``$SINKGUARD_CONFIG``): the serve config, its live A/B experiment and
fault injection. Engine-independent: the plugin, the routes and the workers read them through
:mod:`sinkguard.serving.loader`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sinkguard.core.settings import StrictModel, read_json_config, validate_config
from sinkguard.errors import ConfigError


class FaultInjection(StrictModel):
    """Chaos testing of the fail-open path: raise inside the detector on purpose."""

    stage: Literal["step_start", "layer", "intervention", "step_end"] = "layer"
    """Where: before the first layer, after a layer's forward, in an attention edit, or in the end-of-step detection."""
    every_steps: int = Field(1, ge=1)
    """On every n-th engine step."""


class ABConfig(StrictModel):
    """``ab`` in the serve config: a live experiment of policies (arms) and their traffic weights.

    Requests that select no arm themselves (by model name ``<model>:<arm>``, ``vllm_xargs``, or the
    override header) are assigned one by weight, sticky per key; see :mod:`sinkguard.serving.ab`."""

    arms: dict[str, float] = Field(min_length=1)
    """Policy name -> weight (> 0; normalised). ``none`` is the usual control."""
    control: str = "none"
    """The arm the others are compared with (must be one of ``arms``)."""
    sticky: str = "user"
    """``user`` (the OpenAI ``user`` field), ``header:<name>`` (e.g. ``header:x-session-id``), or ``none``."""
    override_header: str = Field("x-sinkguard-arm", min_length=1)
    """Request header that names an arm explicitly (any configured policy; an unknown one is HTTP 400)."""
    seed: int = 0
    """Seed of the sticky hash and of the random assignment of keyless requests."""
    log: str | None = None
    """JSON-lines file every request is appended to, once (None: not logged)."""
    log_prompts: bool = False
    """Also log the request's prompt / messages (off: logs carry no user text)."""
    record_logprobs: bool = True
    """Ask the engine for the generated tokens' log-probabilities when the client did not (and remove
    them from its response), so every request's mean log-probability reaches the log and metrics."""

    @field_validator("arms")
    @classmethod
    def _positive(cls, arms: dict[str, float]) -> dict[str, float]:
        bad = {name: weight for name, weight in arms.items() if not (weight > 0 and math.isfinite(weight))}
        if bad:
            raise ValueError(f"arm weights must be finite and > 0: {bad}")
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
        unknown = [arm for arm in self.arms if arm not in names]
        if unknown:
            raise ConfigError(f"ab.arms: {unknown} are not configured policies (configured: {names})")


class ServeConfig(StrictModel):
    """Settings of the vLLM plugin, read once per process from ``$SINKGUARD_CONFIG`` (JSON)."""

    profile: str | None = None
    """Sink profile folder (``sinkguard calibrate`` output) for the served model. ``sinkguard serve``
    fills it in when absent (``--profile``, else the model's own profile, calibrated once and cached);
    vLLM launched directly with the plugin needs it."""
    enabled: bool = True
    """Install the detector (False keeps the plugin inert, e.g. to measure its absence)."""
    max_finished_requests: int = Field(4096, ge=1)
    """Finished requests whose events stay available for lookup (oldest dropped first)."""
    record_store_bytes: int = Field(64 << 20, ge=4096)
    """Memory budget of the finished-request store in the engine process (oldest dropped first)."""
    record_ttl_seconds: float = Field(3600.0, gt=0)
    """A finished request's record is dropped this long after it finished."""
    max_events_per_request: int = Field(1024, ge=1)
    """Upper bound on a request's ``sinkguard_max_events``."""
    prefix_event_blocks: int = Field(1 << 18, ge=1)
    """With vLLM's prefix caching: how many KV blocks' sink events are kept (LRU) so requests that hit
    the cache get their prefix's events. Keep it above the engine's number of KV blocks; a hit on a
    block no longer kept is reported (``cached_prefix_unknown_tokens``), never guessed."""
    metrics: bool = True
    """Export ``sinkguard:`` Prometheus metrics (needs PROMETHEUS_MULTIPROC_DIR in a server)."""
    model_name: str | None = None
    """``model_name`` label of the metrics (default: the profile's model name)."""
    allow_unvalidated_detector: bool = False
    """Serve with a profile whose detector did not reach the agreement targets with attention
    (status ``below_target``) or was never checked (``unvalidated``, calibrated without attention).
    Off by default: such a detector may flag ordinary tokens, and interventions would edit them."""
    policies: str | None = None
    """Policy file (YAML or JSON, :class:`sinkguard.interventions.policy.PolicySet`): the interventions requests may
    select with ``vllm_xargs: {"sinkguard_policy": NAME}``, and the default for those that do not."""
    fail_closed: bool = False
    """On a detector fault, fail the engine step (vLLM then fails its requests) instead of serving
    it unobserved. Off by default: the server must survive its observer."""
    fault_limit: int = Field(3, ge=1)
    """Detector faults after which the detector removes itself (fail-open mode)."""
    fault_injection: FaultInjection | None = None
    """Testing only: raise inside the detector on purpose (see ``sinkguard.serving.faults``)."""
    when_detection_off: Literal["mark", "refuse"] = "mark"
    """A request whose policy has interventions while the detector is off (switched off, or removed
    after faults): ``mark`` serves it without them and says so (``x-sinkguard-applied: false``, its
    record, the A/B log); ``refuse`` answers HTTP 503, so an experiment never silently runs A/A."""
    reverify_every_steps: int = Field(1024, ge=1)
    """Re-check zero-copy activation capture against a copy every this many small steps."""
    prefill_chunk_tokens: int = Field(2048, ge=16)
    """Large steps are reduced this many tokens at a time, bounding the detector's transient memory."""
    ab: ABConfig | None = None
    """A live A/B experiment of policies: requests that select no arm are assigned one by weight."""


def load_serve_config(path: Path | str) -> ServeConfig:
    return validate_config(ServeConfig, read_json_config(path, "sinkguard serve config"))
