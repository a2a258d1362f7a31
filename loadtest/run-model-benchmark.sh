#!/usr/bin/env bash
# Parley's added latency over a real model server: llama.cpp's server with SmolLM2-135M
# (Sources/ParleySidecar/model-server.py), timed by `parley-load model` straight from the model server
# (--direct, the same prompt Parley sends) and through a release Parley, runs interleaved so
# drift on a noisy machine hits both alike. One JSON report per run in $OUT.
# Replies are capped at 128 tokens on both paths.
# Usage: loadtest/run-model-benchmark.sh [out-dir] [rounds]   (about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmark-results}"
ROUNDS="${2:-3}"
mkdir -p "$OUT"
scripts/setup.sh --model
swift build -c release --product parley
swift build -c release --product parley-load
LOAD=.build/release/parley-load
WORK="$(mktemp -d)"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; rm -rf "$WORK"' EXIT

# wait_for FILE PATTERN: until the server printed its listening line (20 s at most).
wait_for() { for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return; sleep 0.1; done; echo "no '$2' in $1" >&2; exit 1; }

# The model server stops when its stdin closes: give it one that stays open and says nothing.
sleep 1900 | python3 Sources/ParleySidecar/model-server.py --port 0 --max-seconds 1800 > "$WORK/model.out" 2>/dev/null &
PIDS+=($!); MODEL_PID=$!
wait_for "$WORK/model.out" "listening"
MODEL=$(awk '{print $NF}' "$WORK/model.out")/v1
echo '{"models":{"smollm2":{"input_per_1k":0,"output_per_1k":0}}}' > "$WORK/prices.json"
.build/release/parley serve --port 0 --data-dir "$WORK/parley" --log-level warning --provider openai \
    --provider-url "$MODEL" --provider-model smollm2 --prices "$WORK/prices.json" --max-reply-tokens 128 > "$WORK/parley.out" 2>&1 &
PIDS+=($!); PARLEY_PID=$!
wait_for "$WORK/parley.out" "listening"
PORT=$(sed -n 's/.*127.0.0.1:\([0-9]*\).*/\1/p' "$WORK/parley.out" | head -1)

for streams in 1 4; do
    for round in $(seq 1 "$ROUNDS"); do
        "$LOAD" model --direct "$MODEL" --streams "$streams" --requests 10 --max-tokens 128 --server-pid "$MODEL_PID" --secret unused \
            --json "$OUT/model-direct-s$streams-r$round.json" | grep -E "time_to_first|inter_token|errors"
        "$LOAD" model --port "$PORT" --secret-file "$WORK/parley/jwt-secret" --streams "$streams" --requests 10 \
            --server-pid "$PARLEY_PID" --user-prefix "r$round-s$streams" --json "$OUT/model-parley-s$streams-r$round.json" \
            | grep -E "time_to_first|inter_token|errors|server:"
    done
done
echo "reports in $OUT"
