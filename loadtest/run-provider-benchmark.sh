#!/usr/bin/env bash
# Parley's own CPU per token on the real-provider path, with a fake upstream fast enough that the
# model is not the bound (loadtest/fake-upstream.go: 200 tokens at 100 tokens/s per reply).
# Usage: loadtest/run-provider-benchmark.sh [streams] [requests]   (needs Go: apt-get install golang-go)
# Prints the upstream connections Parley opened, then tokens, server CPU per token, time to first
# token and the inter-token p99 from parley-load's report.
set -euo pipefail
cd "$(dirname "$0")/.."
STREAMS="${1:-100}"
REQUESTS="${2:-3}"
# PARLEY_BIN=<a parley binary> measures that build instead (two builds side by side).
if [ -z "${PARLEY_BIN:-}" ]; then
    swift build -c release --product parley
    PARLEY_BIN=.build/release/parley
fi
swift build -c release --product parley-load
WORK="$(mktemp -d)"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; rm -rf "$WORK"' EXIT
GO111MODULE=off GOCACHE="$WORK/gocache" go build -o "$WORK/fake-upstream" loadtest/fake-upstream.go
"$WORK/fake-upstream" -tokens 200 -rate 100 > "$WORK/upstream.out" &
PIDS+=($!)
for _ in $(seq 1 50); do grep -q listening "$WORK/upstream.out" 2>/dev/null && break; sleep 0.1; done
UP=$(awk '{print $2}' "$WORK/upstream.out")
echo '{"models":{"fake":{"input_per_1k":0,"output_per_1k":0}}}' > "$WORK/prices.json"
"$PARLEY_BIN" serve --port 0 --data-dir "$WORK/parley" --log-level warning --provider openai \
    --provider-url "http://127.0.0.1:$UP/v1" --provider-model fake --prices "$WORK/prices.json" \
    --provider-concurrency 1000 --max-reply-tokens 256 --starting-credits 1000000000000 > "$WORK/parley.out" 2>&1 &
PIDS+=($!); PARLEY_PID=$!
for _ in $(seq 1 100); do grep -q listening "$WORK/parley.out" 2>/dev/null && break; sleep 0.1; done
PORT=$(sed -n 's/.*127.0.0.1:\([0-9]*\).*/\1/p' "$WORK/parley.out" | head -1)
( sleep 4; echo "upstream connections: $(ss -tn state established "( dport = :$UP )" | tail -n +2 | wc -l)" ) &
.build/release/parley-load model --port "$PORT" --secret-file "$WORK/parley/jwt-secret" --server-pid "$PARLEY_PID" \
    --streams "$STREAMS" --requests "$REQUESTS" --max-tokens 256 --json "$WORK/report.json" > /dev/null
python3 - "$WORK/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); L = r["latency"]; c = r["counters"]
print("tokens", c["tokens"], "errors", c["errors"], "server CPU per token %.1f us" % (r["server"]["cpu_s"] * 1e6 / max(1, c["tokens"])),
      "TTFT p50/max", L["time_to_first_token"]["p50_ms"], L["time_to_first_token"]["max_ms"], "ms; inter-token p99", L["inter_token_gap"]["p99_ms"], "ms")
PY
