"""Greedy outputs of sinkguard vs plain vLLM, both in vLLM's default mode, one batch.

Both engines are offline vLLM engines (``tests/harness/offline_engine.py``) given the same 50 prompts
of the built-in text in one ``generate`` call, so the batching is identical; torch.compile and
prefix caching on. sinkguard observes only, or (``--policies``) serves a policy file whose policies
the requests do not select (they are served ``none``: the server runs the MLP edit op). Per dtype:
how many of the greedy continuations are identical, and where the others first differ.

    python benchmarks/default_mode_outputs.py --dtype float32 bfloat16
    python benchmarks/default_mode_outputs.py --dtype float32 bfloat16 --policies benchmarks/policies.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the offline-engine harness

DEFAULT_MODE = {"enforce_eager": False, "enable_prefix_caching": True}


def main() -> None:
    from harness.offline_engine import generate

    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.serving.settings import ServeConfig
    from sinkguard.sources.prompts import default_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--policies", type=Path, help="serve this policy file (requests select none)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/default_mode_outputs.json"))
    args = parser.parse_args()
    model = HFSinkModel.load(None)
    profile, _ = profile_for_model(None)
    folder = Path(tempfile.mkdtemp(prefix="sinkguard-default-outputs-"))
    config = folder / "serve.json"
    policies = str(args.policies.resolve()) if args.policies else None
    config.write_text(ServeConfig(profile=str(profile), metrics=False, policies=policies).model_dump_json())
    bos = model.tokenizer.bos_token_id
    prompts = [[bos, *p.token_ids] for p in default_prompts(lambda t: model.tokenize(t, add_bos=False), count=50,
                                                           tokens=96)]
    results = {}
    for dtype in args.dtype:
        engine = {**DEFAULT_MODE, "dtype": dtype}
        plain = generate(model.source.path, prompts, folder / f"plain-{dtype}", args.max_tokens, engine_args=engine)
        ours = generate(model.source.path, prompts, folder / f"sinkguard-{dtype}", args.max_tokens, config,
                        engine_args=engine)
        divergence = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                      for x, y in zip(plain["tokens"], ours["tokens"])]
        results[dtype] = {"identical": sum(d is None for d in divergence), "of": len(prompts),
                          "first_divergence": [d for d in divergence if d is not None],
                          "compiled": ours["status"]["compiled"], "capture": ours["status"]["capture"],
                          "policies": policies}
        result = results[dtype]
        print(f"{dtype} ({ours['status']['capture']}): {result['identical']} of {len(prompts)} greedy continuations "
              f"identical; first differing token at {sorted(result['first_divergence'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
