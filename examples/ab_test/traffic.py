"""Send simulated user traffic to a sinkguard server running an A/B experiment, then report.

Each simulated user asks a few questions through the plain OpenAI chat endpoint with its ``user``
field set and selects no arm: the server assigns one per user by the weights in serve.json, tags
each answer with ``x-sinkguard-arm`` and logs one line per request. Replace the questions with a
sample of your own traffic.

    python examples/ab_test/traffic.py --server http://127.0.0.1:8000 --model MODEL --users 60
    sinkguard ab report runs/ab/ab.jsonl --html runs/ab/report.html
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor

QUESTIONS = [
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is the difference between a list and a tuple in Python?",
    "Give three tips for writing a clear email.",
    "Why do leaves change colour in autumn?",
    "Explain what an index does in a database.",
    "Translate 'good morning' into French and Spanish.",
]


def ask(server: str, model: str, user: str, question: str, api_key: str | None) -> str:
    """One chat request; returns the arm the server assigned (the x-sinkguard-arm header)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 64,
            "temperature": 0.0, "user": user}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(server.rstrip("/") + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=600) as response:
        return response.headers["x-sinkguard-arm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the served model name (not an arm name)")
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--turns", type=int, default=2, help="questions per user")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    jobs = [(f"user-{u}", QUESTIONS[(u + t) % len(QUESTIONS)]) for u in range(args.users) for t in range(args.turns)]
    key = os.environ.get("VLLM_API_KEY")
    with ThreadPoolExecutor(args.concurrency) as pool:
        arms = list(pool.map(lambda job: ask(args.server, args.model, *job, key), jobs))
    print(f"{len(jobs)} requests from {args.users} users; arms assigned: {dict(collections.Counter(arms))}")


if __name__ == "__main__":
    main()
