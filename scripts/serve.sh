#!/usr/bin/env bash
# Runs Parley on its embedded defaults (SQLite in ./parley-data, simulated provider, 127.0.0.1:8080)
# in development mode (--dev: the web client at http://127.0.0.1:8080 offers a dev sign-in).
# Extra arguments go to `parley serve`, e.g. scripts/serve.sh --port 9000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift build --product parley
exec .build/debug/parley serve --dev "$@"
