"""What happens when the detector itself fails inside a serving engine.

Detector code runs inside the engine's forward pass; an exception escaping it would fail the
batch and, in vLLM, the engine core's busy loop: every request on the server. So by default
sinkguard *fails open*: the faulted step is served unobserved, the fault is counted and logged
once per cause (with its traceback), and after ``fault_limit`` faulted steps the detector removes
itself (the server keeps serving, without detection, and says so in ``/sinkguard/status``).
``fail_closed`` re-raises instead, for deployments where serving unobserved is worse than failing.

:class:`FaultInjector` raises on purpose at a chosen stage (``ServeConfig.fault_injection``): the
chaos test of the path above, in a real server.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from sinkguard.serving.settings import FaultInjection

logger = logging.getLogger("sinkguard")


class InjectedFault(RuntimeError):
    """Raised by :class:`FaultInjector` (never by real detector code)."""


class FaultGuard:
    """Counts detector faults and decides what each one means for the engine."""

    def __init__(self, fault_limit: int, fail_closed: bool = False,
                 on_fault: Callable[[str, BaseException], None] | None = None) -> None:
        self.fault_limit = fault_limit
        self.fail_closed = fail_closed
        self.on_fault = on_fault
        self.faults: Counter[str] = Counter()  # by stage
        self.first_fault: str | None = None  # "stage: ExceptionType: message" of the first fault
        self._logged: set[tuple[str, str]] = set()
        self._armed_at = 0  # total faults when the detector was last (re)installed

    @property
    def total(self) -> int:
        return sum(self.faults.values())

    @property
    def exhausted(self) -> bool:
        """The detector should remove itself: ``fault_limit`` faults since it was last installed."""
        return self.total - self._armed_at >= self.fault_limit

    def rearm(self) -> None:
        """A fresh budget of faults (an operator reinstalled the detector); counts are kept."""
        self._armed_at = self.total

    def record(self, stage: str, exc: BaseException) -> None:
        """Count one fault; re-raises it when failing closed."""
        self.faults[stage] += 1
        cause = f"{stage}: {type(exc).__name__}: {exc}"
        if self.first_fault is None:
            self.first_fault = cause
        if (stage, type(exc).__name__) not in self._logged:  # once per cause: a fault may repeat every step
            self._logged.add((stage, type(exc).__name__))
            logger.error("sinkguard: detector fault in %s (step served %s)", stage,
                         "failed: fail_closed is set" if self.fail_closed else "unobserved", exc_info=exc)
        if self.on_fault is not None:
            self.on_fault(stage, exc)
        if self.fail_closed:
            raise exc


class FaultInjector:
    """Raises :class:`InjectedFault` at ``injection.stage`` on every ``injection.every_steps``-th step."""

    def __init__(self, injection: FaultInjection | None) -> None:
        self.injection = injection
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def maybe_raise(self, stage: str) -> None:
        injection = self.injection
        if injection is not None and stage == injection.stage and self.steps % injection.every_steps == 0:
            raise InjectedFault(f"injected fault at {stage}, step {self.steps}")
