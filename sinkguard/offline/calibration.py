"""Calibration: turn a per-prompt scan into a :class:`~sinkguard.core.profile.SinkProfile`.

With attention scores (the default) the detector's settings are chosen per model so that its
hidden-state flags agree with attention-confirmed sinks (:mod:`sinkguard.core.detector_search`);
the choice, the agreement it reached and its status (``validated``, ``no_secondary_sinks``,
``below_target``; ``unvalidated`` without attention) are stored in the profile.

The online detector cannot always see a request's own first token (prefix caching, decode
steps), so the profile stores the reference's direction per layer averaged over calibration
prompts. ``calibration.reference_consistency`` records how input-independent that direction is
(min over prompts and window layers of the cosine with the mean), so an operator can see whether
a stored reference is trustworthy for this model.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sinkguard.core.detector_search import SearchResult, TraceArrays, search_detector
from sinkguard.core.profile import FormingLayer, SinkProfile, new_meta
from sinkguard.core.settings import ScanConfig
from sinkguard.errors import InputError
from sinkguard.offline.report import ScanResult
from sinkguard.offline.scanner import redetect, scan
from sinkguard.sources.prompts import Prompt

logger = logging.getLogger("sinkguard")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def choose_detector(result: ScanResult) -> tuple[ScanResult, SearchResult | None]:
    """Search the detector setting that agrees best with attention (see ``detector_search``) and
    return the scan re-detected with it; without attention scores the scan is returned as is."""
    if any(p.confirmed is None for p in result.prompts):
        return result, None
    arrays = [TraceArrays(p.trace.hidden_norm, p.trace.hidden_cos, p.trace.mlp_norm, p.trace.mlp_cos, p.confirmed)
              for p in result.prompts]
    search = search_detector(arrays, result.config.detector, result.config.confirmation)
    if search.status == "below_target":
        logger.warning("sinkguard calibrate: %s", search.message)
    config = result.config.model_copy(update={"detector": search.chosen.config})
    return redetect(result, config), search


def validation_block(result: ScanResult, search: SearchResult | None) -> dict:
    """What the profile records about how far its detector can be trusted."""
    if search is None:
        return {"status": "unvalidated", "message": "calibrated without attention scores: the detector's agreement "
                "with attention sinks was not measured", "criteria": result.config.confirmation.model_dump()}
    return {**search.to_dict(), "criteria": result.config.confirmation.model_dump()}


def profile_from_scan(result: ScanResult, search: SearchResult | None = None) -> SinkProfile:
    """Build a profile from a scan made with per-prompt references (already re-detected with the
    chosen detector, see :func:`choose_detector`)."""
    if result.reference_mode != "prompt":
        raise InputError("calibrate from a scan with per-prompt references, not one made with a profile")
    references = Counter(p.detection.reference for p in result.prompts)
    position = references.most_common(1)[0][0]
    chosen = [p for p in result.prompts if p.detection.reference == position]
    hidden = np.stack([p.trace.ref_hidden[position] for p in chosen])  # [P, L, d]
    mlp = np.stack([p.trace.ref_mlp[position] for p in chosen])
    direction = _unit_rows(_unit_rows(hidden).mean(axis=0))
    mlp_direction = _unit_rows(_unit_rows(mlp).mean(axis=0))
    consistency = np.einsum("pld,ld->pl", _unit_rows(hidden), direction)  # [P, L]
    window = result.summary.window_layers

    forming = []
    for row in result.summary.forming_layers:
        ratios = [e.mlp_norm_ratio for p in result.prompts for e in p.detection.events
                  if e.kind == "secondary" and e.forming_layer == row["layer"] and not e.is_reference]
        p10, p90 = np.percentile(ratios, [10, 90])
        forming.append(FormingLayer(
            layer=row["layer"], count=row["count"],
            mlp_norm_ratio_median=row["mlp_norm_ratio_median"],
            mlp_norm_ratio_p10=round(float(p10), 3), mlp_norm_ratio_p90=round(float(p90), 3),
            mlp_cos_median=row["mlp_cos_median"],
            alert_mlp_norm_ratio=round(max(3.0, 0.5 * float(p10)), 3),
        ))

    tensors = {
        "reference_hidden": direction.astype(np.float32),
        "reference_mlp": mlp_direction.astype(np.float32),
        "reference_norm": np.linalg.norm(hidden, axis=-1).mean(axis=0).astype(np.float32),
        "median_hidden_norm": np.mean([np.median(p.trace.hidden_norm, axis=1) for p in result.prompts], axis=0),
        "median_mlp_norm": np.mean([np.median(p.trace.mlp_norm, axis=1) for p in result.prompts], axis=0),
    }
    sink_heads: list[tuple[int, int]] = []
    summary = result.summary
    if summary.head_secondary_score is not None:
        tensors["head_secondary_score"] = np.nan_to_num(summary.head_secondary_score)
        threshold = result.config.attention.sink_score_threshold
        sink_heads = [(int(layer), int(head))
                      for layer, head in np.argwhere(tensors["head_secondary_score"] > threshold)]
    if summary.head_primary_score is not None:
        tensors["head_primary_score"] = np.nan_to_num(summary.head_primary_score)
    tensors["primary_score"] = np.nan_to_num(np.asarray(summary.primary_score_by_layer, dtype=float))
    tensors["secondary_score"] = np.nan_to_num(np.asarray(summary.secondary_score_by_layer, dtype=float))

    in_window = consistency[:, window] if window else consistency
    meta = new_meta(
        model=result.model.to_dict(),
        detector=result.config.detector,
        attention=result.config.attention,
        reference_position=position,
        window_layers=window,
        forming_layers=forming,
        sink_levels=summary.sink_levels,
        sink_heads=sink_heads,
        validation=validation_block(result, search),
        calibration={
            "num_prompts": summary.num_prompts,
            "num_tokens": summary.num_tokens,
            "prompts_with_reference": len(chosen),
            "reference_consistency_min": round(float(in_window.min()), 4),
            "reference_consistency_mean": round(float(in_window.mean()), 4),
            "kinds": summary.kinds,
            "add_bos": result.config.add_bos,
        },
    )
    return SinkProfile(meta, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})


def calibrate(
    model=None,
    prompts: Sequence[Prompt | str] | None = None,
    config: ScanConfig | None = None,
    out: Path | str | None = None,
    progress: bool = True,
) -> tuple[SinkProfile, ScanResult]:
    """Scan calibration prompts and build (and optionally save) the model's sink profile."""
    result, search = choose_detector(scan(model, prompts, config, progress=progress))
    profile = profile_from_scan(result, search)
    if out is not None:
        profile.save(out)
    return profile, result


def profile_for_model(model_spec: str | Path | None,
                      profile_path: Path | str | None = None) -> tuple[Path, SinkProfile]:
    """The profile to serve ``model_spec`` with: the given one (validated against the checkpoint's
    weights), or one calibrated on the fly and cached under ``$SINKGUARD_CACHE/profiles``."""
    from sinkguard.core.fingerprint import compare_identity
    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.errors import ProfileError
    from sinkguard.sources.models import cache_dir, checkpoint_fingerprint, resolve_model
    from sinkguard.sources.prompts import default_prompts

    resolved = resolve_model(model_spec)
    identity = checkpoint_fingerprint(resolved.path)
    if profile_path is not None:
        profile = SinkProfile.load(profile_path)
        check = compare_identity(profile.model.weights, identity)
        if not check.accepted:
            raise ProfileError(f"profile {profile_path} was calibrated on {profile.model.name}, not on the weights "
                               f"in {resolved.path}: {check.message}")
        return Path(profile_path), profile
    folder = cache_dir() / "profiles" / f"{resolved.name}-{identity.fingerprint[:12]}"
    try:  # an older profile schema, or another identity under the same short name, is recalibrated
        cached = SinkProfile.load(folder)
        if compare_identity(cached.model.weights, identity).relation == "same weights":
            return folder, cached
    except ProfileError:
        pass
    model = HFSinkModel.load(resolved.path)
    prompts = default_prompts(lambda t: model.tokenize(t, add_bos=False), count=16, tokens=256)
    profile, _ = calibrate(model, prompts, out=folder, progress=False)
    return folder, profile
