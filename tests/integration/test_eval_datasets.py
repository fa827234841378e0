"""Evaluation items: the shipped MMLU, user JSONL files (clear errors), seeded retrieval prompts."""

from __future__ import annotations

import json

import pytest

from sinkguard.errors import InputError
from sinkguard.evaluation.datasets import load_generation, load_multiple_choice, retrieval_items


def test_mmlu_ships_with_the_setup_and_samples_reproducibly():
    items = load_multiple_choice(limit=20, seed=3)
    assert len(items) == 20 and items == load_multiple_choice(limit=20, seed=3)
    assert all(len(i["choices"]) == 4 and 0 <= i["answer"] < 4 and i["question"] != "question" for i in items)
    assert len(load_multiple_choice()) == 14042  # 14,044 rows less two stray header rows
    assert {i["topic"] for i in load_multiple_choice(topics=["astronomy"])} == {"astronomy"}


def test_user_files_of_the_same_shape_and_their_errors(tmp_path):
    good = tmp_path / "mc.jsonl"
    good.write_text(json.dumps({"question": "2+2?", "answer_a": "3", "answer_b": "4", "answer_c": "5",
                                "answer_d": "6", "correct_answer": "b"}) + "\n\n")
    assert load_multiple_choice(good)[0]["answer"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer_a": "x", "correct_answer": "A"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: missing answer_b, answer_c, answer_d"):
        load_multiple_choice(bad)
    bad.write_text(json.dumps({"question": "q", "answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4",
                               "correct_answer": "E"}) + "\n")
    with pytest.raises(InputError, match="is not A-D or 0-3"):
        load_multiple_choice(bad)
    bad.write_text("{not json\n")
    with pytest.raises(InputError, match="bad.jsonl:1: not valid JSON"):
        load_multiple_choice(bad)
    generation = tmp_path / "gen.jsonl"
    generation.write_text(json.dumps({"prompt": "Capital of France?", "answer": "Paris"}) + "\n"
                          + json.dumps({"prompt": "p", "answer": r"\d+", "match": "regex"}) + "\n")
    assert [i["match"] for i in load_generation(generation)] == ["contains", "regex"]
    generation.write_text(json.dumps({"prompt": "p", "answer": "a", "match": "fuzzy"}) + "\n")
    with pytest.raises(InputError, match="match must be exact, contains or regex"):
        load_generation(generation)


def test_retrieval_prompts_fit_their_length_and_hide_the_answer(hf_model):
    count = lambda text: len(hf_model.tokenizer(text).input_ids)  # noqa: E731
    items = retrieval_items(count, [256, 512], per_length=2, seed=5)
    assert items == retrieval_items(count, [256, 512], per_length=2, seed=5)  # seeded
    assert len(items) == 8 and {i["kind"] for i in items} == {"passkey", "multikey"}
    for item in items:
        tokens = count(item["prompt"])
        assert 0.8 * item["length"] <= tokens <= item["length"]
        assert item["prompt"].count(item["answer"]) >= 1 and item["answer"] not in item["prompt"][-60:]
