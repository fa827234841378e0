"""The serving settings, loaded one way in every process: the plugin at boot, the API server's routes
and middleware, and the workers that install the detector.

``$SINKGUARD_CONFIG`` names a :class:`~sinkguard.serving.settings.ServeConfig` JSON file; without it
(or with ``enabled: false``) sinkguard is inert. Loading checks everything that can be checked
without a model: the config's fields, its policy file, and its A/B experiment (arms are policies,
the log can be written), so a bad setting fails start-up naming it. What needs the profile (its
detector's trust, the policies' scope) is checked here too, from the loaded profile.

Engine-independent: no import of an engine adapter.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from sinkguard.errors import ConfigError
from sinkguard.interventions.policy import NO_POLICY, ModelScope, PolicySet, load_policies
from sinkguard.serving.settings import ABConfig, ServeConfig, load_serve_config

if TYPE_CHECKING:
    from sinkguard.core.profile import SinkProfile

CONFIG_ENV = "SINKGUARD_CONFIG"
TRUSTED_STATUSES = ("validated", "no_secondary_sinks")


def enabled_config() -> ServeConfig | None:
    """The plugin's config, or None when inert; a bad config or policy file fails here, naming the field."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return None
    config = load_serve_config(path)
    if not config.enabled:
        return None
    if config.profile is None:
        raise ConfigError(f"{CONFIG_ENV} ({path}): profile: required when vLLM is launched with the plugin "
                          "directly (`sinkguard serve` fills it in from --profile or the model's own profile)")
    policies = serve_policies(config)
    if config.ab is not None:
        check_ab(config.ab, [NO_POLICY, *policies.names])
    return config


def check_ab(ab: ABConfig, policies: list[str]) -> None:
    """Start-up checks of the A/B experiment: its arms are policies, its log can be written."""
    ab.check_policies(policies)
    if ab.log is not None:
        folder = Path(ab.log).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"ab.log: cannot create the folder of {ab.log}: {exc}") from None
        if not os.access(folder, os.W_OK) or (Path(ab.log).exists() and not os.access(ab.log, os.W_OK)):
            raise ConfigError(f"ab.log: {ab.log} is not writable")


def serve_policies(config: ServeConfig | None) -> PolicySet:
    """The deployment's policy set (only ``none`` without a policy file)."""
    return PolicySet() if config is None or config.policies is None else _policy_file(config.policies)


@functools.lru_cache(maxsize=4)
def _policy_file(path: str) -> PolicySet:
    """Read and check a policy file once per process (start-up validation and the runtime share it)."""
    try:
        return load_policies(path)
    except ConfigError as exc:
        raise ConfigError(f"policies ({path}): {exc}") from None


def check_profile_trust(profile: SinkProfile, config: ServeConfig) -> None:
    """Refuse a profile whose detector was not shown to agree with attention, unless allowed."""
    status = profile.validation_status
    if status in TRUSTED_STATUSES or config.allow_unvalidated_detector:
        return
    message = profile.meta.validation.get("message", "")
    raise ConfigError(
        f"sink profile {config.profile} has detector status '{status}' ({message}). Its flags may be ordinary tokens: "
        "recalibrate with attention on and more prompts (`sinkguard calibrate`), or set allow_unvalidated_detector: "
        "true in the sinkguard serve config to serve it anyway."
    )


class ServedPolicies(NamedTuple):
    """What the API server resolves requests against: the policy set and its model's scope (None:
    no sinkguard config, so requests run no policy)."""

    policies: PolicySet
    scope: ModelScope | None

    @property
    def arms(self) -> list[str]:
        """The arms a request may select (``none`` and every policy); none without a sinkguard config."""
        return [NO_POLICY, *self.policies.names] if self.scope is not None else []


_POLICIES: list[ServedPolicies] = []


def served_policies() -> ServedPolicies:
    """The server's policy set and its model's scope, read once (the same file and code the workers use)."""
    if not _POLICIES:
        from sinkguard.core.profile import SinkProfile

        config = enabled_config()
        scope = ModelScope.from_profile(SinkProfile.load(config.profile)) if config is not None else None
        _POLICIES.append(ServedPolicies(serve_policies(config), scope))
    return _POLICIES[0]
