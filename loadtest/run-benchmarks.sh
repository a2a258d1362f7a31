#!/usr/bin/env bash
# Runs the BENCHMARKS.md load scenarios against a release build of the server on this machine,
# each against a fresh server on loopback, and leaves one JSON report per run in $OUT.
# Usage: loadtest/run-benchmarks.sh [out-dir]   (about 6 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmark-results}"
mkdir -p "$OUT"
source loadtest/bench-server.sh

start_server chat1k --sim-reply-tokens 40
"$LOAD" chat "${COMMON[@]}" --sockets 1000 --interval-ms 2200 --duration 20 --json "$OUT/chat-1000.json"

start_server chat10k --sim-reply-tokens 400
"$LOAD" chat "${COMMON[@]}" --sockets 10000 --interval-ms 22000 --duration 30 --json "$OUT/chat-10000.json"

start_server debate --sim-reply-tokens 40
"$LOAD" debate "${COMMON[@]}" --members 1000 --rounds 2 --turn-tokens 40 --threads 2 --json "$OUT/debate-1000.json"

start_server translation --sim-reply-tokens 40
"$LOAD" translation "${COMMON[@]}" --members 30 --languages 3 --interval-ms 3000 --duration 20 --json "$OUT/translation-30.json"

# 19,500 idle sockets: this machine caps open files at 20,000 per process (hard limit).
start_server idle
"$LOAD" idle "${COMMON[@]}" --sockets 19500 --hold 5 --json "$OUT/idle-19500.json"

start_server schedule
"$LOAD" schedule "${COMMON[@]}" --users 50 --per-user 100 --lead-ms 8000 --json "$OUT/schedule-5000.json"
echo "reports in $OUT"
