#!/usr/bin/env bash
# Runs every test: the Swift suites (unit, store conformance, EmbeddedChannel, real-socket
# integration) and the Python interop suite against the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
swift build --build-tests
swift test --skip-build
swift build --product parley
python3 -m pytest -q Tests/interop
