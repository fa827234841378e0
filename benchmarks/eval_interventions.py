"""The operator's answer: each shipped intervention vs none on two trained families, paired, through
a real sinkguard server (``sinkguard eval``'s code path), with confidence intervals.

Per family one server (float32) serves every policy; the same items go through every arm:
held-out perplexity, MMLU (seeded sample), RULER-style passkey / multi-key retrieval at several
context lengths. Policies: MLP projection removal (alpha 1), MLP norm clamping to the median
token's norm, ACT on the heads `sinkguard select-heads` chose for the family
(benchmarks/results/act_<model>.yaml, from benchmarks/intervention_effects.py) and ZeroTuning
(first-token scaling, gamma 0.5). Sink-targeting policies are refused by sinkguard on a profile
without forming layers (Gemma 3 270M's): the table says so instead of reporting a no-op.

    python benchmarks/eval_interventions.py                     # both families (~40 min on 2 cores)
    python benchmarks/eval_interventions.py --families SmolLM2-135M-Instruct --mmlu-items 50

Writes benchmarks/results/eval_<model>/{comparison.json,comparison.md,meta.json} (run.json and
report.html stay in the temporary folder it prints; they are large) and docs/evaluation-results.md
from every family's saved results (``--render`` rebuilds it alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = {"SmolLM2-135M-Instruct": None, "gemma-3-270m": "gemma3-270m"}
SERVED = "model"


def policies_for(label: str, forming: bool) -> dict:
    import yaml

    policies = [{"name": "zerotuning", "interventions": [{"kind": "first_token_scaling", "gamma": 0.5}]}]
    if forming:
        policies += [
            {"name": "remove", "interventions": [{"kind": "mlp_projection_removal", "alpha": 1.0}]},
            {"name": "clamp", "interventions": [{"kind": "mlp_norm_clamp", "relative_norm": 1.0}]},
        ]
        selected = Path(f"benchmarks/results/act_{label}.yaml")
        if selected.exists():
            act = yaml.safe_load(selected.read_text())["policies"][0]
            policies.append({"name": "act", "interventions": act["interventions"]})
    return {"default": "none", "policies": policies}


def run_family(label: str, spec: str | None, args: argparse.Namespace, workdir: Path) -> dict:
    from sinkguard.engines.vllm.launch import free_port, prepare_launch
    from sinkguard.engines.vllm.server import RunningServer
    from sinkguard.evaluation import build_tasks
    from sinkguard.evaluation.client import ArmClient
    from sinkguard.evaluation.outputs import save_evaluation
    from sinkguard.evaluation.runner import evaluate
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.serving.settings import ServeConfig
    from sinkguard.sources.models import resolve_model

    model = resolve_model(spec)
    profile_path, profile = profile_for_model(spec)
    forming = bool(profile.meta.forming_layers)
    folder = workdir / label
    folder.mkdir(parents=True)
    policy_file = folder / "policies.json"
    policies = policies_for(label, forming)
    policy_file.write_text(json.dumps(policies, indent=1))
    arms = ["none", *[p["name"] for p in policies["policies"]]]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    tasks = build_tasks(["perplexity", "mmlu", "retrieval"], tokenizer, seed=args.seed,
                        perplexity_prompts=args.perplexity_prompts, perplexity_tokens=args.perplexity_tokens,
                        mmlu_items=args.mmlu_items, retrieval_lengths=args.retrieval_lengths,
                        retrieval_per_length=args.retrieval_items)
    max_len = max(args.retrieval_lengths) + 512
    launch = prepare_launch(model.path, ServeConfig(profile=str(profile_path), policies=str(policy_file)), SERVED,
                            port=free_port(), extra_args=["--max-model-len", str(max_len), "--dtype", "float32",
                                                          "--seed", "0"], workdir=folder)
    launch.env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    print(f"{label}: arms {arms}; starting vLLM at {launch.base_url} (log {folder / 'server.log'})", flush=True)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    start = time.perf_counter()
    with RunningServer(launch) as server:
        server.wait_ready(timeout=900)
        clients = {arm: ArmClient(server.base_url, SERVED, arm) for arm in arms}
        config = {"model": label, "arms": arms, "seed": args.seed, "dtype": "float32", "policies": policies,
                  "forming_layers": [f.layer for f in profile.meta.forming_layers]}
        run = evaluate(clients, tasks, encode, "none", args.concurrency, config, progress=sys.stdout.isatty())
    comparison, paths = save_evaluation(run, folder, args.seed)
    kept = Path(f"benchmarks/results/eval_{label}")
    kept.mkdir(parents=True, exist_ok=True)
    for kind in ("comparison", "markdown"):
        shutil.copy(paths[kind], kept / paths[kind].name)
    meta = {"model": label, "command": args.command, "forming": forming, "arms": arms,
            "seconds": round(time.perf_counter() - start, 1), "perplexity_tokens": args.perplexity_tokens,
            "retrieval_per_length": 2 * args.retrieval_items, "seed": args.seed}
    (kept / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"{label}: done in {meta['seconds']:.0f} s; report {paths['report']}", flush=True)
    return meta


def _interval(entry: dict | None, digits: int = 3) -> str:
    if not entry:
        return "-"
    return f"{entry['estimate']:+.{digits}f} [{entry['low']:+.{digits}f}, {entry['high']:+.{digits}f}]"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def family_markdown(meta: dict, comparison: dict) -> str:
    c = comparison["tasks"]
    ppl, mmlu, ret = c["perplexity"]["arms"], c["mmlu"]["arms"], c["retrieval"]["arms"]
    lengths = list(ret[comparison["control"]]["accuracy_by_length_interval"])
    head = ("| arm | perplexity | Δ NLL/token [95% CI] | p (Holm) | MMLU acc [Wilson 95%] | Δ acc [95% CI] | "
            "p (Holm) | " + " | ".join(f"retrieval @{n} (found)" for n in lengths) + " | retrieval Δ acc | p (Holm) |")
    lines = [head, "|" + "---|" * (9 + len(lengths))]
    for arm in comparison["arms"]:
        p, m, r = ppl[arm], mmlu[arm], ret[arm]
        wilson = m["accuracy_interval"]
        by_length = r["accuracy_by_length_interval"]
        cells = [f"{by_length[n]['successes']}/{by_length[n]['trials']}" for n in lengths]
        lines.append(f"| {arm} | {p['perplexity']:.3f} | {_interval(p.get('nll_per_token_diff'), 4)} | "
                     f"{_p(p.get('pvalue_holm'))} | {m['accuracy']:.3f} [{wilson['low']:.3f}, {wilson['high']:.3f}] | "
                     f"{_interval(m.get('accuracy_diff_interval'))} | {_p(m.get('pvalue_holm'))} | "
                     + " | ".join(cells) + f" | {_interval(r.get('accuracy_diff_interval'))} | "
                     f"{_p(r.get('pvalue_holm'))} |")
    items = {name: task["items"] for name, task in c.items()}
    intro = [f"## {meta['model']}", "",
             f"`{meta['command']}`: {items['perplexity']} held-out texts x {meta['perplexity_tokens']} tokens, "
             f"{items['mmlu']} MMLU items (seed {meta['seed']}), {items['retrieval']} retrieval items "
             f"({meta['retrieval_per_length']} per length, half passkey, half multi-key); {meta['seconds']:.0f} s.", ""]
    if not meta["forming"]:
        intro += ["The profile of this model has no forming layers (no secondary sinks the detector trusts), so "
                  "sinkguard refuses the sink-targeting policies (removal, clamping, ACT) for it: only ZeroTuning "
                  "(which targets the primary sink) is measured.", ""]
    return "\n".join(intro + lines)


def render() -> str:
    """docs/evaluation-results.md from every family's saved comparison (families may be run separately)."""
    out = ["# Interventions vs none: perplexity, MMLU, retrieval (measured)", "",
           "`benchmarks/eval_interventions.py`: one sinkguard server per family (float32, vllm-cpu 0.32, 2 CPU "
           "cores) serving every policy; every arm on the same items (paired); statistics from the saved run "
           "(`sinkguard/evaluation/compare.py`): perplexity effect = mean per-item NLL/token difference vs `none` "
           "with a paired BCa bootstrap 95% interval and a permutation p; accuracy with Wilson intervals, the paired "
           "difference with a bootstrap interval and an exact McNemar p; Holm across all arms and metrics of a "
           "family. Retrieval: passkey / multi-key answers found, by context length in tokens. Policies: `remove` "
           "(MLP projection removal, alpha 1), `clamp` (MLP norm clamped to the median token's), `act` (ACT on the "
           "heads `sinkguard select-heads` chose, benchmarks/results/act_<model>.yaml), `zerotuning` (first-token "
           "scaling, gamma 0.5). Reported as measured. Sizes fit a 2-core CPU, so the exact tests cannot reach small "
           "p-values (8 paired texts: a two-sided permutation p is at least 1/128 before Holm's correction across "
           "the family's tests); read the intervals first.", ""]
    for label in FAMILIES:
        folder = Path(f"benchmarks/results/eval_{label}")
        if (folder / "meta.json").exists() and (folder / "comparison.json").exists():
            out += [family_markdown(json.loads((folder / "meta.json").read_text()),
                                    json.loads((folder / "comparison.json").read_text())), ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--perplexity-prompts", type=int, default=16)
    parser.add_argument("--perplexity-tokens", type=int, default=256)
    parser.add_argument("--mmlu-items", type=int, default=100)
    # 4096 is in reach (both models' contexts) but ZeroTuning edits every head of every layer, recomputed in
    # torch from the paged KV cache: at 4k tokens on 2 CPU cores its prefill falls to ~200 tokens/s
    parser.add_argument("--retrieval-lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[512, 1024, 2048])
    parser.add_argument("--retrieval-items", type=int, default=4, help="per length and kind (passkey, multi-key)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kv-cache-gib", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", action="store_true", help="only rebuild docs/evaluation-results.md")
    args = parser.parse_args()
    python = os.path.relpath(sys.executable) if Path(sys.executable).absolute().is_relative_to(Path.cwd()) else "python"
    args.command = (f"{python} benchmarks/eval_interventions.py " + shlex.join(sys.argv[1:])).strip()
    if not args.render:
        workdir = Path(tempfile.mkdtemp(prefix="sinkguard-eval-interventions-"))
        print(f"working folder {workdir}", flush=True)
        for label in args.families:
            run_family(label, FAMILIES[label], args, workdir)
    text = render()
    Path("docs/evaluation-results.md").write_text(text + "\n")
    print(text)

if __name__ == "__main__":
    main()
