"""sinkguard: inference-time detection and control of attention sinks in served LLMs.

Python API (offline)::

    import sinkguard
    result = sinkguard.scan(prompts=["..."])          # embedded model by default
    sinkguard.write_scan(result, "runs/scan")         # report.json + figures
    profile, _ = sinkguard.calibrate(out="profile/")
    profile = sinkguard.SinkProfile.load("profile/")
"""

from sinkguard._version import __version__
from sinkguard.core.detection import SinkEvent
from sinkguard.core.profile import SinkProfile
from sinkguard.core.settings import AttentionConfig, DetectorConfig, LifetimeRule, ScanConfig
from sinkguard.errors import ConfigError, InputError, ModelLoadError, ProfileError, SinkguardError


def scan(*args, **kwargs):
    """See :func:`sinkguard.offline.scanner.scan` (imported lazily: loading torch models is slow)."""
    from sinkguard.offline.scanner import scan as _scan

    return _scan(*args, **kwargs)


def write_scan(*args, **kwargs):
    """See :func:`sinkguard.offline.figures.write_scan` (report.json and the figures)."""
    from sinkguard.offline.figures import write_scan as _write_scan

    return _write_scan(*args, **kwargs)


def calibrate(*args, **kwargs):
    """See :func:`sinkguard.offline.calibration.calibrate`."""
    from sinkguard.offline.calibration import calibrate as _calibrate

    return _calibrate(*args, **kwargs)


__all__ = [
    "AttentionConfig", "ConfigError", "DetectorConfig", "InputError", "LifetimeRule", "ModelLoadError",
    "ProfileError", "ScanConfig", "SinkEvent", "SinkProfile", "SinkguardError", "__version__", "calibrate", "scan",
    "write_scan",
]
