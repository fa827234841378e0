"""Run the same items through several arms of one server, many requests in flight, and save it all.

A run is a JSON document: the configuration (server, model, arms, tasks, seeds), and per task, per
arm, per item the measurements (:mod:`sinkguard.evaluation.tasks`). Comparisons and reports are
computed from a saved run alone (:mod:`sinkguard.evaluation.compare`), so every number can be
reproduced without the server. With a sinkguard server, the run also keeps sink statistics per arm
and task, aggregated from the server's records of its requests (:mod:`sinkguard.evaluation.sink_stats`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sinkguard.evaluation import sink_stats as sinks
from sinkguard.evaluation.client import ArmClient, in_parallel
from sinkguard.evaluation.tasks import Task, Tokenize, measure

RUN_SCHEMA = "sinkguard.eval"
RUN_SCHEMA_VERSION = 1


@dataclass
class EvalRun:
    config: dict[str, Any]
    control: str
    arms: list[str]
    tasks: dict[str, dict[str, Any]]  # name -> {"kind", "items": [...], "results": {arm: [measurement per item]}}
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per arm (record reads excluded)
    # None: not collected (turned off, or a run from before); else {"available", "source", "label", and
    # "reason" or "arms": {arm: {"all": stats, "tasks": {task: stats}}}} (sink_stats.aggregate)
    sink_stats: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema": RUN_SCHEMA, "schema_version": RUN_SCHEMA_VERSION, "config": self.config,
                "control": self.control, "arms": self.arms, "tasks": self.tasks, "seconds": self.seconds,
                "sink_stats": self.sink_stats}

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: Path | str) -> EvalRun:
        data = json.loads(Path(path).read_text())
        if data.get("schema") != RUN_SCHEMA:
            raise ValueError(f"{path} is not a sinkguard evaluation run")
        return cls(data["config"], data["control"], data["arms"], data["tasks"], data.get("seconds", {}),
                   data.get("sink_stats"))


def evaluate(clients: dict[str, ArmClient], tasks: list[Task], tokenize: Tokenize, control: str,
             concurrency: int = 8, config: dict[str, Any] | None = None, progress: bool = True,
             sink_stats: bool = True) -> EvalRun:
    """Every task's items through every arm (``clients``: arm -> client), ``concurrency`` requests in
    flight per arm; ``control`` is the arm the others are compared with. ``sink_stats``: read every
    request's sink record back after each task (one GET per request; skipped, with the reason kept,
    when the server has no sinkguard routes)."""
    if control not in clients:
        raise ValueError(f"control arm {control!r} is not among the arms {sorted(clients)}")
    arms = [control, *[a for a in clients if a != control]]
    run = EvalRun(config or {}, control, arms, {})
    for task in tasks:
        run.tasks[task.name] = {"kind": task.kind, "items": [_public(item) for item in task.items], "results": {}}
    collect = sink_stats and _sink_stats_available(run, clients[control])
    for arm in arms:
        elapsed = 0.0
        records: list[dict[str, Any]] = []
        missing = 0
        for task in tasks:
            label = f"{task.name} · arm {arm} ({len(task.items)} items)" if progress else None
            start = time.perf_counter()
            rows = in_parallel(lambda item, task=task: measure(task, item, clients[arm], tokenize), task.items,
                               concurrency, label)
            elapsed += time.perf_counter() - start
            run.tasks[task.name]["results"][arm] = rows
            if collect:  # right after the task, before the server's bounded store evicts its records
                found, lost, error = sinks.fetch(clients[arm], sinks.response_ids(rows), concurrency)
                entry = run.sink_stats["arms"].setdefault(arm, {"tasks": {}})
                entry["tasks"][task.name] = sinks.aggregate(found, missing=lost)
                if error:
                    entry.setdefault("errors", []).append(error)
                records += found
                missing += lost
        if collect:
            run.sink_stats["arms"][arm]["all"] = sinks.aggregate(records, missing=missing)
        run.seconds[arm] = round(elapsed, 3)
    return run


def _sink_stats_available(run: EvalRun, client: ArmClient) -> bool:
    run.sink_stats = {"available": False, "source": sinks.SOURCE, "label": sinks.LABEL}
    if not client.has_sink_records():
        run.sink_stats["reason"] = "the server has no sinkguard routes (404 on /sinkguard/status)"
        return False
    run.sink_stats.update(available=True, arms={})
    return True


def _public(item: dict[str, Any]) -> dict[str, Any]:
    """What a run keeps of an item: everything but long texts and token lists (ids stay)."""
    return {k: v for k, v in item.items() if k not in ("prompt", "token_ids", "text")}
