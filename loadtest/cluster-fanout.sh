#!/bin/bash
# One debate's fan-out to members spread over a cluster's nodes behind nginx (scripts/cluster.sh,
# release build), measured by ../shared/bench-peers' fanspread client: run it with 1 node and
# with 3 to compare. From the project root, after `swift build -c release`:
#   loadtest/cluster-fanout.sh NODES [members] [paced|burst]
# paced: 200 tokens at 50/s (two turns of 100); burst: 2,000 tokens as fast as they come.
# Prints fanspread's line (frames delivered, frames/s, spread delay p50/p99/max: a token's
# arrival at each member minus its first arrival at any member). No server CPU: several processes.
set -eu
nodes=${1:?nodes}; members=${2:-1000}; mode=${3:-paced}
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/.." && pwd); peers=$root/../shared/bench-peers
[[ -x $root/.build/release/parley ]] || { echo "swift build -c release first" >&2; exit 1; }
if [[ $mode == burst ]]; then tokens=2000 rounds=10 rate=1000000; else tokens=200 rounds=1 rate=50; fi
export GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE=${TMPDIR:-/tmp}/bench-peers-gocache
bin=$(mktemp -d); go build -o "$bin/fanspread" "$peers/fanspread.go"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
secret=cluster-fanout-secret-0123456789abcdef0123
cd "$root"
PARLEY_BIN=.build/release/parley PARLEY_JWT_SECRET=$secret scripts/cluster.sh --port "$port" --nodes "$nodes" -- \
    --sim-ttft-ms 0 --sim-tokens-per-sec $rate --sim-reply-tokens 100 --max-handshakes-per-ip 100000 --starting-credits 100000000 \
    > "$bin/cluster.out" 2> "$bin/cluster.log" &
cluster=$!
trap 'kill -TERM $cluster 2>/dev/null; wait $cluster 2>/dev/null; rm -rf "$bin"' EXIT
for _ in $(seq 300); do grep -q "parley cluster ready" "$bin/cluster.out" && break; sleep 0.2; done
grep -q "parley cluster ready" "$bin/cluster.out" || { cat "$bin/cluster.log" >&2; exit 1; }
mod=$(.build/release/parley token --sub mod --jwt-secret "$secret")
room=$(python3 "$peers/parley_room.py" "$port" "$mod" $rounds 100)
timeout 300 "$bin/fanspread" -parley -secret "$secret" -room "$room" -url "ws://127.0.0.1:$port/v1/ws" -n "$members" -tokens $tokens \
    -timeout 200s | sed "s/^/$nodes-node $mode /"
