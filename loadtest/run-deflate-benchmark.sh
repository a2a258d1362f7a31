#!/usr/bin/env bash
# permessage-deflate's cost and saving (BENCHMARKS.md): the same chat and debate loads with the
# client offering the extension and not, against a release server (deflate on, its default),
# interleaved over ROUNDS so machine noise hits both alike. One JSON report per run in $OUT.
# Usage: loadtest/run-deflate-benchmark.sh [out-dir] [rounds]   (about 3 minutes a round on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmark-results/deflate}"
ROUNDS="${2:-2}"
mkdir -p "$OUT"
swift build -c release --product parley
swift build -c release --product parley-load
SERVER=.build/release/parley
LOAD=.build/release/parley-load
WORK="$(mktemp -d)"
PID=""
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT

# start_server NAME ARGS…: a fresh data directory, simulated replies paced at 20 tokens/s.
start_server() {
    local name="$1"; shift
    [ -n "$PID" ] && kill "$PID" && wait "$PID" 2>/dev/null || true
    "$SERVER" serve --port 0 --data-dir "$WORK/$name" --starting-credits 1000000000000 --log-level warning \
        --sim-ttft-ms 200 --sim-tokens-per-sec 20 "$@" > "$WORK/$name.out" 2>&1 &
    PID=$!
    for _ in $(seq 1 100); do grep -q "listening" "$WORK/$name.out" 2>/dev/null && break; sleep 0.1; done
    PORT=$(sed -n 's/.*127.0.0.1:\([0-9]*\).*/\1/p' "$WORK/$name.out" | head -1)
    COMMON=(--port "$PORT" --secret-file "$WORK/$name/jwt-secret" --server-pid "$PID")
}

for round in $(seq 1 "$ROUNDS"); do
    for mode in plain deflate; do
        flag=()
        [ "$mode" = deflate ] && flag=(--deflate)
        start_server "chat-$mode-$round" --sim-reply-tokens 40
        "$LOAD" chat "${COMMON[@]}" "${flag[@]}" --sockets 1000 --interval-ms 2200 --duration 20 --json "$OUT/chat-1000-$mode-$round.json"
        start_server "debate-$mode-$round" --sim-reply-tokens 40
        "$LOAD" debate "${COMMON[@]}" "${flag[@]}" --members 1000 --rounds 2 --turn-tokens 40 --threads 2 \
            --json "$OUT/debate-1000-$mode-$round.json"
    done
done
echo "reports in $OUT"
