"""lm-evaluation-harness per arm: run any lm-eval task against each arm of a sinkguard server and read
its per-sample outputs into an :class:`EvalRun`, so :func:`~sinkguard.evaluation.compare.compare`
pairs the arms item by item (lm-eval itself reports aggregates only, with no paired test).

An arm is just a model name (``<served>:<arm>``) for lm-eval's ``local-completions`` model, which reads
log-likelihoods as :class:`~sinkguard.evaluation.client.ArmClient` does (``echo``, ``logprobs=1``,
``max_tokens=1``, token ids sent as the prompt), so both give the same per-item numbers.

lm-eval output types map onto run kinds: ``multiple_choice`` -> ``multiple_choice`` (per-choice
log-likelihoods, the argmax, McNemar on correctness); ``loglikelihood_rolling`` -> ``perplexity``
(log-likelihood sum and token count per document); ``loglikelihood`` (correct: the continuation is
greedy) and ``generate_until`` (correct: the task's first metric is 1, e.g. ``exact_match``) keep
their names and are compared as accuracies. Tasks with several filters keep the first one.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkguard.errors import InputError
from sinkguard.evaluation.runner import EvalRun

LOCAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"  # sinkguard_mc, sinkguard_ppl
LOCAL_TASK_NAMES = ("sinkguard_mc", "sinkguard_ppl")
# Hub datasets are unreachable on offline machines; without these, datasets/hub calls wait for time-outs.
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
KINDS = {"multiple_choice": "multiple_choice", "loglikelihood_rolling": "perplexity",
         "loglikelihood": "loglikelihood", "generate_until": "generate_until"}

Tokenize = Callable[[str], list[int]]


@dataclass
class ArmOutput:
    """lm-eval's output for one arm: each task's output type and its logged samples (one per document
    and filter), in memory (``simple_evaluate``) or as read back from ``--log_samples`` files."""

    output_types: dict[str, str]
    samples: dict[str, list[dict[str, Any]]]
    aggregates: dict[str, Any]


def arm_model_name(served_model: str, arm: str) -> str:
    return f"{served_model}:{arm}"


def run_lm_eval(base_url: str, served_model: str, arm: str, tasks: Sequence[str], tokenizer: Path | str,
                include_path: Path | str | None = LOCAL_TASKS, api_key: str | None = None, num_concurrent: int = 4,
                limit: int | None = None, max_length: int = 2048) -> ArmOutput:
    """lm-eval's ``local-completions`` model on one arm (model name ``<served>:<arm>``), every sample logged.

    ``tokenizer``: the served model's local folder (lm-eval tokenizes, then sends token ids);
    ``api_key``: sent as a bearer token (lm-eval's own default is ``$OPENAI_API_KEY``)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)  # before datasets is imported: it reads them once
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args: dict[str, Any] = {
        "base_url": base_url.rstrip("/") + "/v1/completions", "model": arm_model_name(served_model, arm),
        "tokenizer": str(tokenizer), "tokenizer_backend": "huggingface", "tokenized_requests": True,
        "num_concurrent": num_concurrent, "max_length": max_length}
    if api_key:
        model_args["header"] = {"Authorization": f"Bearer {api_key}"}
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=list(tasks),
                                      task_manager=manager, log_samples=True, limit=limit, bootstrap_iters=0,
                                      verbosity="WARNING")
    return ArmOutput({task: config["output_type"] for task, config in results["configs"].items()},
                     results["samples"], _jsonable(results["results"]))


def sanitized_model_name(name: str) -> str:
    """The folder lm-eval's ``--output_path`` gives a model (``smol:act`` -> ``smol__act``)."""
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name)


def read_output_folder(output_path: Path | str, model_name: str) -> ArmOutput:
    """One model's newest results in a folder written by ``lm_eval --output_path DIR --log_samples``."""
    folder = Path(output_path) / sanitized_model_name(model_name)
    found = sorted(folder.glob("results_*.json"))
    if not found:
        raise InputError(f"no lm-eval results in {folder} (run lm_eval with --output_path and --log_samples)")
    results = json.loads(found[-1].read_text())
    date_id = found[-1].stem.removeprefix("results_")
    output_types, samples = {}, {}
    for task, config in results["configs"].items():
        path = folder / f"samples_{task}_{date_id}.jsonl"
        if not path.is_file():
            raise InputError(f"{path} is missing: run lm_eval with --log_samples")
        output_types[task] = config["output_type"]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return ArmOutput(output_types, samples, results.get("results", {}))


def to_eval_run(outputs: dict[str, ArmOutput], control: str, tokenize: Tokenize,
                config: dict[str, Any] | None = None, seconds: dict[str, float] | None = None) -> EvalRun:
    """lm-eval's outputs per arm as one paired run (``control`` first). Every arm must have scored the
    same documents of every task; ``tokenize`` counts a rolling task's predicted tokens."""
    if control not in outputs:
        raise InputError(f"control arm {control!r} is not among the arms {sorted(outputs)}")
    arms = [control, *[a for a in outputs if a != control]]
    lm_eval_config = {"aggregates": {arm: outputs[arm].aggregates for arm in arms}}
    run = EvalRun({**(config or {}), "lm_eval": lm_eval_config}, control, arms, {}, dict(seconds or {}))
    for task, output_type in outputs[control].output_types.items():
        if output_type not in KINDS:
            raise InputError(f"{task}: lm-eval output type {output_type!r} is not supported")
        per_arm = {}
        for arm in arms:
            if task not in outputs[arm].samples:
                raise InputError(f"arm {arm!r} has no samples of task {task!r}")
            per_arm[arm] = _one_filter(outputs[arm].samples[task])
        base = per_arm[control]
        for arm in arms[1:]:
            if [(s["doc_id"], s.get("doc_hash")) for s in per_arm[arm]] != [(s["doc_id"], s.get("doc_hash"))
                                                                            for s in base]:
                raise InputError(f"{task}: arm {arm!r} scored other documents than the control {control!r}")
        kind = KINDS[output_type]
        run.tasks[task] = {"kind": kind, "items": [_item(task, kind, s) for s in base],
                           "results": {arm: [measurement(kind, s, tokenize) for s in per_arm[arm]] for arm in arms}}
    return run


def evaluate_with_lm_eval(base_url: str, served_model: str, arms: Sequence[str], tasks: Sequence[str],
                          tokenizer: Path | str, tokenize: Tokenize, include_path: Path | str | None = LOCAL_TASKS,
                          api_key: str | None = None, num_concurrent: int = 4, limit: int | None = None,
                          config: dict[str, Any] | None = None) -> EvalRun:
    """Every task through lm-eval once per arm (the first arm is the control), as one paired run."""
    outputs, seconds = {}, {}
    for arm in arms:
        start = time.perf_counter()
        outputs[arm] = run_lm_eval(base_url, served_model, arm, tasks, tokenizer, include_path, api_key,
                                   num_concurrent, limit)
        seconds[arm] = round(time.perf_counter() - start, 3)
    return to_eval_run(outputs, arms[0], tokenize, config, seconds)


def measurement(kind: str, sample: dict[str, Any], tokenize: Tokenize) -> dict[str, Any]:
    """One lm-eval sample as sinkguard's per-item measurement of ``kind``."""
    responses = sample["filtered_resps"]
    if kind == "multiple_choice":
        scores = [_loglikelihood(r)[0] for r in responses]
        best = max(range(len(scores)), key=scores.__getitem__)  # the first of ties, as lm-eval's argmax
        return {"choice_logprobs": scores, "predicted": best, "correct": best in _gold(sample)}
    if kind == "perplexity":
        text = arguments(sample)[0][0]
        return {"logprob_sum": float(responses[0]), "tokens": len(tokenize(text))}
    if kind == "loglikelihood":
        logprob, greedy = _loglikelihood(responses[0])
        return {"logprob": logprob, "correct": greedy}
    metric = sample["metrics"][0]
    try:
        score = float(sample[metric])
    except (TypeError, ValueError):
        raise InputError(f"metric {metric!r} has no per-sample number to pair arms on") from None
    return {"text": str(responses[0]), "score": score, "correct": score >= 1.0}


def arguments(sample: dict[str, Any]) -> list[tuple[Any, ...]]:
    """A sample's request arguments, in memory (tuples) or from a samples file
    (``{"gen_args_0": {"arg_0": ..}}``)."""
    found = sample["arguments"]
    if isinstance(found, dict):
        requests = [found[f"gen_args_{i}"] for i in range(len(found))]
        return [tuple(r[f"arg_{j}"] for j in range(len(r))) for r in requests]
    return [tuple(a) for a in found]


def _loglikelihood(response: Any) -> tuple[float, bool]:
    """``(log-likelihood, is_greedy)``; samples files hold both as strings (``"-1.5"``, ``"False"``)."""
    logprob, greedy = response
    return float(logprob), greedy is True or greedy == "True"


def _gold(sample: dict[str, Any]) -> list[int]:
    target = sample["target"]
    if isinstance(target, str) and target.startswith("["):  # samples files write every target as str()
        target = json.loads(target)
    return [int(t) for t in target] if isinstance(target, list) else [int(target)]


def _one_filter(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first = samples[0].get("filter") if samples else None
    return sorted((s for s in samples if s.get("filter") == first), key=lambda s: int(s["doc_id"]))


def _item(task: str, kind: str, sample: dict[str, Any]) -> dict[str, Any]:
    doc = sample.get("doc") or {}
    item: dict[str, Any] = {"id": str(doc.get("id", f"{task}-{sample['doc_id']}")), "doc_id": int(sample["doc_id"]),
                            "doc_hash": sample.get("doc_hash")}
    if kind == "multiple_choice":
        gold = _gold(sample)
        item["answer"] = gold[0] if len(gold) == 1 else gold
    return item


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
