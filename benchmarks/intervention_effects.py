"""What each intervention does to secondary sinks and to perplexity, per model family.

    python benchmarks/intervention_effects.py --out docs/intervention-effects.md

For each family (the embedded SmolLM2-135M-Instruct and Gemma 3 270M): the cached profile
(calibrated on the built-in text); attention-redistribution heads selected on ``--calibration``
built-in prompts (``sinkguard.offline.selection``: greedy on teacher-forced log-likelihood); then, on
``--held-out`` prompts from documents neither calibration nor selection read, for every
intervention setting: the attention mass on the baseline's secondary sinks by layer without and
with it, how many of those sinks the detector still flags, and perplexity without and with it.
Writes a Markdown table and ``benchmarks/results/intervention_effects.json`` (float32, CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FAMILIES = {"SmolLM2-135M-Instruct": None, "gemma-3-270m": "gemma3-270m"}


def settings(selected_act, forming: bool) -> list:
    """The settings measured; sink-targeting ones only where the profile saw secondary sinks form
    (elsewhere sinkguard refuses them: they would never act)."""
    from sinkguard.interventions.policy import Policy
    from sinkguard.interventions.specs import FirstTokenScaling, MlpNormClamp, MlpProjectionRemoval

    policies = [Policy(name="zerotuning_g0.5", interventions=[FirstTokenScaling(gamma=0.5)])]
    if not forming:
        return policies
    policies += [
        Policy(name="remove_a1", interventions=[MlpProjectionRemoval(alpha=1.0)]),
        Policy(name="remove_a0.5", interventions=[MlpProjectionRemoval(alpha=0.5)]),
        Policy(name="clamp_median", interventions=[MlpNormClamp(relative_norm=1.0)]),
    ]
    if selected_act.interventions:
        policies.append(selected_act)
        half = [spec.model_copy(update={"beta": 0.5}) for spec in selected_act.interventions]
        policies.append(Policy(name="act_selected_b0.5", interventions=half))
    from sinkguard.interventions.specs import AttentionRedistribution

    policies.append(Policy(name="act_all_heads_b0", interventions=[AttentionRedistribution(beta=0.0)]))
    return policies


def run_family(label: str, spec: str | None, calibration: int, held_out: int, tokens: int) -> dict:
    from sinkguard.core.settings import ScanConfig
    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.interventions.specs import AttentionRedistribution
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.offline.effects import policy_effect
    from sinkguard.offline.scanner import prompt_token_ids, scan
    from sinkguard.offline.selection import select_heads
    from sinkguard.sources.prompts import default_prompts, held_out_prompts

    model = HFSinkModel.load(spec)
    _, profile = profile_for_model(spec)
    tokenize = lambda text: model.tokenize(text, add_bos=False)  # noqa: E731
    config = ScanConfig()
    calib = [prompt_token_ids(model, p, config) for p in default_prompts(tokenize, count=calibration, tokens=tokens)]
    test = held_out_prompts(tokenize, count=held_out, tokens=tokens)
    test_ids = [prompt_token_ids(model, p, config) for p in test]
    forming = bool(profile.meta.forming_layers)
    start = time.perf_counter()
    selection = select_heads(model, profile, calib, AttentionRedistribution(beta=0.0), progress=False) \
        if forming else None
    selection_seconds = time.perf_counter() - start
    act = selection.policy("act_selected_b0") if selection else None
    if act is not None and act.interventions:
        import yaml

        policy_file = Path(f"benchmarks/results/act_{label}.yaml")
        policy_file.write_text(yaml.safe_dump({"policies": [{"name": "act", "interventions": [
            spec.model_dump(exclude={"phases"}) for spec in act.interventions]}]}, sort_keys=False))
    before = scan(model, test, config, profile=profile, progress=False)
    rows = []
    for policy in settings(act, forming):
        after = scan(model, test, config, profile=profile, progress=False, policy=policy)
        effect = policy_effect(before, after, policy, model, profile, held_out=test_ids)
        rows.append(effect.to_dict())
        print(f"{label} {policy.name}: mass {effect.mass_change}, flagged {effect.still_flagged}/"
              f"{effect.secondary_sinks}, ppl {effect.perplexity_before} -> {effect.perplexity_after}", flush=True)
    return {"model": label, "layers": profile.model.num_layers, "heads": profile.model.num_heads,
            "forming_layers": [f.layer for f in profile.meta.forming_layers],
            "selection": None if selection is None else {**selection.to_dict(), "seconds": round(selection_seconds, 1),
                                                         "tried": len(selection.candidates)},
            "effects": rows}


def markdown(results: list[dict], command: str) -> str:
    lines = ["# Intervention effects per model family", "",
             f"Produced by `{command}` (float32, CPU, transformers engine; the vLLM engine computes the same edits, "
             "tested to 1e-3 in log-probability). Held-out prompts come from documents that neither calibration "
             "nor head selection read. *Mass* is the mean attention the baseline's secondary sinks receive "
             "(averaged over heads and the layers where they are scored), with the policy relative to without; "
             "*still flagged* counts those sinks the detector flags again with the policy applied. Interventions "
             "may hurt quality: perplexity is reported as measured.", ""]
    for result in results:
        sel = result["selection"]
        lines += [f"## {result['model']} ({result['layers']} layers, {result['heads']} heads, forming layers "
                  f"{result['forming_layers']})", ""]
        if sel is None:
            lines += ["Its profile found no secondary sinks forming on the calibration text, so the interventions "
                      "that act on secondary sinks (MLP edits, ACT) are refused for this model (they would never "
                      "act); only first-token scaling is measured.", ""]
        else:
            kept = ", ".join(f"L{c['layer']}H{c['head']}" for c in sel["kept"]) or "nothing"
            lines += [f"Head selection for attention_redistribution (beta 0): tried {sel['tried']} (layer, head) "
                      f"pairs in {sel['seconds']} s; objective {sel['objective']}: {sel['baseline']:.4f} -> "
                      f"{sel['selected']:.4f} on calibration prompts; kept {len(sel['kept'])}: {kept}.", ""]
        lines += ["| policy | secondary sinks | their mass | still flagged | primary-sink mass | perplexity without "
                  "| perplexity with |", "|---|---|---|---|---|---|---|"]
        for row in result["effects"]:
            change = "-" if row["mass_change"] is None else f"{row['mass_change']:+.1%}"
            primary = "-" if row["primary_mass_change"] is None else f"{row['primary_mass_change']:+.1%}"
            lines.append(f"| {row['policy']} | {row['secondary_sinks']} | {change} | {row['still_flagged']} | "
                         f"{primary} | {row['perplexity_before']:.3f} | {row['perplexity_after']:.3f} |")
        if not any(row["secondary_sinks"] for row in result["effects"]):
            lines.append("")
            continue
        lines += ["", "Secondary-sink mass by layer (without / with), layers where the sinks are scored:", "",
                  "| policy | " + " | ".join(f"L{i}" for i in range(result["layers"])) + " |",
                  "|---|" + "---|" * result["layers"]]
        for row in result["effects"]:
            cells = [("-" if b is None or a is None else f"{b:.3f}/{a:.3f}")
                     for b, a in zip(row["mass_before"], row["mass_after"])]
            lines.append(f"| {row['policy']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/intervention-effects.md"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/intervention_effects.json"))
    parser.add_argument("--calibration", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    command = "python benchmarks/intervention_effects.py"
    results = [run_family(label, FAMILIES[label], args.calibration, args.held_out, args.tokens)
               for label in args.families]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, "results": results}, indent=1))
    args.out.write_text(markdown(results, command))
    print(f"wrote {args.out} and {args.json}")


if __name__ == "__main__":
    main()
