"""The live A/B experiment in a real server: the split follows the weights, users stay on their arm,
overrides win, the assigned arm's policy runs, every request is logged exactly once with its sink
counts and mean log-probability, per-arm metrics reach /metrics, and bad input is a 400."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from scipy.stats import chisquare

from sinkguard.engines.vllm.server import http_json
from sinkguard.serving.ab import assign, read_log
from sinkguard.serving.settings import ABConfig, ServeConfig

API_KEY = "sk-ab-test"
AB = ABConfig(arms={"none": 2, "act": 1, "remove": 1}, sticky="user", seed=7)
USERS = 240


class Client:
    """Requests to the experiment's server; remembers every request that reached vLLM."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.reached: list[str] = []  # response ids of answered requests
        self._lock = threading.Lock()

    def post(self, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                raw, status, got = response.read(), response.status, dict(response.headers)
        except urllib.error.HTTPError as exc:
            raw, status, got = exc.read(), exc.code, dict(exc.headers)
        got = {k.lower(): v for k, v in got.items()}
        if body.get("stream"):
            events = [json.loads(line[5:]) for line in raw.decode().splitlines()
                      if line.startswith("data:") and line.strip() != "data: [DONE]"]
            answer = {"id": events[0]["id"], "events": events} if status == 200 else json.loads(raw)
        else:
            answer = json.loads(raw)
        if status == 200:
            with self._lock:
                self.reached.append(answer["id"])
        return status, answer, got

    def complete(self, prompt, headers: dict | None = None, **fields) -> tuple[int, dict, dict]:
        return self.post("/v1/completions", {"model": "smol", "prompt": prompt, "max_tokens": 4,
                                             "temperature": 0.0, **fields}, headers)


@pytest.fixture(scope="module")
def experiment(hf_model, served_profile, tmp_path_factory):
    from harness.served_policies import POLICIES

    from sinkguard.engines.vllm.launch import free_port, prepare_launch
    from sinkguard.engines.vllm.server import RunningServer

    folder = tmp_path_factory.mktemp("ab")
    ab = AB.model_copy(update={"log": str(folder / "ab.jsonl")})
    policy_file = folder / "policies.json"  # the session's policies, and clients may send their own
    policy_file.write_text(json.dumps({**POLICIES, "allow_inline": True}))
    config = ServeConfig(profile=str(served_profile[0]), policies=str(policy_file), ab=ab)
    launch = prepare_launch(hf_model.source.path, config, "smol", port=free_port(),
                            extra_args=["--max-model-len", "2048", "--seed", "0", "--dtype", "float32",
                                        "--api-key", API_KEY], workdir=folder)
    with RunningServer(launch) as running:
        running.wait_ready(timeout=600)
        running.log = folder / "ab.jsonl"
        running.client = Client(running.base_url)
        yield running


@pytest.fixture(scope="module")
def split(experiment) -> dict[str, str]:
    """One request per user, 16 in flight: user -> the arm the server tagged."""
    client = experiment.client

    def one(user: str) -> str:
        status, _, headers = client.complete(f"Hello {user}, how", user=user)
        assert status == 200
        return headers["x-sinkguard-arm"]

    users = [f"user-{i}" for i in range(USERS)]
    with ThreadPoolExecutor(16) as pool:
        return dict(zip(users, pool.map(one, users)))


def wait_for_log(experiment, count: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = read_log(experiment.log) if experiment.log.exists() else []
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_traffic_splits_by_weight_and_users_stay_on_their_arm(experiment, split):
    assert split == {user: assign(AB, user)[0] for user in split}  # the documented hash, in the server
    counts = [sum(arm == a for arm in split.values()) for a in AB.arms]
    total = sum(AB.arms.values())
    assert chisquare(counts, [USERS * w / total for w in AB.arms.values()]).pvalue > 0.001
    for user in list(split)[:12]:  # again, later, with another prompt
        assert experiment.client.complete("Another question", user=user)[2]["x-sinkguard-arm"] == split[user]


def test_explicit_arms_win_and_bad_ones_are_refused(experiment, split):
    client = experiment.client
    user = next(u for u, arm in split.items() if arm == "none")
    assert client.complete("Hi", {"x-sinkguard-arm": "remove"}, user=user)[2]["x-sinkguard-arm"] == "remove"
    assert client.post("/v1/completions", {"model": "smol:act", "prompt": "Hi", "max_tokens": 2, "user": user}
                       )[2]["x-sinkguard-arm"] == "act"
    status, body, _ = client.complete("Hi", {"x-sinkguard-arm": "nope"})
    assert status == 400 and "'nope' is not a configured policy" in body["error"]["message"]
    status, body, _ = client.post("/v1/completions", {"model": "smol:act", "prompt": "Hi", "max_tokens": 2},
                                  {"x-sinkguard-arm": "remove"})
    assert status == 400 and "name one" in body["error"]["message"]
    assert client.complete("Still serving", user=user)[0] == 200


def test_the_assigned_arm_runs_its_policy(experiment, split, online_prompts):
    client = experiment.client
    user = next(u for u, arm in split.items() if arm == "act")
    prompt = online_prompts[0]
    _, assigned, headers = client.complete(prompt, user=user, logprobs=1, max_tokens=6)
    _, named, _ = client.post("/v1/completions", {"model": "smol:act", "prompt": prompt, "max_tokens": 6,
                                                  "temperature": 0.0, "logprobs": 1})
    _, control, _ = client.post("/v1/completions", {"model": "smol:none", "prompt": prompt, "max_tokens": 6,
                                                    "temperature": 0.0, "logprobs": 1})
    logprobs = [r["choices"][0]["logprobs"]["token_logprobs"] for r in (assigned, named, control)]
    assert headers["x-sinkguard-arm"] == "act"
    assert logprobs[0] == pytest.approx(logprobs[1], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(logprobs[0], logprobs[2])) > 1e-3


def test_streamed_chat_is_tagged_timed_and_stripped(experiment, split):
    client = experiment.client
    user = next(iter(split))
    status, answer, headers = client.post("/v1/chat/completions", {
        "model": "smol", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 5,
        "temperature": 0.0, "stream": True, "user": user})
    assert status == 200 and headers["x-sinkguard-arm"] == split[user]
    assert not any(c.get("logprobs") for e in answer["events"] for c in e["choices"])  # the client asked for none
    row = next(r for r in wait_for_log(experiment, len(client.reached)) if r["response_id"] == answer["id"])
    assert row["stream"] and row["ttft_s"] is not None and 0 < row["ttft_s"] <= row["latency_s"]
    assert row["mean_logprob"] is not None and row["mean_logprob"] <= 0 and row["completion_tokens"] >= 1
    assert "prompt" not in row  # log_prompts is off


def test_every_request_is_logged_once_with_its_counts(experiment, split):
    client = experiment.client
    _, answer, _ = client.complete("The capital of France is", user="logger", logprobs=1, max_tokens=6)
    rows = wait_for_log(experiment, len(client.reached))
    ids = [r["response_id"] for r in rows]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(client.reached)  # refused requests never reached
    by_id = {r["response_id"]: r for r in rows}
    mine = by_id[answer["id"]]
    asked = answer["choices"][0]["logprobs"]["token_logprobs"]
    assert mine["mean_logprob"] == pytest.approx(sum(asked) / len(asked), abs=1e-6)
    assert mine["completion_tokens"] == 6 and mine["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert mine["ttft_s"] is None and 0 < mine["latency_s"] and not mine["stream"]
    assert {r["arm"] for r in rows} == {"none", "act", "remove"}
    arms_of_user: dict[str, set[str]] = {}
    for row in rows:
        if row["assignment"] == "sticky":
            arms_of_user.setdefault(row["user"], set()).add(row["arm"])
    assert len(arms_of_user) == USERS + 1 and all(len(arms) == 1 for arms in arms_of_user.values())
    for row in rows[:40]:  # the counts are the record's
        status, record = http_json(f"{experiment.base_url}/sinkguard/requests/{row['response_id']}",
                                   headers={"Authorization": f"Bearer {API_KEY}"})
        assert status == 200
        (only,) = record["requests"]
        assert row["secondary_sinks"] == only["sink_counts"]["secondary"]
        assert row["interventions"] == sum(only["interventions_applied"].values())
        assert row["policy"] == only["policy"] == row["arm"]
    assert any(r["interventions"] for r in rows if r["arm"] == "remove")


def test_per_arm_metrics_and_the_report_agree_with_the_log(experiment, split, tmp_path):
    from sinkguard.cli.main import main

    rows = wait_for_log(experiment, len(experiment.client.reached))
    with urllib.request.urlopen(experiment.base_url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    for arm in AB.arms:
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("sinkguard:ab_requests_total{") and f'arm="{arm}"' in line)
        assert counted == sum(r["arm"] == arm for r in rows)
    assert main(["ab", "report", str(experiment.log), "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["requests"] == len(rows) and set(report["comparisons"]) == {"act", "remove"}


def test_a_real_prometheus_scrapes_the_per_arm_metrics(experiment, tmp_path):
    """Debian's Prometheus scrapes /metrics; its per-arm request counts equal the log's."""
    import shutil
    import subprocess
    import urllib.parse

    from sinkguard.engines.vllm.launch import free_port

    binary = shutil.which("prometheus")
    if binary is None:  # a missing Prometheus is a set-up failure, not a reason to pass
        pytest.fail("prometheus is not installed: run scripts/setup.sh (apt-get install -y prometheus)")
    rows = wait_for_log(experiment, len(experiment.client.reached))
    expected = {arm: sum(r["arm"] == arm for r in rows) for arm in AB.arms}
    target = experiment.base_url.split("//", 1)[1]
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: sinkguard, static_configs: [{{targets: ['{target}']}}]}}]\n")
    port = free_port()
    query = urllib.parse.quote("sum by (arm) (sinkguard:ab_requests_total)")
    seen: dict[str, float] = {}
    with open(tmp_path / "prometheus.log", "wb") as log:
        process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={tmp_path / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 90
            while seen != expected and time.monotonic() < deadline:
                time.sleep(1)
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={query}",
                                                timeout=5) as response:
                        result = json.loads(response.read())["data"]["result"]
                except OSError:
                    continue  # not up yet
                seen = {item["metric"]["arm"]: int(float(item["value"][1])) for item in result}
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert seen == expected, (tmp_path / "prometheus.log").read_text()[-2000:]


def greedy(experiment, prompts: list, model: str = "smol:none") -> tuple[list[str], list[float]]:
    """Each prompt's greedy continuation under an arm, and its tokens' log-probabilities."""
    answers = [experiment.client.post("/v1/completions", {"model": model, "prompt": p, "max_tokens": 8,
                                                         "temperature": 0.0, "logprobs": 1}) for p in prompts]
    assert all(status == 200 for status, _, _ in answers), answers
    return ([a["choices"][0]["text"] for _, a, _ in answers],
            [x for _, a, _ in answers for x in a["choices"][0]["logprobs"]["token_logprobs"]])


def test_one_clients_policy_cannot_poison_other_tenants_or_hold_the_server(experiment, online_prompts):
    """Non-finite or unbounded parameters and stacked edits are refused at once (400 naming the field or
    the budget); the largest allowed values serve; other tenants' greedy outputs do not change."""
    client = experiment.client
    prompts = online_prompts[20:24]
    before = greedy(experiment, prompts)

    def inline(interventions: str) -> tuple[int, dict, float]:
        start = time.monotonic()
        status, body, _ = client.post("/v1/completions", {"model": "smol", "prompt": online_prompts[21],
                                                          "max_tokens": 8, "temperature": 0.0, "vllm_xargs": {
                                                              "sinkguard_inline_policy": interventions}})
        return status, body, time.monotonic() - start

    stacked = json.dumps({"interventions": [{"kind": "first_token_scaling", "gamma": round(0.5 + i / 1000, 3)}
                                            for i in range(200)]})
    for sent, named in (('{"interventions": [{"kind": "mlp_norm_clamp", "target_norm": Infinity}]}', "target_norm"),
                        ('{"interventions": [{"kind": "mlp_norm_clamp", "target_norm": 1e39}]}', "target_norm"),
                        ('{"interventions": [{"kind": "mlp_norm_clamp", "relative_norm": NaN}]}', "relative_norm"),
                        (stacked, "budget.max_interventions"),
                        (json.dumps({"interventions": [{"kind": "first_token_scaling", "gamma": 0.4},
                                                       {"kind": "first_token_scaling", "gamma": 0.6}]}),
                         "budget.attention_share"),
                        ('{"interventions": [{"kind": "mlp_projection_removal", "alpha": true}]}', "alpha"),
                        ("{}", "at least one intervention")):
        status, body, seconds = inline(sent)
        assert status == 400 and named in body["error"]["message"] and seconds < 10, (sent[:60], body)
    for allowed in ('{"interventions": [{"kind": "mlp_norm_clamp", "target_norm": 10000}]}',
                    '{"interventions": [{"kind": "mlp_norm_clamp", "relative_norm": 100, "layers": [0, 1, 2, 3]}]}',
                    '{"interventions": [{"kind": "mlp_norm_clamp", "target_norm": 0}]}'):
        status, body, _ = inline(allowed)
        assert status == 200 and body["choices"][0]["text"], body
    texts, logprobs = greedy(experiment, prompts)
    assert texts == before[0] and logprobs == pytest.approx(before[1], abs=1e-4)  # a prefix-cache hit may round


def test_an_arm_that_cannot_run_says_so_and_is_not_compared(experiment, split, tmp_path):
    """With the detector off, a request for arm act is served without its interventions: the response,
    its record and the A/B log say so, and the report counts it instead of comparing it to none."""
    from sinkguard.cli.main import main

    client = experiment.client
    admin = {"Authorization": f"Bearer {API_KEY}"}  # no admin token: the API key administers
    user = next(u for u, arm in split.items() if arm == "act")
    try:
        assert http_json(experiment.base_url + "/sinkguard/detection", {"enabled": False}, headers=admin)[0] == 200
        status, off, headers = client.complete("The sky is", user=user)
        assert status == 200 and headers["x-sinkguard-arm"] == "act" and headers["x-sinkguard-applied"] == "false"
        assert "switched off" in headers["x-sinkguard-unapplied-reason"]
        status, plain, headers = client.complete("The sky is", user=next(u for u, a in split.items() if a == "none"))
        assert status == 200 and "x-sinkguard-applied" not in headers  # none has nothing to run
    finally:
        assert http_json(experiment.base_url + "/sinkguard/detection", {"enabled": True}, headers=admin)[0] == 200
    status, on, headers = client.complete("The sky is", user=user)
    assert status == 200 and "x-sinkguard-applied" not in headers
    rows = {r["response_id"]: r for r in wait_for_log(experiment, len(client.reached))}
    assert rows[off["id"]]["applied"] is False and "switched off" in rows[off["id"]]["unapplied_reason"]
    assert rows[on["id"]]["applied"] is True and rows[on["id"]]["policy"] == "act"
    assert rows[plain["id"]]["applied"] is True
    status, record = http_json(f"{experiment.base_url}/sinkguard/requests/{on['id']}", headers=admin)
    assert status == 200 and record["requests"][0]["applied"] and record["requests"][0]["unapplied_reason"] is None
    assert main(["ab", "report", str(experiment.log), "--json", str(tmp_path / "report.json")]) == 0
    act = json.loads((tmp_path / "report.json").read_text())["arms"]["act"]
    assert act["not_applied"] >= 1 and act["compared"] == act["requests"] - act["not_applied"] - act["errors"] \
        - act["abandoned"]


def test_the_log_has_engine_requests_only_marks_disconnects_and_counts_stream_prompts(experiment, split):
    import http.client

    client = experiment.client
    logged = len(wait_for_log(experiment, len(client.reached)))
    user = next(iter(split))
    assert client.post("/v1/completions", {"model": "elsewhere", "prompt": "Hi", "user": user})[0] == 404
    assert client.complete("Hi", user=12345)[0] == 400  # vLLM's own validation: never reached the engine
    status, streamed, _ = client.complete("Count to ten:", user=user, stream=True, max_tokens=6)
    status, whole, _ = client.complete("Count to ten:", user=user, max_tokens=6)
    host, port = experiment.base_url.split("//", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    connection.request("POST", "/v1/completions", json.dumps({
        "model": "smol", "prompt": "Write a long story:", "max_tokens": 400, "stream": True, "user": user}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    response = connection.getresponse()
    first = response.readline()
    left = json.loads(first[5:])["id"] if first.startswith(b"data:") else None
    connection.close()  # the client leaves mid-stream
    rows = wait_for_log(experiment, logged + 3)
    new = {r["response_id"]: r for r in rows[logged:]}
    assert set(new) == {streamed["id"], whole["id"], left}, new  # the 404 and the 400 are not in the log
    assert new[streamed["id"]]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert new[left]["abandoned"] is True and new[left]["status"] == 200
    assert not new[whole["id"]].get("abandoned") and not new[streamed["id"]].get("abandoned")


def test_the_examples_traffic_script_drives_the_experiment(experiment):
    """examples/ab_test/traffic.py, as a user runs it, against this server (runs last: it adds requests)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    before = len(wait_for_log(experiment, len(experiment.client.reached)))
    script = Path(__file__).resolve().parents[2] / "examples" / "ab_test" / "traffic.py"
    done = subprocess.run([sys.executable, str(script), "--server", experiment.base_url, "--model", "smol",
                           "--users", "6", "--turns", "2"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_API_KEY": API_KEY})
    assert done.returncode == 0, done.stderr
    assert "12 requests from 6 users" in done.stdout
    rows = wait_for_log(experiment, before + 12)[before:]
    hashed = {hashlib.sha256(f"{AB.seed}\0user-{u}".encode()).hexdigest()[:16]: f"user-{u}" for u in range(6)}
    assert len(rows) == 12 and {r["user"] for r in rows} == set(hashed)
    assert all(r["arm"] == assign(AB, hashed[r["user"]])[0] and r["assignment"] == "sticky" for r in rows)
