#!/bin/bash
# ../shared/bench-peers/run.sh with two Parley rows: `parley` (members read token by token, as the
# shared client does) and `parley-joined` (members ask for joined tokens, `?coalesce=tokens`).
# The same client (fanspread.go here: the shared one plus -coalesce), metric and peers (go_server.go,
# node_server.js, py_server.py, parley_room.py from $PEERS). With -coalesce, `delivered`,
# `frames_per_s` and `server_us_per_frame` count tokens (a frame of several counts as each of them
# arriving with it) and `wire_frames` the frames that carried them. From the project's root after
# `swift build -c release --product parley`:
#   loadtest/bench-peers/run.sh [paced|burst] [members]
# FANSPREAD_FLAGS=-breakdown adds, for the Parley rows, where the spread lies (fanspread.go says).
# PARLEY_BIN=<a parley binary> measures that build; ROWS="parley parley-joined" runs only those rows
# (two builds side by side without the peers' minutes).
# Needs what the shared one does: golang-go golang-github-gorilla-websocket-dev node-ws; pip websockets requests
set -u
here=$(cd "$(dirname "$0")" && pwd); root=$(pwd)
peers=${PEERS:-$root/../shared/bench-peers}
server=${PARLEY_BIN:-$root/.build/release/parley}
rows=" ${ROWS:-go node parley parley-joined py} "
[[ -x $server ]] || { echo "run from the project root after swift build -c release"; exit 1; }
[[ -f $peers/go_server.go ]] || { echo "no peers at $peers (set PEERS)"; exit 1; }
export GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE=${TMPDIR:-/tmp}/bench-peers-gocache
bin=$(mktemp -d)
go build -o "$bin/go_server" "$peers/go_server.go" && go build -o "$bin/fanspread" "$here/fanspread.go" || exit 1
mode=${1:-paced}; N=${2:-1000}
if [[ $mode == burst ]]; then TOK=2000 IV=0 ROUNDS=10 RATE=1000000; else TOK=200 IV=20000 ROUNDS=1 RATE=50; fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
peer() { name=$1; shift; port=$(free_port); "$@" "$port" >/dev/null 2>&1 & spid=$!; sleep 1.5
  timeout 200 "$bin/fanspread" -url ws://127.0.0.1:$port/ws -n "$N" -tokens $TOK -interval-us $IV -server-pid $spid -timeout 150s | sed "s/^/$name $mode /"
  kill $spid; wait $spid 2>/dev/null; }
parley() { name=$1; shift
  port=$(free_port); data=$(mktemp -d); secret=bench-peers-secret-0123456789abcdef0123
  PARLEY_JWT_SECRET=$secret "$server" serve --port "$port" --data-dir "$data" --sim-ttft-ms 0 \
    --sim-tokens-per-sec $RATE --sim-reply-tokens 100 --max-handshakes-per-ip 100000 --starting-credits 100000000 >"$data/log" 2>&1 &
  ppid=$!
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
  mt=$(PARLEY_JWT_SECRET=$secret "$server" token --sub mod)
  room=$(python3 "$peers/parley_room.py" "$port" "$mt" $ROUNDS 100) || { kill $ppid; return 1; }
  timeout 200 "$bin/fanspread" -parley "$@" ${FANSPREAD_FLAGS:-} -secret "$secret" -room "$room" -url ws://127.0.0.1:$port/v1/ws -n "$N" -tokens $TOK \
    -server-pid $ppid -timeout 150s | sed "s/^/$name $mode /"
  kill $ppid; wait $ppid 2>/dev/null; rm -rf "$data"; }
[[ $rows == *" go "* ]] && peer go "$bin/go_server"
[[ $rows == *" node "* ]] && peer node node "$peers/node_server.js"
[[ $rows == *" parley "* ]] && parley parley
[[ $rows == *" parley-joined "* ]] && parley parley-joined -coalesce
[[ $rows == *" py "* ]] && peer py python3 "$peers/py_server.py"
