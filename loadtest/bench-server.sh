# Sourced by the benchmark scripts (from the repository root): release builds of the server and
# parley-load, a work directory removed on exit, and start_server NAME ARGS…, which starts a fresh
# server (its own data directory, simulated replies paced at 20 tokens/s) and sets PORT, PID and
# COMMON, the parley-load options that reach it.
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
