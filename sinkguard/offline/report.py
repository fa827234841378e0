"""The scan report model: one scanned prompt, one scan result, and the versioned ``report.json``.

Produced by :mod:`sinkguard.offline.scanner`; read by :mod:`sinkguard.offline.figures`,
:mod:`sinkguard.cli.terminal` and :mod:`sinkguard.offline.calibration`. Figures are drawn from this
model by their callers; the model knows nothing of plotting.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sinkguard._version import __version__
from sinkguard.core.aggregate import ModelSummary, PromptResult
from sinkguard.core.confirmation import Agreement, ConfirmedSinks
from sinkguard.core.detection import Detection
from sinkguard.core.fingerprint import ModelInfo
from sinkguard.core.settings import ScanConfig
from sinkguard.core.trace import SequenceTrace

REPORT_SCHEMA = "sinkguard.scan"
REPORT_SCHEMA_VERSION = 2  # 2: model.fingerprint covers a projection sample; model.fingerprints, weights_dtype


@dataclass
class PromptScan:
    """One scanned prompt: its tokens, trace and detection."""

    index: int
    source: str
    token_ids: list[int]
    tokens: list[str]
    trace: SequenceTrace
    detection: Detection
    confirmed: ConfirmedSinks | None = None  # attention-confirmed sinks (needs attention scores)
    agreement: Agreement | None = None  # how the detection agrees with them

    @property
    def as_result(self) -> PromptResult:
        return PromptResult(self.detection, self.tokens, self.trace.sink_scores, self.trace.head_scores)

    def to_dict(self) -> dict[str, Any]:
        events = [_clean(e.to_dict()) for e in self.detection.events]
        counts = {k: sum(1 for e in self.detection.events if e.kind == k and not e.is_reference)
                  for k in ("primary", "secondary", "noise")}
        return {
            "index": self.index,
            "source": self.source,
            "num_tokens": len(self.token_ids),
            "reference_position": self.detection.reference,
            "window_layers": self.detection.window_layers,
            "reference_norm_ratio": [round(float(x), 3) for x in self.detection.norm_ratio],
            "sink_counts": counts,
            "sinks": events,
            **({} if self.confirmed is None else {
                "attention_confirmed": {"strong": self.confirmed.strong.tolist(), "weak": self.confirmed.weak.tolist(),
                                        "judged_positions": [1, self.confirmed.judged_until - 1]},
                "agreement": self.agreement.to_dict() if self.agreement is not None else None,
            }),
        }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, floats rounded."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class ScanResult:
    """Everything one scan produced; ``to_report()`` is the versioned JSON document."""

    model: ModelInfo
    model_path: str
    config: ScanConfig
    prompts: list[PromptScan]
    summary: ModelSummary
    reference_mode: str

    @property
    def agreement(self) -> Agreement | None:
        """Agreement of hidden-state flags with attention-confirmed sinks over all prompts (None
        without attention scores)."""
        parts = [p.agreement for p in self.prompts]
        return None if any(a is None for a in parts) else Agreement.total(parts)  # type: ignore[arg-type]

    def to_report(self) -> dict[str, Any]:
        primary_min, noise_max = self.config.detector.lifetime.thresholds(self.model.num_layers)
        return _clean({
            "schema": REPORT_SCHEMA,
            "schema_version": REPORT_SCHEMA_VERSION,
            "sinkguard_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {**self.model.to_dict(), "path": self.model_path},
            "config": self.config.model_dump(),
            "reference_mode": self.reference_mode,
            "lifetime_thresholds": {"primary_min_lifetime": primary_min, "noise_max_lifetime": noise_max},
            "summary": self.summary.to_dict(),
            "agreement": self.agreement.to_dict() if self.agreement is not None else None,
            "prompts": [p.to_dict() for p in self.prompts],
        })

    def save(self, out_dir: Path | str) -> list[Path]:
        """Write ``report.json`` into ``out_dir``; return the written paths. Figures are drawn by
        their callers (:func:`sinkguard.offline.figures.write_scan`): the model does not render itself."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report_path = out / "report.json"
        report_path.write_text(json.dumps(self.to_report(), indent=1, ensure_ascii=False))
        return [report_path]
