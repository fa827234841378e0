"""An in-process evaluation target: the arms run in transformers (sinkguard's own adapter), no server.

:class:`LocalArmClient` answers the same two questions as the server's
:class:`~sinkguard.evaluation.client.ArmClient` -- a prompt's token log-probabilities and a greedy
generation with each token's log-probability, top-k alternatives and timings -- so every task,
the runner and the comparison work unchanged. Interventions run through
:func:`sinkguard.engines.hf.interventions.intervening` (the same plan and edit functions the vLLM
adapter calls), so a local run is also an independent check of a server's numbers.

The model is shared by every arm and is not thread safe: calls are serialised, so ``concurrency``
does not speed a local run up. Latencies are transformers' on this machine, not a server's.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from typing import Any

import torch

from sinkguard.evaluation.client import Generation, PromptLogprobs
from sinkguard.interventions.policy import Policy

_MODEL_LOCKS: dict[int, threading.Lock] = {}


class LocalArmClient:
    """One arm (``policy``) of an in-process transformers model (an :class:`HFSinkModel`)."""

    def __init__(self, model: Any, arm: str, policy: Policy | None, profile: Any) -> None:
        self.model = model
        self.arm = arm
        self.policy = policy if policy is not None and policy.interventions else None
        self.profile = profile
        self._lock = _MODEL_LOCKS.setdefault(id(model), threading.Lock())

    @staticmethod
    def has_sink_records() -> bool:
        return False  # no online detector runs in-process: a local run has no per-arm sink statistics

    def _ids(self, prompt: str | list[int]) -> list[int]:
        # as vLLM's completions endpoint tokenizes a text prompt (special tokens added, no extra BOS)
        return list(prompt) if isinstance(prompt, list) else list(self.model.tokenizer(prompt).input_ids)

    def _applying(self, prompt_tokens: int) -> Any:
        if self.policy is None:
            return nullcontext()
        from sinkguard.engines.hf.interventions import intervening

        return intervening(self.model, self.policy, prompt_tokens, self.profile)

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: str | list[int]) -> PromptLogprobs:
        """Log-probability of every prompt token given the ones before (the first is None)."""
        from sinkguard.engines.hf.likelihood import token_logprobs

        ids = self._ids(prompt)
        with self._lock:
            scores = token_logprobs(self.model, ids, self.policy, self.profile)
        return PromptLogprobs([None, *scores.tolist()], "")

    @torch.inference_mode()
    def generate(self, prompt: str | list[int], max_tokens: int, top_logprobs: int = 0,
                 stop: list[str] | None = None) -> Generation:
        """Greedy generation with a KV cache, each token's log-probability and top-k alternatives."""
        ids = self._ids(prompt)
        tokenizer = self.model.tokenizer
        eos = tokenizer.eos_token_id
        generated: list[int] = []
        logprobs: list[float] = []
        tops: list[dict[str, float]] = []
        with self._lock, self._applying(len(ids)):
            start = time.perf_counter()
            inputs, cache, first = torch.tensor([ids]), None, None
            for _ in range(max_tokens):
                out = self.model.model(input_ids=inputs, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                scores = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                token = int(scores.argmax())
                first = first or time.perf_counter()
                generated.append(token)
                logprobs.append(float(scores[token]))
                if top_logprobs:
                    values, indices = scores.topk(top_logprobs)
                    tops.append({tokenizer.decode([int(i)]): float(v) for v, i in zip(values, indices)})
                if token == eos or (stop and any(s in tokenizer.decode(generated) for s in stop)):
                    break
                inputs = torch.tensor([[token]])
            end = time.perf_counter()
        text = tokenizer.decode(generated, skip_special_tokens=True)
        for s in stop or ():
            text = text.split(s)[0]
        count = len(generated)
        return Generation(text, logprobs, tops, (first or end) - start,
                          (end - first) / (count - 1) if first and count > 1 else None, count, "")


def local_clients(model: Any, arms: list[str], policies: Any, profile: Any) -> dict[str, LocalArmClient]:
    """One client per arm (policy names of ``policies``; ``none`` runs without interventions)."""
    from sinkguard.interventions.policy import ModelScope, check_scope

    chosen = {arm: policies.get(arm) for arm in arms}  # ConfigError names an unknown arm
    check_scope([p for p in chosen.values() if p.interventions], ModelScope.from_profile(profile))
    return {arm: LocalArmClient(model, arm, policy, profile) for arm, policy in chosen.items()}
