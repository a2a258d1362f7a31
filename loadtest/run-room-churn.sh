#!/bin/bash
# Room churn (#26): N members join one debate room, then all leave at once, then the sockets of R
# other rooms (one in each) close; the server's CPU and wall time for each (loadtest/room-churn.go). From the project's root after
# `swift build -c release --product parley`:
#   loadtest/run-room-churn.sh [members] [other rooms]     (default 3000 0)
# Each other room has one socket in it, so the server holds it in memory.
# PARLEY_BIN=<a parley binary> measures that build. Needs golang-go and golang-github-gorilla-websocket-dev.
set -eu
N=${1:-3000}; R=${2:-0}
server=${PARLEY_BIN:-$(pwd)/.build/release/parley}
[[ -x $server ]] || { echo "run from the project root after swift build -c release --product parley"; exit 1; }
work=$(mktemp -d)
pid=
trap '[[ -n $pid ]] && { kill $pid 2>/dev/null; wait $pid 2>/dev/null; }; rm -rf "$work"' EXIT
GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE=${TMPDIR:-/tmp}/room-churn-gocache go build -o "$work/room-churn" loadtest/room-churn.go
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
secret=room-churn-secret-0123456789abcdef0123456789
PARLEY_JWT_SECRET=$secret "$server" serve --port "$port" --data-dir "$work/data" --max-handshakes-per-ip 1000000 \
  --log-level warning >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
"$work/room-churn" -port "$port" -n "$N" -rooms "$R" -server-pid "$pid" -secret "$secret"
