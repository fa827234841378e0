"""Sink statistics per arm, read back from the server's per-request sink records.

Every request of an evaluation has a response id; a sinkguard server keeps each request's record
(``GET /sinkguard/requests/{id}``, :class:`sinkguard.serving.records.RequestRecord`). Aggregated
per arm they show what an intervention did to the sinks, next to what it did to the metrics.

What the online detector records are *flags*: a token's hidden state aligned with the primary
sink's at a layer (its birth layer, then a run of ``lifetime`` layers). So "secondary sinks active
per layer" counts secondary-sink tokens whose flagged run covers the layer (born at ``b`` with
lifetime ``n``: layers ``b .. b+n-1``), per 1k scanned tokens. It is not attention mass, which the
online detector does not measure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from sinkguard.errors import SinkguardError
from sinkguard.evaluation.client import ArmClient, in_parallel

SOURCE = "GET /sinkguard/requests/{response_id}"
LABEL = ("secondary-sink tokens whose flagged run (birth layer .. birth + lifetime - 1) covers the layer, "
         "per 1k scanned tokens; the online detector records hidden-state flags, not attention mass")


def response_ids(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The response ids of a task's measurements (one per request, several for multiple choice)."""
    ids = []
    for row in rows:
        ids += [i for i in [row.get("response_id"), *row.get("response_ids", [])] if i]
    return ids


def fetch(client: ArmClient, ids: Sequence[str], concurrency: int = 8) -> tuple[list[dict[str, Any]], int, str | None]:
    """The records of ``ids`` (one GET each, ``concurrency`` in flight): ``(records, missing, first error)``.
    A record the server lost (evicted, or an error) counts as missing instead of failing the run."""

    def one(response_id: str) -> list[dict[str, Any]] | str | None:
        try:
            return client.sink_records(response_id)
        except (SinkguardError, OSError, ValueError) as exc:
            return f"{response_id}: {exc}"

    records: list[dict[str, Any]] = []
    missing, error = 0, None
    for found in in_parallel(one, ids, concurrency):
        if isinstance(found, list) and found:
            records += found
        else:
            missing += 1
            error = error or (found if isinstance(found, str) else None)
    return records, missing, error


def secondary_active_by_layer(events: Iterable[dict[str, Any]]) -> list[int]:
    """Per layer: how many secondary-sink events are active there (born at b, lifetime n: b..b+n-1)."""
    counts: list[int] = []
    for event in events:
        if event.get("kind") != "secondary" or event.get("is_reference"):
            continue
        birth, lifetime = int(event["birth_layer"]), int(event["lifetime"])
        if len(counts) < birth + lifetime:
            counts += [0] * (birth + lifetime - len(counts))
        for layer in range(birth, birth + lifetime):
            counts[layer] += 1
    return counts


def aggregate(records: Sequence[dict[str, Any]], requests: int | None = None, missing: int = 0) -> dict[str, Any]:
    """Sink statistics of a set of request records (``RequestRecord.to_dict`` with every event)."""
    tokens = sum(r["tokens_scanned"]["prefill"] + r["tokens_scanned"]["decode"] for r in records)
    counts: Counter = Counter()
    interventions: Counter = Counter()
    events = [e for r in records for e in r.get("events", [])]
    for record in records:
        counts.update(record.get("sink_counts", {}))
        interventions.update(record.get("interventions_applied", {}))
    by_layer = secondary_active_by_layer(events)
    per_1k = (lambda n: 1000.0 * n / tokens) if tokens else (lambda n: None)
    return {
        "requests": len(records) + missing if requests is None else requests,
        "records": len(records),
        "missing": missing,
        "tokens_scanned": tokens,
        "sink_counts": {k: int(counts.get(k, 0)) for k in ("reference", "primary", "secondary", "noise")},
        "secondary_per_1k_tokens": per_1k(counts.get("secondary", 0)),
        "interventions_applied": dict(sorted(interventions.items())),
        "interventions_per_1k_tokens": {k: per_1k(v) for k, v in sorted(interventions.items())},
        # events beyond a record's cap are counted in sink_counts but not listed: the by-layer
        # counts are then a lower bound (events_dropped says by how much at most)
        "events_dropped": sum(int(r.get("events_dropped", 0)) for r in records),
        # requests whose policy did not run on all their tokens (the detector was off, a step faulted):
        # in a paired comparison they carry the control's behaviour into the arm
        "not_applied": sum(r.get("applied") is False for r in records),
        "not_applied_reasons": dict(Counter(r["unapplied_reason"] for r in records if r.get("applied") is False)),
        "secondary_events_listed": sum(e.get("kind") == "secondary" and not e.get("is_reference") for e in events),
        "secondary_active_by_layer": by_layer,
        "secondary_active_per_1k_tokens_by_layer": [per_1k(n) for n in by_layer],
    }


def padded(stats_by_arm: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Copies with every arm's by-layer lists the same length (the deepest layer any arm reached)."""
    depth = max((len(s.get("secondary_active_by_layer", [])) for s in stats_by_arm.values()), default=0)
    out = {}
    for arm, stats in stats_by_arm.items():
        stats = dict(stats)
        gap = depth - len(stats.get("secondary_active_by_layer", []))
        stats["secondary_active_by_layer"] = list(stats.get("secondary_active_by_layer", [])) + [0] * gap
        zero = 0.0 if stats.get("tokens_scanned") else None
        stats["secondary_active_per_1k_tokens_by_layer"] = \
            list(stats.get("secondary_active_per_1k_tokens_by_layer", [])) + [zero] * gap
        out[arm] = stats
    return out
