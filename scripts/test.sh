#!/usr/bin/env bash
# Runs every test: the Swift suites (unit, store conformance, EmbeddedChannel, real-socket
# integration) and the Python interop suite against the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."
# A crash reports its own thread, symbols without line lookups: the default backtrace of every
# thread (over a thousand in the test process) held the whole run still for seven minutes.
export SWIFT_BACKTRACE="${SWIFT_BACKTRACE:-threads=crashed,symbolicate=fast}"
# The code's layout is .swift-format's (swift-format ships with the toolchain): fix with
# `swift format format --in-place --recursive --parallel Sources Tests loadtest Package.swift`.
swift format lint --strict --recursive --parallel Sources Tests loadtest Package.swift
scripts/setup.sh --test
swift build --build-tests
swift test --skip-build
# The MongoDB store suites once more, against SecantusDB (real storage and driver monitoring).
scripts/test-store-secantus.sh
# libFuzzer over the socket's inbound path and the upload parsers, for a bounded minute.
scripts/fuzz.sh 60
swift build --product parley
# The timer benchmark's own checks (every timer fires on its tick, none early), at toy size.
swift build --product parley-bench-timers
.build/debug/parley-bench-timers --timers 20000 --realtime-ms 200 --realtime-timers 2000
# The fan-out benchmark's own check (every member gets every token), at toy size.
swift build --product parley-bench-fanout
.build/debug/parley-bench-fanout --members 20 --tokens 20 --tokens-per-sec 100
# The search benchmark's own checks (the rare word found, nobody else's words), at toy size.
swift build --product parley-bench-search
.build/debug/parley-bench-search --messages 2000 --searches 20
# The load-test client, exercised at toy size by Tests/interop/test_load.py.
swift build --product parley-load
python3 -m pytest -q Tests/interop
