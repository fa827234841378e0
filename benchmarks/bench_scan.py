"""Scan benchmark: sinkguard's scanner vs the naive transformers route, same prompt, same run.

Naive route: eager attention with ``output_attentions=True, output_hidden_states=True`` (every
layer's full [H, T, T] attention map and hidden states returned), then the same sink scores and
cosines computed from them. sinkguard route: :func:`sinkguard.offline.scanner.scan_prompt` with attention
scores on (chunked attention, per-layer reduction in hooks).

A third route, ``plain`` (one SDPA forward, nothing recorded), is the floor: what the same
forward costs with no analysis at all.

Each (route, length, run) executes in a fresh subprocess so peak RSS is that measurement's own.
Reported: median wall time of the traced forward + analysis (model load excluded) and median
peak RSS (whole process, model included), plus ratios naive / sinkguard.

    python benchmarks/bench_scan.py --lengths 256 1024 4096 --runs 3 --extra-lengths 8192
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def long_token_ids(model, length: int) -> list[int]:
    from sinkguard.sources.prompts import _builtin_documents

    ids: list[int] = []
    for _name, text in _builtin_documents():
        ids += model.tokenize(text, add_bos=False)
        if len(ids) >= length:
            break
    bos = model.tokenizer.bos_token_id
    return [bos, *ids[: length - 1]]


def run_one(route: str, length: int) -> dict:
    import numpy as np
    import torch

    from sinkguard.core.settings import ScanConfig
    from sinkguard.engines.hf.runner import HFSinkModel

    torch.set_grad_enabled(False)
    model = HFSinkModel.load(None)
    ids = long_token_ids(model, length)
    if route == "plain":
        # The floor: one plain transformers forward (SDPA), no statistics at all.
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(model.source.path, attn_implementation="sdpa")
        del model
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        plain.model(torch.tensor([ids]), use_cache=False)
        elapsed = time.perf_counter() - start
    elif route == "naive":
        from transformers import AutoModelForCausalLM

        naive = AutoModelForCausalLM.from_pretrained(model.source.path, attn_implementation="eager")
        del model
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        out = naive.model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
        votes = torch.arange(length, 0, -1, dtype=torch.float32)
        scores = [a[0].sum(dim=1) / votes for a in out.attentions]  # [H, T] per layer
        hidden = out.hidden_states[1:]
        cos = [torch.nn.functional.cosine_similarity(h[0], h[0, :1], dim=-1) for h in hidden]
        _ = float(sum(s.sum() for s in scores)) + float(sum(c.sum() for c in cos))
        elapsed = time.perf_counter() - start
    else:
        from sinkguard.offline.scanner import scan_prompt

        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        result = scan_prompt(model, ids, ScanConfig())
        _ = np.nansum(result.trace.head_scores)
        elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"route": route, "length": length, "seconds": elapsed, "peak_rss_mb": peak / 1024,
            "baseline_rss_mb": baseline / 1024}


def measure(route: str, length: int) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--child", route, str(length)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {route} T={length} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--extra-lengths", type=int, nargs="*", default=[8192],
                        help="lengths run with sinkguard only (the naive route does not fit in memory)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the raw measurements here")
    parser.add_argument("--child", nargs=2, metavar=("ROUTE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]))))
        return
    rows, raw = [], []
    plan = [(t, ("plain", "naive", "sinkguard")) for t in args.lengths]
    plan += [(t, ("plain", "sinkguard")) for t in args.extra_lengths]
    for length, routes in plan:
        med: dict[str, dict] = {}
        for route in routes:
            runs = [m for m in (measure(route, length) for _ in range(args.runs)) if m]
            raw += runs
            if runs:
                med[route] = {"seconds": statistics.median(r["seconds"] for r in runs),
                              "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)}
            print(f"T={length} {route}: {med.get(route)}", file=sys.stderr)
        rows.append((length, med))
    print("| T | plain forward s | naive s | sinkguard s | naive / sinkguard time | sinkguard / plain time "
          "| naive peak MB | sinkguard peak MB | plain peak MB | naive / sinkguard memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length, med in rows:
        p, n, s = med.get("plain"), med.get("naive"), med.get("sinkguard")

        def cell(d: dict | None, key: str, digits: int = 2) -> str:
            return f"{d[key]:.{digits}f}" if d else "n/a"

        def ratio(a: dict | None, b: dict | None, key: str) -> str:
            return f"{a[key] / b[key]:.1f}x" if a and b else "n/a"

        print(f"| {length} | {cell(p, 'seconds')} | {cell(n, 'seconds')} | {cell(s, 'seconds')} | "
              f"{ratio(n, s, 'seconds')} | {ratio(s, p, 'seconds')} | {cell(n, 'peak_rss_mb', 0)} | "
              f"{cell(s, 'peak_rss_mb', 0)} | {cell(p, 'peak_rss_mb', 0)} | {ratio(n, s, 'peak_rss_mb')} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(raw, handle, indent=1)


if __name__ == "__main__":
    main()
