"""The top-level Python API survives every submodule being imported (no module shadows a function)."""

from __future__ import annotations

import importlib
import pkgutil

import sinkguard


def _import_every_submodule() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(sinkguard.__path__, "sinkguard.") if m.name != "sinkguard.__main__"]
    for name in names:
        importlib.import_module(name)
    return names


def test_scan_and_calibrate_twice_after_importing_every_submodule(hf_model, tmp_path):
    names = _import_every_submodule()
    assert "sinkguard.offline.scanner" in names and "sinkguard.offline.calibration" in names
    for attempt in range(2):
        result = sinkguard.scan(hf_model, prompts=["The cat sat on the mat. " * 8], progress=False)
        assert result.prompts[0].detection.reference == 0
        profile, _ = sinkguard.calibrate(hf_model, prompts=["A short calibration text about rivers. " * 8],
                                         out=tmp_path / f"p{attempt}", progress=False)
        assert isinstance(profile, sinkguard.SinkProfile)
    assert callable(sinkguard.scan) and callable(sinkguard.calibrate)
