"""Per-request records, exact lookups, store limits and the fail-open guard (no engine needed)."""

from __future__ import annotations

import logging

import pytest

from sinkguard.core.detection import SinkEvent
from sinkguard.serving.faults import FaultGuard, FaultInjector, InjectedFault
from sinkguard.serving.records import RequestTracker, client_ids
from sinkguard.serving.settings import FaultInjection


def event(position: int) -> SinkEvent:
    return SinkEvent(position=position, birth_layer=3, lifetime=5, last_layer=7, kind="secondary",
                     flagged_layers=[3, 4, 5, 6, 7], forming_layer=3)


def test_client_ids_follow_vllms_request_id_grammar():
    assert client_ids("cmpl-abc-0-1a2b3c4d") == (0, ["cmpl-abc", "abc"])
    assert client_ids("2_cmpl-abc-0-1a2b3c4d") == (2, ["cmpl-abc", "abc"])  # n > 1: sample 2
    assert client_ids("chatcmpl-req-5-0badf00d") == (0, ["chatcmpl-req-5", "req-5"])
    assert client_ids("resp_xyz-deadbeef") == (0, ["resp_xyz"])


def test_lookup_is_exact_never_by_prefix():
    tracker = RequestTracker()
    tracker.get("cmpl-secret1-0-1a2b3c4d", None, 4)
    tracker.get("chatcmpl-secret2-0badf00d", None, 4)
    assert [r["request_id"] for r in tracker.lookup("cmpl-secret1")] == ["cmpl-secret1-0-1a2b3c4d"]
    assert len(tracker.lookup("secret2")) == 1  # the X-Request-Id the client sent
    for guess in ("cmpl", "cmpl-", "cmpl-secret", "chatcmpl", "secret", "", "cmpl-secret1-0", "1a2b3c4d"):
        assert tracker.lookup(guess) == [], guess


def test_samples_of_one_request_come_back_in_order():
    tracker = RequestTracker()
    for sample in (1, 0):
        tracker.get(f"{sample}_cmpl-x-0-1a2b3c4d", None, 4)
    assert [r["sample_index"] for r in tracker.lookup("cmpl-x")] == [0, 1]


def test_store_is_bounded_by_bytes_and_age():
    now = [0.0]
    tracker = RequestTracker(max_finished=100, max_bytes=5000, ttl_seconds=60, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        record = tracker.get(f"cmpl-{name}-0-1a2b3c4d", {"sinkguard_max_events": 10}, 4)
        for position in range(3):
            record.add(event(position), "prefill")
        tracker.retire_missing(set())
    # three records of 512 + 3 x 640 bytes exceed 5000 bytes: the oldest went first
    assert tracker.lookup("a") == [] and len(tracker.lookup("b")) == 1 and tracker.finished_bytes <= 5000
    now[0] = 61.0
    assert tracker.lookup("c") == [] and tracker.finished_bytes == 0 and not tracker.finished


def test_events_are_paged():
    tracker = RequestTracker()
    record = tracker.get("cmpl-p-0-1a2b3c4d", None, 40)
    for position in range(10):
        record.add(event(position), "prefill")
    page = tracker.lookup("p", offset=4, limit=3)[0]
    assert [e["position"] for e in page["events"]] == [4, 5, 6]
    assert page["events_total"] == 10 and page["events_offset"] == 4


def test_recompute_after_preemption_is_counted_once():
    tracker = RequestTracker()
    record = tracker.get("cmpl-r-0-1a2b3c4d", None, prompt_tokens=6)
    assert record.account(0, 4) == (4, 0)  # first prefill chunk
    assert record.account(4, 2) == (2, 0)
    assert record.account(6, 1) == (0, 1) and record.account(7, 1) == (0, 1)  # two decode steps
    # preempted, then recomputed from position 0: prompt and generated tokens again, plus one new token
    assert record.account(0, 9) == (0, 1)
    assert record.recomputed_tokens == 8 and record.prefill_tokens_scanned == 6 and record.decode_tokens_scanned == 3
    assert record.next_position == 9


def test_fault_guard_fails_open_logs_once_and_gives_up(caplog):
    seen = []
    guard = FaultGuard(fault_limit=3, on_fault=lambda stage, exc: seen.append(stage))
    with caplog.at_level(logging.ERROR, logger="sinkguard"):
        for _ in range(2):
            guard.record("layer", ValueError("bad shape"))
    assert not guard.exhausted and guard.total == 2 and seen == ["layer", "layer"]
    assert sum("detector fault in layer" in r.message for r in caplog.records) == 1  # logged once per cause
    guard.record("step_end", MemoryError("oom"))
    assert guard.exhausted and guard.first_fault == "layer: ValueError: bad shape"
    guard.rearm()  # the operator reinstalled the detector: a fresh budget, counts kept
    assert not guard.exhausted and guard.total == 3


def test_fault_guard_fails_closed_when_configured():
    guard = FaultGuard(fault_limit=3, fail_closed=True)
    with pytest.raises(ValueError, match="bad"):
        guard.record("layer", ValueError("bad"))
    assert guard.total == 1


def test_fault_injector_fires_at_its_stage_every_n_steps():
    injector = FaultInjector(FaultInjection(stage="layer", every_steps=2))
    fired = []
    for _ in range(4):
        injector.step()
        for stage in ("step_start", "layer"):
            try:
                injector.maybe_raise(stage)
            except InjectedFault:
                fired.append((injector.steps, stage))
    assert fired == [(2, "layer"), (4, "layer")]
    FaultInjector(None).maybe_raise("layer")  # no injection configured: never raises
