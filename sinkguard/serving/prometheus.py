"""Prometheus metrics with the ``sinkguard:`` prefix (vLLM uses ``vllm:``).

They are updated in the worker process. vLLM's ``/metrics`` lives in the API server process, so
the two meet through prometheus_client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` must be
set (to a fresh, empty folder) before the server starts; ``sinkguard serve`` does this. Only
counters and histograms are used: they aggregate correctly across processes.
"""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Histogram


class SinkMetrics:
    def __init__(self) -> None:
        self.tokens_scanned = Counter(
            "sinkguard:tokens_scanned", "Tokens run through the online sink detector.",
            ["model_name", "phase"],
        )
        self.sinks_detected = Counter(
            "sinkguard:sinks_detected", "Flagged tokens by kind and birth layer (the reference excluded).",
            ["model_name", "kind", "birth_layer"],
        )
        self.requests_finished = Counter(
            "sinkguard:requests_finished", "Requests whose sink record was closed.", ["model_name"],
        )
        self.interventions_applied = Counter(
            "sinkguard:interventions_applied", "Token edits by policy and intervention (one per token and layer).",
            ["model_name", "policy", "intervention"],
        )
        self.faults = Counter(
            "sinkguard:faults", "Detector faults by stage; each faulted step was served unobserved (fail-open).",
            ["model_name", "stage"],
        )
        self.detector_seconds = Histogram(
            "sinkguard:detector_seconds", "Detector time per engine step (hooks + detection).",
            ["model_name"], buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0),
        )


@lru_cache(maxsize=1)
def sink_metrics() -> SinkMetrics:
    """Process-wide metrics (created once: prometheus_client refuses duplicate names)."""
    return SinkMetrics()


class ABMetrics:
    """Per-arm metrics of a live A/B experiment, updated in the API server process (where the
    experiment's middleware runs) and exported on the same ``/metrics``."""

    def __init__(self) -> None:
        labels = ["model_name", "arm"]
        self.requests = Counter("sinkguard:ab_requests", "A/B requests by arm and how the arm was chosen.",
                                [*labels, "assignment"])
        self.latency = Histogram("sinkguard:ab_request_latency_seconds", "End-to-end latency per arm.", labels,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("sinkguard:ab_time_to_first_token_seconds", "Time to first token per arm (streamed).",
                              labels, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.generated_tokens = Counter("sinkguard:ab_generated_tokens", "Generated tokens per arm.", labels)
        self.mean_logprob = Histogram("sinkguard:ab_mean_logprob", "Mean log-probability of a request's generated "
                                      "tokens, per arm.", labels,
                                      buckets=(-8, -4, -3, -2, -1.5, -1, -0.75, -0.5, -0.25, -0.1, -0.01, 0))
        self.secondary_sinks = Counter("sinkguard:ab_secondary_sinks", "Secondary sinks flagged per arm.", labels)
        self.interventions = Counter("sinkguard:ab_interventions", "Intervention edits per arm.", labels)


@lru_cache(maxsize=1)
def ab_metrics() -> ABMetrics:
    return ABMetrics()
