"""Evaluation of intervention policies: tasks, arms, paired comparisons, statistics and reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sinkguard.errors import InputError

TASK_NAMES = ("perplexity", "mmlu", "retrieval", "generation")


def build_tasks(names: Sequence[str], tokenizer: Any, seed: int = 0, perplexity_prompts: int = 8,
                perplexity_tokens: int = 256, mmlu_items: int = 50, retrieval_lengths: Sequence[int] = (512, 1024),
                retrieval_per_length: int = 4, generation_file: Path | None = None,
                multiple_choice_file: Path | None = None) -> list:
    """The evaluation tasks by name, their items drawn with ``seed`` (reproducible)."""
    from sinkguard.evaluation.datasets import load_generation, load_multiple_choice, retrieval_items
    from sinkguard.evaluation.tasks import Task
    from sinkguard.sources.prompts import held_out_prompts

    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:
        raise InputError(f"unknown task(s) {', '.join(unknown)} (known: {', '.join(TASK_NAMES)})")
    encode = lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tasks = []
    for name in names:
        if name == "perplexity":
            prompts = held_out_prompts(encode, count=perplexity_prompts, tokens=perplexity_tokens)
            items = [{"id": f"ppl-{i}", "source": p.source, "token_ids": bos + list(p.token_ids)}
                     for i, p in enumerate(prompts)]
            tasks.append(Task("perplexity", "perplexity", items))
        elif name == "mmlu":
            tasks.append(Task("mmlu", "multiple_choice", load_multiple_choice(multiple_choice_file, mmlu_items, seed)))
        elif name == "retrieval":
            count = lambda text: len(encode(text))  # noqa: E731
            tasks.append(Task("retrieval", "retrieval", retrieval_items(count, list(retrieval_lengths),
                                                                          retrieval_per_length, seed), max_tokens=10))
        elif name == "generation":
            if generation_file is None:
                raise InputError("the generation task needs --generation FILE (JSONL: prompt, answer, match)")
            tasks.append(Task("generation", "generation", load_generation(generation_file), max_tokens=32))
    return tasks
