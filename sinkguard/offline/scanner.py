"""The offline scanner: prompts in, sinks per prompt and model-level sink statistics out.

    from sinkguard import scan
    result = scan(prompts=["The cat sat on the mat."])
    write_scan(result, "runs/scan")     # report.json + figures (sinkguard.offline.figures)
    result.prompts[0].detection.events  # SinkEvent list

Per prompt, one forward pass records the trace (hidden-state statistics and, optionally,
attention sink scores, see :mod:`sinkguard.engines.hf`); the engine-independent detector then
finds the reference, the active window and every flagged token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sinkguard.core.aggregate import summarize
from sinkguard.core.confirmation import agreement, confirmed_sinks
from sinkguard.core.detection import detect_in_trace
from sinkguard.core.settings import ScanConfig
from sinkguard.core.trace import SequenceTrace
from sinkguard.errors import InputError
from sinkguard.offline.report import PromptScan, ScanResult
from sinkguard.sources.prompts import Prompt, default_prompts

if TYPE_CHECKING:
    from sinkguard.core.profile import SinkProfile
    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.interventions.policy import Policy


def prompt_token_ids(model: HFSinkModel, prompt: Prompt | str, config: ScanConfig) -> list[int]:
    """Token ids for a prompt: tokenised text or given ids, BOS-prefixed, length-checked."""
    if isinstance(prompt, str):
        prompt = Prompt(text=prompt)
    if prompt.text is not None:
        if not prompt.text.strip():
            raise InputError(f"empty prompt{' (' + prompt.source + ')' if prompt.source else ''}")
        ids = model.tokenize(prompt.text, add_bos=config.add_bos)
    else:
        ids = list(prompt.token_ids or ())
        bos = model.tokenizer.bos_token_id
        if config.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
    if config.max_tokens is not None:
        ids = ids[: config.max_tokens]
    return ids


def scan_prompt(
    model: HFSinkModel,
    token_ids: list[int],
    config: ScanConfig,
    profile: SinkProfile | None = None,
    index: int = 0,
    source: str = "",
    policy: Policy | None = None,
) -> PromptScan:
    """Trace and detect one prompt (per-prompt reference, or the profile's when given), with
    ``policy``'s interventions applied (they need the profile)."""
    if profile is None:
        trace = model.trace(token_ids, config.attention, reference_candidates=config.detector.reference_candidates)
    elif policy is not None and policy.interventions:
        from sinkguard.engines.hf.interventions import intervening

        with intervening(model, policy, len(token_ids), profile):
            trace = model.trace(token_ids, config.attention, reference_directions=profile.reference_hidden_tensor())
    else:
        trace = model.trace(token_ids, config.attention, reference_directions=profile.reference_hidden_tensor())
    return detect_prompt(trace, model.decode_tokens(token_ids), config, profile, index, source)


def detect_prompt(trace: SequenceTrace, tokens: list[str], config: ScanConfig, profile: SinkProfile | None = None,
                  index: int = 0, source: str = "") -> PromptScan:
    """Run the detector on a recorded trace (no model needed): with a profile, its calibrated
    detector, reference direction, window and medians, exactly as the online detector does."""
    if profile is None:
        detection = detect_in_trace(trace.hidden_norm, trace.hidden_cos, trace.mlp_norm, trace.mlp_cos,
                                    config.detector)
    else:
        detection = detect_in_trace(
            trace.hidden_norm, trace.hidden_cos, trace.mlp_norm, trace.mlp_cos, profile.meta.detector,
            reference=profile.reference_position, window=profile.window_mask(),
            mlp_median=profile.median_mlp_norm, hidden_median=profile.median_hidden_norm,
        )
    scores = trace.sink_scores
    for event in detection.events:
        event.token_id = trace.token_ids[event.position]
        event.token = tokens[event.position]
        if scores is not None and not np.all(np.isnan(scores[:, event.position])):
            layer = int(np.nanargmax(scores[:, event.position]))
            event.peak_score_layer = layer
            event.peak_sink_score = float(scores[layer, event.position])
    prompt_scan = PromptScan(index, source, list(trace.token_ids), tokens, trace, detection)
    confirm(prompt_scan, config)
    return prompt_scan


def redetect(result: ScanResult, config: ScanConfig) -> ScanResult:
    """The same scan with another detector setting (per-prompt references): traces are reused."""
    if result.reference_mode != "prompt":
        raise InputError("redetect needs a scan made with per-prompt references")
    prompts = [detect_prompt(p.trace, p.tokens, config, None, p.index, p.source) for p in result.prompts]
    summary = summarize([p.as_result for p in prompts], result.model.num_layers)
    return ScanResult(result.model, result.model_path, config, prompts, summary, result.reference_mode)


def confirm(prompt: PromptScan, config: ScanConfig) -> None:
    """Attach the prompt's attention-confirmed sinks and the detection's agreement with them."""
    if prompt.trace.head_scores is None:
        return
    prompt.confirmed = confirmed_sinks(prompt.trace.head_scores, prompt.trace.attention_windows,
                                       config.confirmation, prompt.detection.reference)
    prompt.agreement = agreement(prompt.detection.events, prompt.confirmed, config.confirmation)


def scan(
    model: HFSinkModel | str | Path | None = None,
    prompts: Sequence[Prompt | str] | None = None,
    config: ScanConfig | None = None,
    profile: SinkProfile | None = None,
    progress: bool = True,
    policy: Policy | None = None,
) -> ScanResult:
    """Scan ``prompts`` (default: the built-in set) on ``model`` (default: the embedded model), with
    ``policy``'s interventions applied if given (it needs the model's ``profile``)."""
    from sinkguard.engines.hf.runner import HFSinkModel

    if policy is not None and policy.interventions and profile is None:
        raise InputError(f"scanning with policy {policy.name!r} needs the model's sink profile (--profile)")
    config = config or ScanConfig()
    if not isinstance(model, HFSinkModel):
        model = HFSinkModel.load(model)
    if profile is not None:
        profile.check_model(model.info)
    if prompts is None:
        prompts = default_prompts(lambda t: model.tokenize(t, add_bos=False))
    if not prompts:
        raise InputError("no prompts to scan")
    prepared = [prompt_token_ids(model, p, config) for p in prompts]
    sources = [p.source if isinstance(p, Prompt) else f"prompt {i}" for i, p in enumerate(prompts)]
    scans: list[PromptScan] = []
    indices: Sequence[int] = range(len(prepared))
    if progress and len(prepared) > 1:
        from rich.progress import track

        indices = track(indices, description=f"scanning {len(prepared)} prompts", transient=True)
    for i in indices:
        scans.append(scan_prompt(model, prepared[i], config, profile, i, sources[i], policy))
    summary = summarize([s.as_result for s in scans], model.info.num_layers)
    return ScanResult(
        model=model.info,
        model_path=str(model.source.path),
        config=config,
        prompts=scans,
        summary=summary,
        reference_mode="profile" if profile is not None else "prompt",
    )
