"""Run the same items through several arms of one server, many requests in flight, and save it all.

A run is a JSON document: the configuration (server, model, arms, tasks, seeds), and per task, per
arm, per item the measurements (:mod:`sinkguard.evaluation.tasks`). Comparisons and reports are
computed from a saved run alone (:mod:`sinkguard.evaluation.compare`), so every number can be
reproduced without the server.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per arm

    def to_dict(self) -> dict[str, Any]:
        return {"schema": RUN_SCHEMA, "schema_version": RUN_SCHEMA_VERSION, "config": self.config,
                "control": self.control, "arms": self.arms, "tasks": self.tasks, "seconds": self.seconds}

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
        return cls(data["config"], data["control"], data["arms"], data["tasks"], data.get("seconds", {}))


def evaluate(clients: dict[str, ArmClient], tasks: list[Task], tokenize: Tokenize, control: str,
             concurrency: int = 8, config: dict[str, Any] | None = None, progress: bool = True) -> EvalRun:
    """Every task's items through every arm (``clients``: arm -> client), ``concurrency`` requests in
    flight per arm; ``control`` is the arm the others are compared with."""
    if control not in clients:
        raise ValueError(f"control arm {control!r} is not among the arms {sorted(clients)}")
    arms = [control, *[a for a in clients if a != control]]
    run = EvalRun(config or {}, control, arms, {})
    for task in tasks:
        run.tasks[task.name] = {"kind": task.kind, "items": [_public(item) for item in task.items], "results": {}}
    for arm in arms:
        start = time.perf_counter()
        for task in tasks:
            label = f"{task.name} · arm {arm} ({len(task.items)} items)" if progress else None
            run.tasks[task.name]["results"][arm] = in_parallel(
                lambda item, task=task: measure(task, item, clients[arm], tokenize), task.items, concurrency, label)
        run.seconds[arm] = round(time.perf_counter() - start, 3)
    return run


def _public(item: dict[str, Any]) -> dict[str, Any]:
    """What a run keeps of an item: everything but long texts and token lists (ids stay)."""
    return {k: v for k, v in item.items() if k not in ("prompt", "token_ids", "text")}
