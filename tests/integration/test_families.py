"""The detector on two trained families, judged by their own attention on held-out text.

Reproduces a known failure (the paper's alignment test alone flags most of Gemma 3's tokens,
none of which attention confirms) and checks the done criteria: with the attention-validated
profile, recall >= 0.9 of strong secondary sinks and <= 0.5 unexplained sink flags per 256 tokens
on prompts the calibration did not see, for every family.
"""

from __future__ import annotations

import pytest

from sinkguard.core.settings import ConfirmationConfig, DetectorConfig, ScanConfig
from sinkguard.sources.prompts import held_out_prompts

TARGETS = ConfirmationConfig()


@pytest.fixture(scope="module")
def gemma():
    from sinkguard.engines.hf.runner import HFSinkModel

    return HFSinkModel.load("gemma3-270m")


def held_out(model, count: int = 16):
    return held_out_prompts(lambda t: model.tokenize(t, add_bos=False), count=count, tokens=256)


@pytest.mark.slow
def test_alignment_alone_flags_ordinary_gemma_tokens_the_default_does_not(gemma):
    from sinkguard.offline.scanner import redetect, scan

    alignment = scan(gemma, held_out(gemma, 6), ScanConfig(detector=DetectorConfig.alignment_only()), progress=False)
    assert alignment.agreement.unexplained_per_256 > 50, alignment.agreement.to_dict()  # alignment alone
    default = redetect(alignment, ScanConfig())
    assert default.agreement.unexplained_per_256 <= TARGETS.target_unexplained_per_256, default.agreement.to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["default", "gemma3-270m"])
def test_calibrated_profile_meets_the_targets_on_held_out_text(spec, hf_model, gemma):
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.offline.scanner import scan

    model = hf_model if spec == "default" else gemma
    _, profile = profile_for_model(spec)
    result = scan(model, held_out(model), ScanConfig(), profile=profile, progress=False)
    agreement = result.agreement
    assert agreement.meets(TARGETS), agreement.to_dict()
    if spec == "default":  # SmolLM2 has strong secondary sinks, found by the calibrated detector
        assert agreement.strong >= 30 and agreement.recall >= TARGETS.target_recall
        assert profile.validation_status == "validated"
    else:  # Gemma 3 270M shows none: a valid, useful answer
        assert agreement.strong == 0
        assert profile.validation_status == "no_secondary_sinks"
