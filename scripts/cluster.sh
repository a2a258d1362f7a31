#!/usr/bin/env bash
# A local Parley cluster for trying and testing (issue #22): nats-server with JetStream, a
# MongoDB-protocol server (SecantusDB, in memory; or the MongoDB that PARLEY_STORE names), three
# Parley nodes and nginx balancing HTTP and WebSockets over them on one port. The web client at
# http://127.0.0.1:8080 offers a dev sign-in (--dev). Ctrl-C stops everything.
#   scripts/cluster.sh [--port N] [--nodes N] [-- more `parley serve` options, e.g. --local-model]
# PARLEY_JWT_SECRET, when set, is the nodes' shared secret (else one is made for this run);
# PARLEY_BIN the binary (default .build/debug/parley; loadtest/cluster-fanout.sh uses release).
# Replies come from the simulated provider unless the options after `--` say otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
port=8080
nodes=3
extra=()
while (($#)); do
    case "$1" in
        --port) port="$2"; shift 2 ;;
        --nodes) nodes="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "cluster: unknown option $1 (see the comment at the top of $0)" >&2; exit 64 ;;
    esac
done

scripts/setup.sh --cluster
swift build --product parley >&2
dir="$(mktemp -d -t parley-cluster-XXXXXX)"
pids=()
nodes_pids=()
# Stops what it started: nginx, then every node at once (they drain in parallel while NATS and
# the store still answer them), then the store and NATS. A process that has not stopped after
# 45 s is killed, and said so.
stop() {
    local deadline=$((SECONDS + 45)) pid
    for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "cluster: $(ps -o args= -p "$pid") did not stop within 45 s of SIGTERM; killed" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
}
cleanup() {
    trap - EXIT INT TERM
    [ -n "${nginx_pid:-}" ] && stop "$nginx_pid"
    [ "${#nodes_pids[@]}" -gt 0 ] && stop "${nodes_pids[@]}"
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop "${pids[i]}"; done
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits for a pattern in a log and prints its first capture group (a port).
wait_for() {
    local log="$1" pattern="$2" what="$3" pid="$4" found=""
    for _ in $(seq 1 300); do
        found="$(sed -n "s/.*$pattern.*/\1/p" "$log" | head -1)"
        [ -n "$found" ] && { echo "$found"; return; }
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "cluster: $what did not start:" >&2
    cat "$log" >&2
    exit 1
}

nats-server -a 127.0.0.1 -p -1 -js -sd "$dir/nats" > "$dir/nats.log" 2>&1 &
pids+=($!)
nats_port="$(wait_for "$dir/nats.log" 'Listening for client connections on 127.0.0.1:\([0-9]*\)' nats-server $!)"

store="${PARLEY_STORE:-}"
if [ -z "$store" ]; then
    python3 -c 'import sys; from secantus.cli import main; sys.argv[0] = "secantusd-py"; sys.exit(main())' \
        --standalone --storage-path :memory: --host 127.0.0.1 --port 0 > "$dir/store.log" 2>&1 &
    pids+=($!)
    store="mongodb://127.0.0.1:$(wait_for "$dir/store.log" 'secantus listening on 127.0.0.1:\([0-9]*\)' SecantusDB $!)/parley"
fi
secret="${PARLEY_JWT_SECRET:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(36))')}"

upstreams=""
for i in $(seq 1 "$nodes"); do
    PARLEY_JWT_SECRET="$secret" "${PARLEY_BIN:-.build/debug/parley}" serve --dev --port 0 --data-dir "$dir/node$i" --node-id "node$i" \
        --broker "nats://127.0.0.1:$nats_port" --store "$store" --trusted-proxies 127.0.0.1 "${extra[@]}" \
        > "$dir/node$i.out" 2> "$dir/node$i.log" &
    nodes_pids+=($!)
    node_port="$(wait_for "$dir/node$i.out" 'parley listening on http:\/\/127.0.0.1:\([0-9]*\)' "node$i" $!)"
    upstreams+="        server 127.0.0.1:$node_port;"$'\n'
    echo "cluster: node$i on port $node_port (log $dir/node$i.log)" >&2
done

mkdir -p "$dir/nginx"
cat > "$dir/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $dir/nginx/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/nginx/body;
    proxy_temp_path $dir/nginx/proxy;
    fastcgi_temp_path $dir/nginx/fastcgi;
    uwsgi_temp_path $dir/nginx/uwsgi;
    scgi_temp_path $dir/nginx/scgi;
    upstream parley {
$upstreams    }
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://parley;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            # A WebSocket may stay quiet between replies; the server pings it.
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            # A node that is down or draining (503) is skipped for requests that can be retried.
            proxy_next_upstream error timeout http_503;
        }
    }
}
EOF
nginx -p "$dir/nginx" -c "$dir/nginx/nginx.conf" -e stderr -g 'daemon off;' 2> "$dir/nginx.log" &
nginx_pid=$!
for _ in $(seq 1 100); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
    kill -0 "$nginx_pid" 2>/dev/null || { echo "cluster: nginx did not start:" >&2; cat "$dir/nginx.log" >&2; exit 1; }
    sleep 0.1
done
echo "parley cluster ready on http://127.0.0.1:$port ($nodes nodes, NATS on $nats_port, store $store)"
# Until Ctrl-C, or until one of them stops.
wait -n "${pids[@]}" "${nodes_pids[@]}" "$nginx_pid"
echo "cluster: a process stopped; stopping the others" >&2
exit 1
