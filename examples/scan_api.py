"""Scan a few prompts with the Python API and print every secondary sink.

    .venv/bin/python examples/scan_api.py
"""

from __future__ import annotations

import sinkguard


def main() -> None:
    prompts = [
        "The committee reviewed the proposal and the budget before the vote on the new library.",
        "In the beginning of the project, the team wrote the tests first and the code second. " * 4,
    ]
    result = sinkguard.scan(prompts=prompts, progress=False)
    for prompt in result.prompts:
        for sink in prompt.detection.events:
            if sink.kind == "secondary":
                print(f"prompt {prompt.index}: {sink.token!r} at {sink.position}, born at layer {sink.birth_layer}, "
                      f"lifetime {sink.lifetime}, formed by the layer-{sink.forming_layer} MLP "
                      f"({sink.mlp_norm_ratio:.0f}x the median token, cos {sink.mlp_cos:+.2f}), "
                      f"peak sink score {sink.peak_sink_score:.2f}")
    result.save("runs/example-scan")


if __name__ == "__main__":
    main()
