"""Per-request accounting and prefix-cache restore, fed the way an engine adapter feeds them (no engine)."""

from __future__ import annotations

import numpy as np
import torch

from sinkguard.core.detection import SinkEvent
from sinkguard.interventions.attention_edits import SinkMemory
from sinkguard.interventions.plan import AppliedEdit
from sinkguard.interventions.policy import ModelScope, Policy, PolicySet
from sinkguard.serving.accounting import RequestAccounting, RequestStart
from sinkguard.serving.prefix_events import PrefixEventStore
from sinkguard.serving.prefix_restore import PrefixRestore
from sinkguard.serving.records import RequestTracker

REMOVE = Policy.model_validate({"name": "remove", "interventions": [{"kind": "mlp_projection_removal"}]})
SCOPE = ModelScope(8, 4, (2,))


def event(position: int) -> SinkEvent:
    return SinkEvent(position=position, birth_layer=3, lifetime=5, last_layer=7, kind="secondary",
                     flagged_layers=[3, 4, 5, 6, 7], forming_layer=3)


def accounting(starts: dict[str, RequestStart], record: bool = True, block_size: int | None = None,
               tokens: dict[str, list[int]] | None = None) -> RequestAccounting:
    memory = SinkMemory()
    prefix = None
    if block_size is not None:
        prefix = PrefixRestore(PrefixEventStore(block_size, 64), memory, lambda request_id: tokens[request_id])
    return RequestAccounting(RequestTracker(), PolicySet(policies=[REMOVE]), SCOPE, memory, starts.get,
                             record=record, prefix=prefix)


def step(acc: RequestAccounting, lengths: dict[str, tuple[int, int]], events: list | None,
         input_ids: torch.Tensor | None = None) -> None:
    """One step: ``lengths`` maps each request to (first position, tokens)."""
    query_start = np.cumsum([0, *(n for _, n in lengths.values())])
    positions = np.concatenate([np.arange(first, first + n) for first, n in lengths.values()])
    acc.records(list(lengths))  # what the adapter's step plan does before the first layer
    acc.end_step(query_start, list(lengths), positions, events, input_ids)


def test_a_record_opens_once_with_the_requests_options_and_policy():
    acc = accounting({"a": RequestStart(5, {"sinkguard_policy": "remove"}), "b": RequestStart(3, None)})
    a, b = acc.records(["a", "b"])
    assert acc.records(["a"])[0] is a and a.prompt_tokens == 5 and b.prompt_tokens == 3
    assert a.policy_name == "remove" and a.interventions_policy is REMOVE
    assert b.policy_name == "none" and b.interventions_policy is None
    unknown = acc.open("c")  # the engine does not know it: an empty record, never an error
    assert unknown.prompt_tokens == 0 and unknown.policy_name == "none"


def test_an_unknown_policy_runs_without_interventions():
    acc = accounting({"a": RequestStart(4, {"sinkguard_policy": "nope"})})
    record = acc.open("a")
    assert record.policy_name == "none" and record.interventions_policy is None


def test_steps_count_prefill_decode_and_events_once():
    acc = accounting({"a": RequestStart(4, None)})
    step(acc, {"a": (0, 4)}, [(1, event(1))], input_ids=torch.arange(100, 110))
    step(acc, {"a": (4, 1)}, [(0, event(4))])
    record = acc.tracker.live["a"]
    assert (record.prefill_tokens_scanned, record.decode_tokens_scanned, record.prefill_steps) == (4, 1, 1)
    assert [(e["position"], e["phase"]) for e in record.events] == [(1, "prefill"), (4, "decode")]
    assert record.events[0]["token_id"] == 101
    step(acc, {"a": (0, 5)}, [(1, event(1))])  # recomputed after a preemption: counted apart, not recorded again
    assert record.recomputed_tokens == 5 and len(record.events) == 2
    step(acc, {"a": (5, 1)}, None)  # the step's activations were not usable
    assert record.unscanned_steps == 1 and record.decode_tokens_scanned == 1


def test_other_tensor_parallel_ranks_open_records_but_count_nothing():
    acc = accounting({"a": RequestStart(4, {"sinkguard_policy": "remove"})}, record=False)
    step(acc, {"a": (0, 4)}, [(1, event(1))])
    acc.unscanned(["a"])
    record = acc.tracker.live["a"]
    assert record.interventions_policy is REMOVE
    assert record.prefill_tokens_scanned == 0 and record.events == [] and record.unscanned_steps == 0


def test_edits_are_recorded_and_nonfinite_ones_interrupt_the_policy():
    acc = accounting({"a": RequestStart(4, {"sinkguard_policy": "remove"}), "b": RequestStart(4, None)})
    acc.records(["a", "b"])
    spec = REMOVE.interventions[0]
    acc.applied([AppliedEdit(2, spec, "remove", np.array([0, 0]), np.array([1, 3])),
                 AppliedEdit(3, spec, "remove", np.array([0]), np.array([1]), nonfinite=np.array([0]))], ["a", "b"])
    record = acc.tracker.live["a"]
    assert record.interventions_applied[spec.kind] == 3 and len(record.interventions) == 3
    assert record.nonfinite_edits == 1 and record.unapplied == "an edit gave a non-finite result and was skipped"


def test_detection_off_and_on_marks_the_requests_it_missed():
    acc = accounting({"a": RequestStart(4, {"sinkguard_policy": "remove"}),
                      "b": RequestStart(4, {"sinkguard_policy": "remove"})})
    acc.open("a")
    acc.interrupt("switched off")
    acc.started_unobserved(["a", "b"])
    assert acc.tracker.live["a"].unapplied == "switched off"
    assert acc.open("b").unapplied == "detection was off when the request started"


def test_retired_requests_leave_the_live_set_and_sink_memory():
    acc = accounting({"a": RequestStart(4, None), "b": RequestStart(4, None)})
    acc.records(["a", "b"])
    acc.memory.flag("a", np.array([2]), 3)
    acc.retire_missing({"b"})
    assert set(acc.tracker.live) == {"b"} and "a" in acc.tracker.finished and acc.memory.born("a") == {}


def test_a_cached_prefix_is_read_back_not_scanned():
    tokens = {"a": list(range(10)), "b": list(range(10))}
    acc = accounting({"a": RequestStart(10, None), "b": RequestStart(10, None, cached_tokens=8)},
                     block_size=4, tokens=tokens)
    acc.memory.flag("a", np.array([6]), 2)  # a sink formed at layer 2 (what attention edits target)
    step(acc, {"a": (0, 10)}, [(1, event(1)), (6, event(6))])  # blocks 0 and 1 complete: stored
    step(acc, {"b": (8, 2)}, [])
    record = acc.tracker.live["b"]
    assert record.cached_prefix_tokens == 8 and record.cached_prefix_unknown_tokens == 0
    assert [e["position"] for e in record.events] == [1, 6] and record.prefill_tokens_scanned == 2
    assert acc.memory.born("b") == {6: 2} and acc.prefix.store.stats()["hits"] == 2


def test_blocks_computed_in_the_same_step_are_read_back_after_it():
    tokens = {"a": list(range(8)), "b": list(range(8))}
    acc = accounting({"a": RequestStart(8, None), "b": RequestStart(8, None, cached_tokens=6)},
                     block_size=4, tokens=tokens)
    step(acc, {"a": (0, 8), "b": (6, 2)}, [(1, event(1)), (8 + 1, event(7))])
    record = acc.tracker.live["b"]
    assert [e["position"] for e in record.events] == [1, 7]  # block 0 read back after the step, sorted first
    assert record.cached_prefix_unknown_tokens == 2  # the partial block only
    step(acc, {"a": (8, 1)}, None)  # unscanned: the request stores nothing more
    assert not acc.prefix.store.needs_commit("a", 12)
