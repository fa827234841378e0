"""Online detection on two trained families (SmolLM2 / Llama, Gemma 3 / sliding window) with
prompts the calibration never saw: events equal the offline scanner's, and the sinks they claim
are sinks by the model's own attention."""

from __future__ import annotations

import pytest

from sinkguard.core.confirmation import Agreement, agreement, confirmed_sinks
from sinkguard.core.detection import SinkEvent
from sinkguard.core.settings import ConfirmationConfig, ScanConfig
from sinkguard.offline.scanner import scan_prompt
from sinkguard.serving.settings import ServeConfig

FAMILIES = ("default", "gemma3-270m")
MAX_TOKENS = 8


def key(event) -> tuple:
    event = event if isinstance(event, dict) else event.to_dict()
    return event["position"], event["birth_layer"], event["lifetime"], event["kind"]


_RUNS: dict[str, dict] = {}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    return family_run(request.param, tmp_path_factory)


def family_run(name: str, tmp_path_factory) -> dict:
    """The family's model, cached calibrated profile, held-out prompts and one offline vLLM run (once)."""
    if name in _RUNS:
        return _RUNS[name]
    from harness.offline_engine import generate

    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.sources.prompts import held_out_prompts

    model = HFSinkModel.load(name)
    profile_path, profile = profile_for_model(name)
    prompts = [[model.tokenizer.bos_token_id, *p.token_ids]
               for p in held_out_prompts(lambda t: model.tokenize(t, add_bos=False), count=8, tokens=191)]
    folder = tmp_path_factory.mktemp(f"family-{name}")
    config = folder / "serve.json"
    config.write_text(ServeConfig(profile=str(profile_path), metrics=False).model_dump_json())
    online = generate(model.source.path, prompts, folder / "sinkguard", MAX_TOKENS, config)
    _RUNS[name] = {"name": name, "model": model, "profile": profile, "prompts": prompts, "online": online,
                   "folder": folder}
    return _RUNS[name]


def test_profile_detector_is_trusted(family):
    assert family["profile"].validation_status in ("validated", "no_secondary_sinks")


def test_online_prefill_events_equal_the_offline_scanner(family):
    model, profile = family["model"], family["profile"]
    config = ScanConfig(attention=ScanConfig().attention.model_copy(update={"enabled": False}))
    agree = union = 0
    for prompt, found in zip(family["prompts"], family["online"]["records"]):
        record = found[0]
        assert record["tokens_scanned"]["prefill"] == len(prompt)
        online = {key(e) for e in record["events"] if e["phase"] == "prefill"}
        offline = {key(e) for e in scan_prompt(model, prompt, config, profile=profile).detection.events}
        agree += len(online & offline)
        union += len(online | offline)
    assert union > 0  # the reference at least is reported by both
    assert agree / union >= 0.97, f"{family['name']}: {agree}/{union}"


def test_online_sink_flags_are_attention_sinks(family):
    """What the server reports as sinks on unseen text is confirmed by the model's attention."""
    model = family["model"]
    confirmation = ConfirmationConfig()
    parts = []
    for prompt, found in zip(family["prompts"], family["online"]["records"]):
        trace = model.trace(prompt, ScanConfig().attention, reference_candidates=1)
        confirmed = confirmed_sinks(trace.head_scores, trace.attention_windows, confirmation)
        events = [SinkEvent(**{k: e[k] for k in ("position", "birth_layer", "lifetime", "last_layer", "kind",
                                                  "flagged_layers", "is_reference")})
                  for e in found[0]["events"] if e["phase"] == "prefill"]
        parts.append(agreement(events, confirmed, confirmation))
    total = Agreement.total(parts)
    assert total.unexplained_per_256 <= confirmation.target_unexplained_per_256, total.to_dict()
    if total.strong:  # SmolLM2 has strong secondary sinks; Gemma 3 270M shows none
        assert total.recall >= confirmation.target_recall, total.to_dict()


def test_gemma_greedy_outputs_identical_to_plain_vllm(tmp_path_factory):
    """(The embedded model's identity is checked on 50 prompts in test_online.py.)"""
    from harness.offline_engine import generate

    family = family_run("gemma3-270m", tmp_path_factory)
    plain = generate(family["model"].source.path, family["prompts"], family["folder"] / "plain", MAX_TOKENS)
    assert family["online"]["tokens"] == plain["tokens"]
