#!/usr/bin/env bash
# Runs the MongoDB store suites (conformance, the backend's own, the one-node lease) against
# SecantusDB, a MongoDB-protocol server with real storage, as well as against the wire test
# server `swift test` uses: the two catch different mistakes (SecantusDB found an upsert that a
# real server does not treat as mongomock does). Needs `swift build --build-tests` and
# `scripts/setup.sh --test` first.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="$(mktemp)"
# Its `secantusd-py` entry point, through python3: pip's script directory may not be on PATH.
python3 -c 'import sys; from secantus.cli import main; sys.argv[0] = "secantusd-py"; sys.exit(main())' \
    --standalone --enable-test-commands --storage-path :memory: --host 127.0.0.1 --port 0 > "$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -f "$LOG"' EXIT
PORT=""
for _ in $(seq 1 100); do
    PORT=$(sed -n 's/.*secantus listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$LOG" | head -1)
    [ -n "$PORT" ] && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$LOG" >&2; exit 1; }
    sleep 0.1
done
[ -n "$PORT" ] || { echo "SecantusDB did not start:" >&2; cat "$LOG" >&2; exit 1; }
export PARLEY_TEST_MONGODB_URI="mongodb://127.0.0.1:$PORT"
swift test --skip-build --filter 'ParleyStoreTests'
# The node lease's suite after the others, not beside them: it asserts what a node is told when
# its lease is taken over, which needs each renewal answered within a few seconds. Beside the
# store suites' hundred tests this one Python process answered a renewal so late that the node
# was told its lease could not be renewed (rightly, for a store that slow) before it saw the
# takeover: 4 runs of 6 on 2026-12-06; alone it passed 6 of 6.
swift test --skip-build --filter 'SoleNodeTests'
