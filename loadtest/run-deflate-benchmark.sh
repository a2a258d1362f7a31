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
source loadtest/bench-server.sh

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
