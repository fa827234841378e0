"""Sink statistics per arm: aggregation of hand-made records, and collection from a stub server with
and without sinkguard's routes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sinkguard.evaluation.client import ArmClient
from sinkguard.evaluation.compare import compare
from sinkguard.evaluation.runner import EvalRun, evaluate
from sinkguard.evaluation.sink_stats import aggregate, padded, response_ids, secondary_active_by_layer
from sinkguard.evaluation.tasks import Task


def event(birth: int, lifetime: int, kind: str = "secondary", reference: bool = False) -> dict:
    return {"position": 3, "birth_layer": birth, "lifetime": lifetime, "last_layer": birth + lifetime - 1,
            "kind": kind, "is_reference": reference}


def record(events: list[dict], prefill: int, decode: int = 0, interventions: dict | None = None,
           secondary: int | None = None, dropped: int = 0) -> dict:
    listed = sum(e["kind"] == "secondary" and not e["is_reference"] for e in events)
    return {"tokens_scanned": {"prefill": prefill, "decode": decode}, "events": events, "events_dropped": dropped,
            "sink_counts": {"reference": 1, "primary": 0, "secondary": listed if secondary is None else secondary,
                            "noise": 0},
            "interventions_applied": interventions or {}}


def test_secondary_sinks_are_active_from_their_birth_layer_for_their_lifetime():
    events = [event(2, 3), event(3, 1), event(0, 10, kind="primary", reference=True), event(1, 1, kind="noise")]
    assert secondary_active_by_layer(events) == [0, 0, 1, 2, 1]


def test_aggregate_normalises_per_1k_scanned_tokens():
    records = [record([event(2, 3), event(3, 1)], prefill=400, decode=100, interventions={"mlp_scale": 30}),
               record([event(1, 2)], prefill=500, interventions={"mlp_scale": 10, "attn_scale": 5}, dropped=2,
                      secondary=3)]
    stats = aggregate(records, missing=1)
    assert stats["tokens_scanned"] == 1000 and stats["records"] == 2 and stats["requests"] == 3
    assert stats["sink_counts"]["secondary"] == 5 and stats["secondary_per_1k_tokens"] == 5.0
    assert stats["interventions_per_1k_tokens"] == {"attn_scale": 5.0, "mlp_scale": 40.0}
    assert stats["secondary_active_by_layer"] == [0, 1, 2, 2, 1]
    assert stats["secondary_active_per_1k_tokens_by_layer"] == [0.0, 1.0, 2.0, 2.0, 1.0]
    # the sum over layers is the sum of the listed secondary events' lifetimes
    assert sum(stats["secondary_active_by_layer"]) == 3 + 1 + 2 and stats["events_dropped"] == 2
    assert aggregate([])["secondary_per_1k_tokens"] is None


def test_arms_are_padded_to_the_same_layers():
    found = padded({"none": aggregate([record([event(1, 4)], 100)]), "act": aggregate([record([], 100)])})
    assert found["act"]["secondary_active_by_layer"] == [0] * 5
    assert found["act"]["secondary_active_per_1k_tokens_by_layer"] == [0.0] * 5
    assert response_ids([{"response_id": "cmpl-1"}, {"response_ids": ["cmpl-2", "cmpl-3"]}, {}]) == \
        ["cmpl-1", "cmpl-2", "cmpl-3"]


# -- collection from a stub OpenAI server ------------------------------------------------------
LAYERS = {"none": (1, 3), "act": (2, 1)}  # the secondary sink each arm's requests report: (birth, lifetime)


class Stub(BaseHTTPRequestHandler):
    sinkguard = True
    served: dict[str, str] = {}  # response id -> arm

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        arm = body["model"].split(":")[1]
        response_id = f"cmpl-{len(self.served)}-{arm}"
        self.served[response_id] = arm
        if not body.get("stream"):
            tokens = body["prompt"]
            self._json(200, {"id": response_id, "choices": [{"logprobs": {"token_logprobs": [None] + [-1.0] * len(
                tokens)}}]})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for text in ("4", "2"):
            chunk = {"id": response_id, "choices": [{"text": text, "logprobs": {"token_logprobs": [-0.1],
                                                                                  "top_logprobs": [{text: -0.1}]}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def do_GET(self) -> None:
        if not self.sinkguard:
            self._json(404, {"detail": "Not Found"})
        elif self.path == "/sinkguard/status":
            self._json(401, {"error": {"message": "Unauthorized"}})
        elif self.path.startswith("/sinkguard/requests/"):
            response_id = self.path.split("/")[-1].split("?")[0]
            if response_id not in self.served:
                self._json(404, {"error": {"message": "no record"}})
                return
            arm = self.served[response_id]
            self._json(200, {"request_id": response_id, "requests": [
                record([event(*LAYERS[arm])], prefill=10, decode=2, interventions={"mlp_scale": 1} if arm == "act"
                       else {}) | {"events_total": 1}]})


@pytest.fixture(params=[True, False], ids=["sinkguard", "plain-vllm"])
def stub(request) -> Iterator[str]:
    handler = type("Handler", (Stub,), {"sinkguard": request.param, "served": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", request.param
    server.shutdown()
    server.server_close()


def test_an_evaluation_collects_sink_statistics_per_arm_or_says_why_not(stub, tmp_path):
    url, has_routes = stub
    tasks = [Task("perplexity", "perplexity", [{"id": f"p{i}", "token_ids": [1, 2, 3, 4]} for i in range(3)]),
             Task("generation", "generation", [{"id": "g0", "prompt": "6*7=", "answer": "42"}], max_tokens=2)]
    clients = {arm: ArmClient(url, "smol", arm) for arm in ("none", "act")}
    run = evaluate(clients, tasks, lambda text: [1], "none", concurrency=2, progress=False)
    found = EvalRun.load(run.save(tmp_path / "run.json")).sink_stats
    comparison = compare(run)
    if not has_routes:
        assert found["available"] is False and "404" in found["reason"]
        assert comparison["sink_stats"]["available"] is False
        return
    act = found["arms"]["act"]
    assert act["tasks"]["perplexity"]["records"] == 3 and act["all"]["records"] == 4 and act["all"]["missing"] == 0
    assert act["all"]["tokens_scanned"] == 48 and act["all"]["interventions_applied"] == {"mlp_scale": 4}
    layers = comparison["sink_stats"]["arms"]
    assert layers["none"]["secondary_active_by_layer"] == [0, 4, 4, 4]
    assert layers["act"]["secondary_active_by_layer"] == [0, 0, 4, 0]
    assert run.tasks["generation"]["results"]["act"][0]["correct"]


def test_a_run_saved_before_sink_statistics_still_loads(tmp_path):
    path = tmp_path / "run.json"
    data = EvalRun({}, "none", ["none"], {}).to_dict()
    del data["sink_stats"]
    path.write_text(json.dumps(data))
    assert EvalRun.load(path).sink_stats is None and compare(EvalRun.load(path))["sink_stats"] is None


def test_requests_served_without_their_arms_policy_are_flagged():
    from sinkguard.evaluation.compare import unapplied_warnings
    from sinkguard.evaluation.sink_stats import aggregate

    ran = {"tokens_scanned": {"prefill": 4, "decode": 2}, "sink_counts": {}, "events": [], "applied": True}
    off = {**ran, "applied": False, "unapplied_reason": "detection switched off by the operator"}
    stats = {"arms": {"none": aggregate([ran, ran]), "act": aggregate([ran, off, off])}}
    assert stats["arms"]["act"]["not_applied"] == 2 and stats["arms"]["none"]["not_applied"] == 0
    (warning,) = unapplied_warnings(stats)
    assert warning.startswith("arm act: 2 of 3 requests") and "2x detection switched off" in warning
