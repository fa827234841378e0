"""Evaluation tasks: each turns items into per-item measurements for one arm, through an arm client.

Per-item numbers are what the paired comparison needs (the same item under every arm); the
aggregates (perplexity, accuracy) are computed from them, never stored instead of them.

- ``perplexity``: every predicted token's log-probability of a text (teacher forcing);
- ``multiple_choice``: the log-probability of each choice's letter (`` A`` .. `` D``) as the
  continuation of the question with its lettered choices, as lm-evaluation-harness's ``mmlu`` task
  scores it (``acc``: the highest wins; context and continuation encoded separately);
- ``retrieval`` and ``generation``: greedy generation, scored by exact match / containment / regex;
- every generation also yields its tokens' log-probabilities and top-k alternatives (for agreement
  with the control arm), its time to first token and time per output token;
- every measurement keeps its requests' response ids (``response_id`` / ``response_ids``), by which
  the server's sink records are read back (:mod:`sinkguard.evaluation.sink_stats`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sinkguard.evaluation.client import ArmClient

Tokenize = Callable[[str], list[int]]


@dataclass
class Task:
    name: str
    kind: str  # perplexity | multiple_choice | retrieval | generation
    items: list[dict[str, Any]]
    max_tokens: int = 16


def measure(task: Task, item: dict[str, Any], client: ArmClient, tokenize: Tokenize, top_logprobs: int = 5
            ) -> dict[str, Any]:
    """One item under one arm: the per-item measurements of ``task``."""
    if task.kind == "perplexity":
        tokens = item["token_ids"]
        scored = client.prompt_logprobs(tokens)
        logprobs = [x for x in scored.logprobs[1:] if x is not None]
        return {"logprob_sum": sum(logprobs), "tokens": len(logprobs), "response_id": scored.response_id}
    if task.kind == "multiple_choice":
        context = tokenize(multiple_choice_prompt(item))
        scores, response_ids = [], []
        for letter in "ABCD"[: len(item["choices"])]:
            continuation = tokenize(" " + letter)
            scored = client.prompt_logprobs(context + continuation)
            scores.append(sum(x for x in scored.logprobs[len(context):] if x is not None))
            response_ids.append(scored.response_id)
        best = max(range(len(scores)), key=scores.__getitem__)
        return {"choice_logprobs": scores, "predicted": best, "correct": best == item["answer"],
                "response_ids": response_ids}
    generation = client.generate(item["prompt"], task.max_tokens, top_logprobs=top_logprobs)
    correct = is_match(generation.text, item["answer"], item.get("match", "contains"))
    return {"text": generation.text, "correct": correct,
            "token_logprobs": generation.token_logprobs, "top_logprobs": generation.top_logprobs,
            "ttft_s": generation.ttft_s, "tpot_s": generation.tpot_s, "output_tokens": generation.output_tokens,
            "response_id": generation.response_id}


def multiple_choice_prompt(item: dict[str, Any]) -> str:
    """The MMLU prompt lm-evaluation-harness uses (zero-shot): question, lettered choices, ``Answer:``."""
    letters = "ABCD"
    lines = [item["question"].strip(), *(f"{letters[i]}. {c}" for i, c in enumerate(item["choices"])), "Answer:"]
    return "\n".join(lines)


def is_match(text: str, answer: str, match: str) -> bool:
    if match == "exact":
        return text.strip() == answer.strip()
    if match == "regex":
        return re.search(answer, text) is not None
    return answer.strip() in text


def perplexity(measurements: list[dict[str, Any]]) -> float:
    total = sum(m["logprob_sum"] for m in measurements)
    count = sum(m["tokens"] for m in measurements)
    return math.exp(-total / count) if count else float("nan")


def accuracy(measurements: list[dict[str, Any]]) -> float:
    return sum(bool(m["correct"]) for m in measurements) / len(measurements) if measurements else float("nan")
