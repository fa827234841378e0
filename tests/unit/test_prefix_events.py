"""Prefix-cached blocks keep their sink events; policies get their own cache salt."""

from __future__ import annotations

import pytest

from sinkguard.core.detection import SinkEvent
from sinkguard.interventions.policy import Policy, PolicySet
from sinkguard.serving.options import policy_cache_key, policy_cache_salt
from sinkguard.serving.prefix_events import PrefixEventStore, chain_hash


def event(position: int) -> SinkEvent:
    return SinkEvent(position=position, token_id=7, kind="secondary", birth_layer=3, lifetime=4,
                     last_layer=6, flagged_layers=[3, 4, 5, 6])


def test_blocks_are_read_back_for_the_same_tokens_and_policy_only():
    store = PrefixEventStore(block_size=4, capacity_blocks=16)
    tokens = list(range(100, 112))
    store.begin("a", "none")
    store.add("a", [event(1), event(6), event(9)])
    store.commit("a", tokens, 10, formations=[(6, 2), (9, 3)])  # blocks 0 and 1 complete; block 2 is not
    assert len(store) == 2
    store.begin("b", "none")
    restored = store.restore("b", tokens, [0, 1, 2])
    assert [e.position for e in restored.events] == [1, 6] and restored.formations == [(6, 2)]
    assert restored.missing == [2]
    store.begin("c", "policy-x")  # same tokens, another policy: nothing
    assert store.restore("c", tokens, [0, 1]).missing == [0, 1]
    store.begin("d", "none")  # another first block: the chain differs from then on
    assert store.restore("d", [0, *tokens[1:]], [0, 1]).missing == [0, 1]


def test_the_block_key_chains_parent_tokens_and_policy():
    root = chain_hash(b"", [1, 2], "none")
    assert chain_hash(b"", [1, 2], "none") == root
    assert len({root, chain_hash(b"", [1, 3], "none"), chain_hash(b"", [1, 2], "p"),
                chain_hash(root, [1, 2], "none")}) == 4


def test_the_store_is_bounded_and_counts_what_it_lost():
    store = PrefixEventStore(block_size=2, capacity_blocks=3)
    tokens = list(range(20))
    store.begin("a", "none")
    store.commit("a", tokens, 10)  # five blocks, the first two evicted
    assert len(store) == 3
    store.begin("b", "none")
    restored = store.restore("b", tokens, [0, 1, 2, 3, 4])
    assert restored.missing == [0, 1]
    assert store.give_up(restored.missing) == 4 and store.stats()["misses"] == 2


def test_a_forgotten_request_stores_nothing_more():
    store = PrefixEventStore(block_size=2, capacity_blocks=8)
    store.begin("a", "none")
    store.forget("a")  # e.g. after a step the detector could not scan
    store.commit("a", [1, 2, 3, 4], 4)
    assert len(store) == 0 and not store.needs_commit("a", 4)
    assert store.restore("a", [1, 2, 3, 4], [0, 1]).missing == [0, 1]  # never guessed


def test_policies_with_interventions_get_their_own_salt():
    remove = Policy.model_validate({"name": "remove", "interventions": [{"kind": "mlp_projection_removal"}]})
    same_edits = Policy.model_validate({"name": "other", "interventions": [{"kind": "mlp_projection_removal"}]})
    clamp = Policy.model_validate({"name": "clamp",
                                   "interventions": [{"kind": "mlp_norm_clamp", "relative_norm": 1.0}]})
    observe = Policy.model_validate({"name": "observe"})
    assert policy_cache_key(observe) == "none" and policy_cache_salt("user", observe) == "user"
    assert policy_cache_salt(None, observe) is None
    assert policy_cache_key(remove) == policy_cache_key(same_edits) != policy_cache_key(clamp)
    assert policy_cache_salt(None, remove) != policy_cache_salt(None, clamp)
    assert policy_cache_salt("user", remove).endswith(":user") and policy_cache_salt("user", remove) != "user"


def test_the_input_processor_salts_each_request_with_its_policy():
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    from sinkguard.engines.vllm.cache_salt import salt_request

    policies = PolicySet.model_validate({"policies": [{"name": "remove",
                                                       "interventions": [{"kind": "mlp_projection_removal"}]}]})

    def request(extra, salt=None):
        return EngineCoreRequest(request_id="r", prompt_token_ids=[1, 2], mm_features=None,
                                 sampling_params=SamplingParams(extra_args=extra), pooling_params=None,
                                 arrival_time=0.0, lora_request=None, cache_salt=salt, data_parallel_rank=None)

    plain, chosen, bad = request(None, "s"), request({"sinkguard_policy": "remove"}), request({"sinkguard_policy": "x"})
    for r in (plain, chosen, bad):
        salt_request(r, policies)
    assert plain.cache_salt == "s" and bad.cache_salt is None
    assert chosen.cache_salt == policy_cache_salt(None, policies.get("remove"))


@pytest.mark.parametrize("size,capacity", [(0, 1), (1, 0)])
def test_store_sizes_must_be_positive(size, capacity):
    with pytest.raises(ValueError):
        PrefixEventStore(size, capacity)
