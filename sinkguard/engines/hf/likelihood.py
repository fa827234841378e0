"""Teacher-forced log-likelihood of token sequences on a transformers model, with or without a
policy applied: the objective of head selection, the perplexity of a policy's effect, and the
local (in-process) evaluation engine's scores."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from sinkguard.engines.hf.interventions import intervening
from sinkguard.interventions.policy import Policy

if TYPE_CHECKING:
    from sinkguard.core.profile import SinkProfile
    from sinkguard.engines.hf.runner import HFSinkModel


@torch.inference_mode()
def token_logprobs(model: HFSinkModel, token_ids: list[int], policy: Policy | None = None,
                   profile: SinkProfile | None = None) -> torch.Tensor:
    """Teacher-forced log-probabilities of ``token_ids[1:]`` (float64 [T-1]), under ``policy`` if given."""
    applying = policy is not None and policy.interventions
    with intervening(model, policy, len(token_ids), profile) if applying else nullcontext():
        logits = model.model(input_ids=torch.tensor([token_ids]), use_cache=False).logits[0, :-1]
    scores = torch.log_softmax(logits.double(), dim=-1)
    return scores.gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0]


def mean_loglik(model: HFSinkModel, prompts: Sequence[list[int]], policy: Policy | None = None,
                profile: SinkProfile | None = None) -> float:
    """Mean log-likelihood per predicted token over ``prompts`` (nats/token)."""
    total = count = 0.0
    for tokens in prompts:
        scores = token_logprobs(model, tokens, policy, profile)
        total += float(scores.sum())
        count += scores.numel()
    return total / count
