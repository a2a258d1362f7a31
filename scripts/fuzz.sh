#!/usr/bin/env bash
# Fuzzes the socket's inbound path and the upload parsers with libFuzzer for a bounded time.
#   scripts/fuzz.sh [seconds]   (default 60)
# Fuzz/corpus grew from hand-made seeds (a chat frame, fragments around a ping, a close, cards as
# JSON and PNG) and is kept minimized in the repo (-merge=1); inputs that find new coverage are
# added to it. A crash leaves its input as Fuzz/crash-* and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${1:-60}"
export PARLEY_FUZZ=1
mkdir -p .build-fuzz
# The instrumented build prints thousands of harmless linker notes: keep them in a log.
swift build --scratch-path .build-fuzz --product parley-fuzz -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library \
    > .build-fuzz/build.log 2>&1 || { tail -40 .build-fuzz/build.log; exit 1; }
mkdir -p Fuzz/corpus
# -rss_limit_mb bounds memory; -max_len covers a frame header, a 64 KiB payload split in two reads.
.build-fuzz/debug/parley-fuzz Fuzz/corpus -max_total_time="$SECONDS_TO_RUN" -max_len=70000 -rss_limit_mb=2048 \
    -artifact_prefix=Fuzz/ -print_final_stats=1
