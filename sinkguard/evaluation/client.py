"""An OpenAI-protocol client for evaluating arms behind one sinkguard server, many requests in flight.

Log-likelihoods are read the way lm-evaluation-harness reads them from a completions server
(``echo: true, logprobs: 1, max_tokens: 1``: the prompt's token log-probabilities), so both give
the same numbers for the same arm. Generations stream, so each one yields its time to first token
and time per output token. An arm is selected by its model name (``<served>:<arm>``) or, for
servers without arm names, by ``vllm_xargs``. Every response's ``id`` is kept, so the request's
sink record can be read back from a sinkguard server (``GET /sinkguard/requests/{id}``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sinkguard.errors import SinkguardError

T = TypeVar("T")
R = TypeVar("R")
RECORD_PAGE_EVENTS = 1024  # the server's largest page of events (routes.MAX_PAGE_EVENTS)


class ServerRequestError(SinkguardError):
    """The server answered a request with an error (the message says which and why)."""


@dataclass
class Generation:
    text: str
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    ttft_s: float
    tpot_s: float | None  # (end - first token) / (tokens - 1)
    output_tokens: int
    response_id: str


@dataclass
class PromptLogprobs:
    logprobs: list[float | None]  # every prompt token's, given the ones before (the first is None)
    response_id: str


class ArmClient:
    """Requests to one server on behalf of one arm."""

    def __init__(self, base_url: str, model: str, arm: str, api_key: str | None = None, by_model_name: bool = True,
                 timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.served_model = model
        self.arm = arm
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.by_model_name = by_model_name
        self.timeout = timeout

    def _body(self, **fields: Any) -> dict[str, Any]:
        if self.by_model_name:
            return {"model": f"{self.served_model}:{self.arm}", **fields}
        return {"model": self.served_model, "vllm_xargs": {"sinkguard_policy": self.arm}, **fields}

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ServerRequestError(f"{path} for arm {self.arm!r}: HTTP {exc.code}: {detail}") from None

    def prompt_logprobs(self, prompt: str | list[int]) -> PromptLogprobs:
        """Log-probability of every prompt token given the ones before (the first is None)."""
        body = self._post("/v1/completions", self._body(prompt=prompt, max_tokens=1, echo=True, logprobs=1,
                                                        temperature=0.0))
        logprobs = body["choices"][0]["logprobs"]["token_logprobs"]
        return PromptLogprobs(logprobs[:-1], str(body.get("id", "")))  # the last entry is the generated token

    def _get(self, path: str) -> dict[str, Any] | None:
        """GET ``path`` as JSON; None on 404."""
        request = urllib.request.Request(self.base_url + path, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            detail = exc.read().decode(errors="replace")[:500]
            raise ServerRequestError(f"{path}: HTTP {exc.code}: {detail}") from None

    def has_sink_records(self) -> bool:
        """Whether the server has sinkguard's routes: ``/sinkguard/status`` exists (401 without the
        admin token still means it does); a plain vLLM server answers 404."""
        try:
            return self._get("/sinkguard/status") is not None
        except ServerRequestError:
            return True

    def sink_records(self, response_id: str) -> list[dict[str, Any]] | None:
        """The sink record(s) of a request by its response id (one per sample), every event page
        read; None if the server has no record of it (unknown or evicted)."""
        path = f"/sinkguard/requests/{urllib.parse.quote(response_id, safe='')}"
        first = self._get(f"{path}?limit={RECORD_PAGE_EVENTS}")
        if first is None:
            return None
        records = first["requests"]
        for index, record in enumerate(records):
            while len(record["events"]) < record.get("events_total", 0):
                page = self._get(f"{path}?offset={len(record['events'])}&limit={RECORD_PAGE_EVENTS}")
                more = page["requests"][index]["events"] if page and index < len(page["requests"]) else []
                if not more:
                    break
                record["events"].extend(more)
        return records

    def generate(self, prompt: str | list[int], max_tokens: int, top_logprobs: int = 0,
                 stop: list[str] | None = None) -> Generation:
        """Greedy generation, streamed (for latency), with each token's log-probability."""
        body = self._body(prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
                          logprobs=max(1, top_logprobs), stream_options={"include_usage": True},
                          **({"stop": stop} if stop else {}))
        request = urllib.request.Request(self.base_url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers=self.headers)
        start = time.perf_counter()
        first = None
        text, token_logprobs, tops, response_id, tokens = [], [], [], "", 0
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                for raw in response:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    response_id = chunk.get("id", response_id)
                    if chunk.get("usage"):
                        tokens = int(chunk["usage"].get("completion_tokens", tokens))
                    for choice in chunk.get("choices", []):
                        if choice.get("text") and first is None:
                            first = time.perf_counter()
                        text.append(choice.get("text", ""))
                        logprobs = choice.get("logprobs") or {}
                        token_logprobs += [x for x in logprobs.get("token_logprobs") or [] if x is not None]
                        tops += [dict(t) for t in logprobs.get("top_logprobs") or [] if t]
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ServerRequestError(f"/v1/completions for arm {self.arm!r}: HTTP {exc.code}: {detail}") from None
        end = time.perf_counter()
        first = first or end
        tokens = tokens or len(token_logprobs)
        return Generation("".join(text), token_logprobs, tops, first - start,
                          (end - first) / (tokens - 1) if tokens > 1 else None, tokens, response_id)


def in_parallel(function: Callable[[T], R], items: Iterable[T], concurrency: int, progress: str | None = None
                ) -> list[R]:
    """``function`` over ``items`` with ``concurrency`` requests in flight, results in input order."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(function, item) for item in items]
        if progress:
            from rich.progress import track

            for _ in track(futures, description=progress, transient=True):
                _.result()
        return [f.result() for f in futures]

