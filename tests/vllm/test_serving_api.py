"""The HTTP surface of a production server: no cross-request leaks, access like vLLM's own, paged
records, request-option validation on every endpoint that takes vllm_xargs, n > 1 samples."""

from __future__ import annotations

import json
import urllib.request

import pytest

from sinkguard.engines.vllm.server import http_json


def ask(server, path: str, headers: dict | None = None) -> tuple[int, dict]:
    return http_json(server.base_url + path, headers=headers)


def completion(server, prompt: list[int], **extra) -> dict:
    status, body = http_json(server.base_url + "/v1/completions", {
        "model": "smol", "prompt": prompt, "max_tokens": 8, "temperature": 0.0, **extra}, headers=server.user_headers)
    assert status == 200, body
    return body


@pytest.fixture(scope="module")
def answered(server, online_prompts, engine_outputs) -> dict:
    """A request whose record has several events (the prompt with the most in the offline engine's run)."""
    richest = max(range(len(online_prompts)), key=lambda i: len(engine_outputs["records"][i][0]["events"]))
    return completion(server, online_prompts[richest], max_tokens=12)


def test_records_need_the_api_key(server, answered):
    path = f"/sinkguard/requests/{answered['id']}"
    assert ask(server, path)[0] == 401
    assert ask(server, path, {"Authorization": "Bearer wrong"})[0] == 401
    assert ask(server, path, {"Authorization": f"Basic {server.user_headers['Authorization'][7:]}"})[0] == 401
    assert ask(server, path, server.user_headers)[0] == 200
    assert ask(server, path, server.admin_headers)[0] == 200  # the operator may read records too


def test_status_and_switch_need_the_admin_token(server):
    for headers in (None, server.user_headers):  # with an admin token set, the API key is not enough
        assert ask(server, "/sinkguard/status", headers)[0] == 401
        assert http_json(server.base_url + "/sinkguard/detection", {"enabled": False}, headers=headers)[0] == 401
    status, body = ask(server, "/sinkguard/status", server.admin_headers)
    assert status == 200 and body["enabled"] and body["workers"][0]["runtime"]


def test_lookups_match_ids_exactly(server, answered, online_prompts):
    response_id = answered["id"]
    for guess in ("cmpl", "cmpl-", response_id[:8], response_id[:-1], response_id + "x", response_id + "-0"):
        status, body = ask(server, f"/sinkguard/requests/{guess}", server.user_headers)
        assert status == 404, (guess, body)
    request = urllib.request.Request(server.base_url + "/v1/completions", data=b'{"model": "smol", "prompt": [1, 2, '
                                     b'3], "max_tokens": 2}', headers={"Content-Type": "application/json",
                                                                      "X-Request-Id": "tenant-a-7",
                                                                      **server.user_headers})
    with urllib.request.urlopen(request) as response:
        assert response.status == 200
    assert ask(server, "/sinkguard/requests/tenant-a-7", server.user_headers)[0] == 200
    assert ask(server, "/sinkguard/requests/tenant-a", server.user_headers)[0] == 404
    assert ask(server, "/sinkguard/requests/tenant", server.user_headers)[0] == 404


def test_events_are_paged_and_pages_bounded(server, answered):
    status, body = ask(server, f"/sinkguard/requests/{answered['id']}", server.user_headers)
    record = body["requests"][0]
    assert record["events_total"] >= 2, record  # the reference and at least one more flagged token
    status, page = ask(server, f"/sinkguard/requests/{answered['id']}?offset=1&limit=1", server.user_headers)
    assert status == 200 and page["requests"][0]["events"] == [record["events"][1]]
    for query in ("limit=0", "limit=100000", "offset=-1", "limit=ten"):
        status, body = ask(server, f"/sinkguard/requests/{answered['id']}?{query}", server.user_headers)
        assert status == 400 and ("limit" in body["error"]["message"] or "offset" in body["error"]["message"])


def test_every_sample_of_n_gets_its_own_record(server, online_prompts):
    # no per-request seed: vLLM 0.32's CPU runner crashes its engine on seeded sampling after a
    # chunked prefill ("CPU Generator does not use offset")
    body = completion(server, online_prompts[11], n=2, temperature=1.0)
    status, found = ask(server, f"/sinkguard/requests/{body['id']}", server.user_headers)
    records = found["requests"]
    assert status == 200 and [r["sample_index"] for r in records] == [0, 1]
    assert len({r["request_id"] for r in records}) == 2
    for record, choice in zip(records, sorted(body["choices"], key=lambda c: c["index"])):
        assert record["tokens_scanned"]["prefill"] == len(online_prompts[11])
        assert record["tokens_scanned"]["decode"] >= 1


BAD_XARGS = {"sinkguard_max_events": "many"}
ENDPOINTS = {
    "/v1/completions": {"model": "smol", "prompt": "Hello", "max_tokens": 2},
    "/v1/chat/completions": {"model": "smol", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2},
    "/v1/responses": {"model": "smol", "input": "Hello", "max_output_tokens": 2},
    "/v1/messages": {"model": "smol", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2},
}


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_request_options_are_validated_on_every_endpoint(server, path):
    payload = ENDPOINTS[path]
    status, body = http_json(server.base_url + path, {**payload, "vllm_xargs": BAD_XARGS}, headers=server.user_headers)
    assert status == 400 and "sinkguard_max_events" in body["error"]["message"], body
    status, body = http_json(server.base_url + path, {**payload, "vllm_xargs": {"sinkguard_detect": True}},
                             headers=server.user_headers)
    assert status == 200, body  # the endpoint exists and a valid option passes


def test_unknown_policy_gets_400_naming_it(server, online_prompts):
    status, body = http_json(server.base_url + "/v1/completions", {
        "model": "smol", "prompt": online_prompts[0], "max_tokens": 2, "vllm_xargs": {"sinkguard_policy": "nope"}},
        headers=server.user_headers)
    assert status == 400 and "unknown policy 'nope'" in body["error"]["message"], body
    assert completion(server, online_prompts[0], vllm_xargs={"sinkguard_policy": "none"})["choices"]


def test_a_selected_policy_acts_and_is_recorded_and_counted(server, online_prompts):
    body = completion(server, online_prompts[3], vllm_xargs={"sinkguard_policy": "act"})
    status, found = ask(server, f"/sinkguard/requests/{body['id']}", server.user_headers)
    record = found["requests"][0]
    assert status == 200 and record["policy"] == "act"
    assert record["interventions_applied"].get("attention_redistribution", 0) > 0, record
    with urllib.request.urlopen(server.base_url + "/metrics") as response:
        metrics = response.read().decode()
    assert any(line.startswith("sinkguard:interventions_applied_total{") and 'policy="act"' in line
               and 'intervention="attention_redistribution"' in line and float(line.rsplit(" ", 1)[1]) > 0
               for line in metrics.splitlines())


def test_inline_policies_are_refused_unless_the_operator_allows_them(server, online_prompts):
    inline = '{"interventions": [{"kind": "attention_redistribution", "beta": 0.0, "layers": [4]}]}'
    status, body = http_json(server.base_url + "/v1/completions", {
        "model": "smol", "prompt": online_prompts[0], "max_tokens": 2,
        "vllm_xargs": {"sinkguard_inline_policy": inline}}, headers=server.user_headers)
    assert status == 400 and "inline policies are disabled" in body["error"]["message"], body
    assert completion(server, online_prompts[0])["choices"]  # and the server goes on serving


def test_operator_can_switch_detection_off_and_on(server, online_prompts):
    try:
        status, body = http_json(server.base_url + "/sinkguard/detection", {"enabled": False},
                                 headers=server.admin_headers)
        assert status == 200 and body == {"enabled": False, "workers": [False]}
        plain = completion(server, online_prompts[12])
        assert ask(server, f"/sinkguard/requests/{plain['id']}", server.user_headers)[0] == 404  # not observed
    finally:
        status, body = http_json(server.base_url + "/sinkguard/detection", {"enabled": True},
                                 headers=server.admin_headers)
    assert status == 200 and body["enabled"]
    observed = completion(server, online_prompts[12])
    assert ask(server, f"/sinkguard/requests/{observed['id']}", server.user_headers)[0] == 200
    assert http_json(server.base_url + "/sinkguard/detection", {"enabled": "yes"},
                     headers=server.admin_headers)[0] == 400


def test_arms_are_model_names_any_client_can_pick(server, online_prompts):
    status, listing = http_json(server.base_url + "/v1/models", headers=server.user_headers)
    ids = [m["id"] for m in listing["data"]]
    assert status == 200 and {"smol", "smol:none", "smol:act", "smol:remove"} <= set(ids), ids
    request = urllib.request.Request(server.base_url + "/v1/completions", headers={
        **server.user_headers, "Content-Type": "application/json"}, data=json.dumps({
            "model": "smol:act", "prompt": online_prompts[3], "max_tokens": 8, "temperature": 0.0}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["x-sinkguard-arm"] == "act"
        body = json.loads(response.read())
    assert body["model"] == "smol"
    status, found = ask(server, f"/sinkguard/requests/{body['id']}", server.user_headers)
    assert found["requests"][0]["policy"] == "act"
    # the same tokens as selecting the policy through vllm_xargs
    same = completion(server, online_prompts[3], vllm_xargs={"sinkguard_policy": "act"})
    assert same["choices"][0]["text"] == body["choices"][0]["text"]


def test_hostile_bodies_get_a_400_and_the_connection_keeps_serving(server, online_prompts):
    """Nested JSON (body or vllm_xargs), vllm_xargs of the wrong type, coerced types and an unknown arm:
    HTTP 400 naming the problem, no traceback, and the next request on the same connection is served."""
    import http.client

    host, port = server.base_url.split("//", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {**server.user_headers, "Content-Type": "application/json"}
    prompt = json.dumps(online_prompts[0]).encode()
    hostile = [
        (b'{"model": "smol", "max_tokens": 2, "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper"),
        (b'{"model": "smol", "prompt": ' + prompt + b', "vllm_xargs": {"x": ' + b"[" * 3000 + b"]" * 3000 + b"}}",
         "nested deeper"),
        (b'{"model": "smol", "prompt": ' + prompt + b', "vllm_xargs": ["sinkguard_detect"]}', "vllm_xargs must be"),
        (b'{"model": "smol", "prompt": ' + prompt + b', "vllm_xargs": "sinkguard_detect"}', "vllm_xargs must be"),
        (b'{"model": "smol", "prompt": ' + prompt + b', "vllm_xargs": {"sinkguard_detect": "yes"}}',
         "sinkguard_detect"),
        (b'{"model": "smol", "prompt": ' + prompt + b', "vllm_xargs": {"sinkguard_max_events": "10"}}',
         "sinkguard_max_events"),
        (b'{"model": "smol:nope", "prompt": ' + prompt + b"}", "smol:none, smol:remove"),
    ]
    for body, named in hostile:
        connection.request("POST", "/v1/completions", body, headers)
        response = connection.getresponse()
        answer = response.read().decode()
        assert response.status == 400 and named in answer and "Traceback" not in answer, (body[:80], answer[:300])
        connection.request("POST", "/v1/completions", json.dumps({
            "model": "smol", "prompt": online_prompts[0], "max_tokens": 2, "temperature": 0.0}).encode(), headers)
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["choices"]
    connection.close()


def test_admin_routes_take_the_scheme_in_any_case_like_v1(server):
    token = server.admin_headers["Authorization"].split(" ", 1)[1]
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert ask(server, "/sinkguard/status", {"Authorization": f"{scheme} {token}"})[0] == 200, scheme
    assert http_json(server.base_url + "/v1/models", headers={
        "Authorization": "bearer " + server.user_headers["Authorization"].split(" ", 1)[1]})[0] == 200

