"""lm-eval's per-sample outputs as a paired sinkguard run, from hand-made samples (no server, no lm-eval run)."""

from __future__ import annotations

import copy
import json

import pytest

from sinkguard.errors import InputError
from sinkguard.evaluation.compare import compare
from sinkguard.evaluation.lm_eval_interop import ArmOutput, read_output_folder, to_eval_run

TYPES = {"mc": "multiple_choice", "ppl": "loglikelihood_rolling", "ll": "loglikelihood", "gen": "generate_until"}
TEXTS = ["one two three", "four five"]


def mc_sample(doc_id: int, scores: list[float], target: int) -> dict:
    best = scores.index(max(scores))
    return {"doc_id": doc_id, "doc": {"id": f"q{doc_id}"}, "target": target, "doc_hash": f"h{doc_id}",
            "arguments": [("Q?\nAnswer:", f" {c}") for c in "ABCD"], "resps": [[(s, False)] for s in scores],
            "filtered_resps": [(s, False) for s in scores], "filter": "none", "metrics": ["acc"],
            "acc": float(best == target)}


def arm(shift: float) -> ArmOutput:
    """Two documents per task; ``shift`` moves choice B's score (so the arms can disagree)."""
    mc = [mc_sample(0, [-1.0, -2.0 + shift, -3.0, -4.0], 0), mc_sample(1, [-2.0, -1.0, -3.0, -4.0], 1)]
    ppl = [{"doc_id": i, "doc": {"text": t}, "target": t, "doc_hash": f"p{i}", "arguments": [(t,)],
            "resps": [[-5.0 * (i + 1) + shift]], "filtered_resps": [-5.0 * (i + 1) + shift], "filter": "none",
            "metrics": ["word_perplexity"], "word_perplexity": (-5.0, 3)} for i, t in enumerate(TEXTS)]
    ll = [{"doc_id": 0, "doc": {}, "target": " x", "arguments": [("ctx", " x")], "resps": [[(-0.5, shift == 0)]],
           "filtered_resps": [(-0.5, shift == 0)], "filter": "none", "metrics": ["acc"], "acc": float(shift == 0)}]
    gen = [{"doc_id": 0, "doc": {}, "target": "4", "arguments": [("2+2=", {"until": ["\n"]})], "resps": [["4"]],
            "filtered_resps": ["4"], "filter": "strict", "metrics": ["exact_match"], "exact_match": 1.0},
           {"doc_id": 0, "doc": {}, "target": "4", "arguments": [("2+2=", {"until": ["\n"]})], "resps": [["4"]],
            "filtered_resps": ["x"], "filter": "loose", "metrics": ["exact_match"], "exact_match": 0.0}]
    return ArmOutput(dict(TYPES), {"mc": mc, "ppl": ppl, "ll": ll, "gen": gen}, {"mc": {"acc,none": 1.0}})


def words(text: str) -> list[int]:
    return list(range(len(text.split())))


def test_samples_become_sinkguard_measurements_and_compare():
    run = to_eval_run({"act": arm(1.5), "none": arm(0.0)}, "none", words, {"served_model": "smol"})
    assert run.arms == ["none", "act"] and run.control == "none"
    mc = run.tasks["mc"]
    assert mc["kind"] == "multiple_choice" and [i["id"] for i in mc["items"]] == ["q0", "q1"]
    assert [i["answer"] for i in mc["items"]] == [0, 1]
    assert mc["results"]["none"][0] == {"choice_logprobs": [-1.0, -2.0, -3.0, -4.0], "predicted": 0, "correct": True}
    assert mc["results"]["act"][0]["predicted"] == 1 and not mc["results"]["act"][0]["correct"]  # B now wins
    ppl = run.tasks["ppl"]
    assert ppl["kind"] == "perplexity"
    assert ppl["results"]["none"] == [{"logprob_sum": -5.0, "tokens": 3}, {"logprob_sum": -10.0, "tokens": 2}]
    assert run.tasks["ll"]["results"]["act"] == [{"logprob": -0.5, "correct": False}]
    assert run.tasks["gen"]["results"]["none"] == [{"text": "4", "score": 1.0, "correct": True}]  # first filter
    assert run.config["served_model"] == "smol" and run.config["lm_eval"]["aggregates"]["none"]["mc"]["acc,none"] == 1
    result = compare(run)
    assert set(result["tasks"]) == set(TYPES) and result["tests"] == 4
    assert result["tasks"]["mc"]["arms"]["act"]["discordant"] == {"only_arm": 0, "only_control": 1}
    assert result["tasks"]["ppl"]["arms"]["act"]["perplexity"] < result["tasks"]["ppl"]["arms"]["none"]["perplexity"]
    assert "nll_per_token_diff" in result["tasks"]["ppl"]["arms"]["act"]


def test_correctness_agrees_with_lm_evals_acc():
    run = to_eval_run({"none": arm(0.0), "act": arm(1.5)}, "none", words)
    for name in ("none", "act"):
        samples = arm(0.0 if name == "none" else 1.5).samples["mc"]
        assert [r["correct"] for r in run.tasks["mc"]["results"][name]] == [bool(s["acc"]) for s in samples]


def as_samples_file(samples: list[dict]) -> list[dict]:
    """What ``lm_eval --log_samples`` writes (EvaluationTracker.save_results_samples): every response
    and target as str(), arguments as {"gen_args_i": {"arg_j": ..}}."""
    from lm_eval.utils import sanitize_list

    out = []
    for sample in copy.deepcopy(samples):
        sample["arguments"] = {f"gen_args_{i}": {f"arg_{j}": x for j, x in enumerate(a)}
                               for i, a in enumerate(sample["arguments"])}
        for key in ("resps", "filtered_resps"):
            sample[key] = sanitize_list(sample[key])
        sample["target"] = str(sample["target"])
        out.append(json.loads(json.dumps(sample, default=str)))
    return out


def test_lm_eval_output_folders_read_back_to_the_same_run(tmp_path):
    in_memory = {"none": arm(0.0), "act": arm(1.5)}
    for name, output in in_memory.items():
        folder = tmp_path / f"smol__{name}"
        folder.mkdir()
        stamp = "2026-01-01T00-00-00.0"
        configs = {task: {"output_type": kind} for task, kind in TYPES.items()}
        (folder / f"results_{stamp}.json").write_text(json.dumps({"configs": configs, "results": output.aggregates}))
        for task, samples in output.samples.items():
            lines = [json.dumps(s) for s in as_samples_file(samples)]
            (folder / f"samples_{task}_{stamp}.jsonl").write_text("\n".join(lines) + "\n")
    from_files = {name: read_output_folder(tmp_path, f"smol:{name}") for name in in_memory}
    assert to_eval_run(from_files, "none", words).tasks == to_eval_run(in_memory, "none", words).tasks


def test_arms_that_scored_other_documents_are_refused(tmp_path):
    other = arm(0.0)
    other.samples["mc"] = other.samples["mc"][:1]
    with pytest.raises(InputError, match="other documents"):
        to_eval_run({"none": arm(0.0), "act": other}, "none", words)
    with pytest.raises(InputError, match="no lm-eval results"):
        read_output_folder(tmp_path, "smol:none")
