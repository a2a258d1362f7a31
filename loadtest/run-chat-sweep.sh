#!/usr/bin/env bash
# The chat scenario at several loads (40-token replies at 20 tokens/s, one message every 2.2 s a
# socket, a fresh server for each load): server CPU per delivered frame, what one more frame costs
# between two loads (the rise in CPU over the rise in frames), and the SQLite store's commits
# (`parley_store_commits_total`, one fsync each) per reply.
# Usage: loadtest/run-chat-sweep.sh [sockets …]   (default: 250 500 1000 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
source loadtest/bench-server.sh
LOADS=("$@")
[ ${#LOADS[@]} -gt 0 ] || LOADS=(250 500 1000 2000)

commits() {  # the server's group commits so far, from GET /metrics
    python3 -c 'import sys, urllib.request as u
r = u.Request(f"http://127.0.0.1:{sys.argv[1]}/metrics", headers={"authorization": "Bearer " + sys.argv[2]})
print(next(int(float(l.split()[-1])) for l in u.urlopen(r).read().decode().splitlines() if l.startswith("parley_store_commits_total")))' "$PORT" "$ADMIN"
}

for sockets in "${LOADS[@]}"; do
    start_server "chat$sockets" --sim-reply-tokens 40
    ADMIN=$("$SERVER" token --data-dir "$WORK/chat$sockets" --sub sweep --role admin)
    before=$(commits)
    "$LOAD" chat "${COMMON[@]}" --sockets "$sockets" --interval-ms 2200 --duration 20 --json "$WORK/chat$sockets.json" > /dev/null
    after=$(commits)
    echo "$sockets $((after - before))" >> "$WORK/commits"
done

python3 - "$WORK" "${LOADS[@]}" <<'PY'
import json, sys
work, loads = sys.argv[1], sys.argv[2:]
commits = dict(line.split() for line in open(work + "/commits"))
print("sockets  frames/s  server CPU-s  µs per frame  µs per added frame  commits per reply  added delay p99")
previous = None
for n in loads:
    r = json.load(open(f"{work}/chat{n}.json"))
    frames, cpu, streams = r["counters"]["frames"], r["server"]["cpu_s"], r["counters"]["streams"]
    added = "" if previous is None else "%.1f" % ((cpu - previous[1]) * 1e6 / max(1, frames - previous[0]))
    print("%7s  %8.0f  %12.2f  %12.1f  %18s  %17.2f  %12.2f ms" % (
        n, r["counters"]["frames_per_s"], cpu, cpu * 1e6 / max(1, frames), added, int(commits[n]) / max(1, streams),
        r["latency"]["added_inter_token_delay"]["p99_ms"]))
    previous = (frames, cpu)
PY
