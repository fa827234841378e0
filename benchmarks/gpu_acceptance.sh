#!/usr/bin/env bash
# sinkguard GPU acceptance: one GPU (H100 class), vLLM 0.32, the embedded model; target < 8 minutes.
# NEVER RUN ON A GPU SO FAR (no GPU lent to this project). Run from the repo root after `make setup`
# (or in an image with sinkguard installed):
#
#   bash benchmarks/gpu_acceptance.sh            # writes logs and acceptance.json under $OUT (or a temp dir)
#
# What it checks (issue 20): plain vLLM in its own defaults vs `sinkguard serve` (what sinkguard changes
# and what it costs), float32 and bfloat16 greedy identity of observe-only vs plain vLLM with the same
# settings, `remove` / `act` / `zero` log-probabilities vs transformers, the throughput ratio, the detector's
# status on FLASH_ATTN and FLASHINFER (detection and MLP policies on both; attention policies refused by
# name on FlashInfer), and no faults. benchmarks/gpu_acceptance.py does the requests; this file starts
# and stops the servers.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}; [ -x "$PY" ] || PY=python
SG=$(dirname "$PY")/sinkguard; [ -x "$SG" ] || SG=sinkguard
W=${OUT:-$(mktemp -d)}; mkdir -p "$W"; cd "$W" || exit 1
export SINKGUARD_ADMIN_TOKEN=acceptance-admin
MODEL=$("$SG" pull-model default | tail -1) || exit 1
"$PY" "$ROOT/benchmarks/gpu_acceptance.py" prepare "$W" || exit 1   # profile, policy files, server configs

COMMON=(--max-model-len 1024 --max-num-seqs 64 --gpu-memory-utilization 0.15)
# Plain vLLM with the settings `sinkguard serve` passes (its own line in the server log names them):
SAME=(--no-async-scheduling --compilation-config '{"cudagraph_mode":"PIECEWISE"}')
plain() {  # port dtype extra-args...
  env -u SINKGUARD_CONFIG VLLM_USE_V2_MODEL_RUNNER=0 "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
    --served-model-name smol --port "$1" --dtype "$2" "${COMMON[@]}" "${@:3}" >"plain-$1.log" 2>&1 &
}
served() {  # port dtype config extra-args...
  "$SG" serve --model default --config "$3" --port "$1" --dtype "$2" "${COMMON[@]}" "${@:4}" >"sinkguard-$1.log" 2>&1 &
}
# Servers share one GPU (0.15 of its memory each); started two at a time to keep compile time bounded.
plain 8001 float32 "${SAME[@]}"; served 8002 float32 sg-policies.json
wait_ready() { for p in "$@"; do
  timeout 300 bash -c "until curl -sf localhost:$p/health >/dev/null; do sleep 2; done" || echo "FAIL start $p"; done; }
wait_ready 8001 8002
plain 8003 bfloat16 "${SAME[@]}"; served 8004 bfloat16 sg-policies.json
env -u SINKGUARD_CONFIG -u VLLM_USE_V2_MODEL_RUNNER "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --served-model-name smol --port 8005 --dtype bfloat16 "${COMMON[@]}" >plain-8005.log 2>&1 &   # vLLM's own defaults
served 8006 bfloat16 sg-mlp.json --attention-backend FLASHINFER
wait_ready 8003 8004 8005 8006
# Attention policies on FlashInfer must be refused at start-up, naming the backend:
timeout 300 "$SG" serve --model default --config sg-policies.json --port 8007 --dtype bfloat16 "${COMMON[@]}" \
  --attention-backend FLASHINFER >sinkguard-8007-refused.log 2>&1
echo "flashinfer + attention policies: exit $? (want non-zero), $(grep -c 'FLASHINFER' sinkguard-8007-refused.log) lines naming FLASHINFER"
grep -hE "Traceback|cudagraph_mode|Using .*backend|FlashAttention version|sinkguard:" plain-*.log sinkguard-*.log \
  | sort | uniq -c | sort -rn | head -40
timeout 420 "$PY" "$ROOT/benchmarks/gpu_acceptance.py" check "$W"; rc=$?
kill $(jobs -p) 2>/dev/null; wait
exit $rc
