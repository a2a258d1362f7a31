#!/usr/bin/env bash
# The speed issue's (#26) goals, each measured by the command BENCHMARKS.md gives for it, against
# a release build of this tree, and read against its target: one table, met or not.
#   burst / paced   loadtest/bench-peers/run.sh burst|paced 1000 (Parley beside the peers, one client)
#   chat            parley-load chat --sockets 1000 --interval-ms 2200 --duration 20, 40-token replies
#   provider        loadtest/run-provider-benchmark.sh 100 3 (a fast fake OpenAI-compatible upstream)
#   10,000 streams  parley-load chat --sockets 10000 --interval-ms 22000 --duration 30, 400-token replies
# Usage: loadtest/run-speed-goals.sh [out-dir]   (about 6 minutes on 2 cores; needs what
# bench-peers/run.sh and run-provider-benchmark.sh need: Go with gorilla/websocket, node-ws, pip websockets)
# Each goal is one run: on a noisy machine run it again and compare ratios, not single figures.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-speed-goals}"
mkdir -p "$OUT"
source loadtest/bench-server.sh

# run.sh's status is its last peer's kill: the rows it printed are checked below instead.
loadtest/bench-peers/run.sh burst 1000 > "$OUT/burst.txt" || true
loadtest/bench-peers/run.sh paced 1000 > "$OUT/paced.txt" || true

start_server chat1k --sim-reply-tokens 40
"$LOAD" chat "${COMMON[@]}" --sockets 1000 --interval-ms 2200 --duration 20 --json "$OUT/chat-1000.json" > /dev/null

start_server chat10k --sim-reply-tokens 400
"$LOAD" chat "${COMMON[@]}" --sockets 10000 --interval-ms 22000 --duration 30 --json "$OUT/chat-10000.json" > /dev/null
kill "$PID" && wait "$PID" 2>/dev/null || true
PID=""

PARLEY_BIN="$SERVER" loadtest/run-provider-benchmark.sh 100 3 > "$OUT/provider.txt"

python3 loadtest/speed-goals.py "$OUT"
