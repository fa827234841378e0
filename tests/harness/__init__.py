"""Test and benchmark harness (not part of the package): programs run in their own process (an offline
vLLM engine, a fixed generation program, an engine start-up probe, a worker without the detector)
and the policies the served tests share. ``tests`` is on pytest's path (pyproject), so tests import
``harness.<module>``; benchmarks put ``tests`` on ``sys.path`` themselves.
"""

from pathlib import Path

HARNESS = Path(__file__).resolve().parent
TESTS = HARNESS.parent


def script(name: str) -> Path:
    """The path of a harness program run as ``python <path>`` in a subprocess."""
    return HARNESS / f"{name}.py"
