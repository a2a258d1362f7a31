#!/usr/bin/env python3
"""Voiced replies through Parley (#29), measured from a client:

1. latency: with the local model and the local voice (`parley serve --local-model --local-voice`),
   time from `chat.send` to the first token, to the end of the reply's first sentence (as the
   client sees it), and to the first audio chunk, i.e. the first audible sample; and how long
   after its sentence was complete that audio came;
2. cost: Parley's own CPU (its process only, not the model's or the voice's) per second of
   audio relayed, as the difference between voiced and unvoiced replies of the same simulated
   text, divided by the seconds of audio sent.

    swift build -c release --product parley && scripts/setup.sh --voice && scripts/setup.sh --model
    python3 loadtest/voice-bench.py [--binary .build/release/parley] [--replies 10]

Starts its own servers on free loopback ports with throwaway data directories and prints one
Markdown table row per measurement."""
import argparse
import asyncio
import json
import os
import pathlib
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import websockets

ROOT = pathlib.Path(__file__).resolve().parents[1]
SENTENCE_END = re.compile(r"[.!?…][\"')\]]*\s")


def start(binary, data_dir, *extra):
    proc = subprocess.Popen([binary, "serve", "--port", "0", "--data-dir", data_dir, "--log-level", "warning", "--starting-credits", "100000000", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.startswith("parley listening on "), line
    port = int(line.strip().rsplit(":", 1)[1])
    token = subprocess.run([binary, "token", "--sub", "bench", "--data-dir", data_dir], check=True, capture_output=True, text=True).stdout.strip()
    return proc, port, token


def cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_clone(port, token):
    import urllib.request
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/clones", method="POST",
                                     data=json.dumps({"name": "Ada", "voice": {"name": "joe", "speed": 1.0}}).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["id"]


async def reply(port, token, clone, text, voice):
    """One reply: (first token, first sentence complete, first audio, end) in seconds after the
    send, and the audio bytes received."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws?token={token}", max_size=None) as ws:
        await ws.recv()  # welcome
        sent = time.perf_counter()
        await ws.send(json.dumps({"type": "chat.send", "id": "b", "clone": clone, "text": text, "voice": voice}))
        first_token = sentence = first_audio = None
        written, audio = "", 0
        while True:
            raw = await asyncio.wait_for(ws.recv(), 120)
            now = time.perf_counter() - sent
            if isinstance(raw, bytes):
                (length,) = struct.unpack(">H", raw[1:3])
                audio += len(raw) - 3 - length
                first_audio = first_audio or now
                continue
            frame = json.loads(raw)
            if frame["type"] == "token":
                first_token = first_token or now
                written += frame["text"]
                if sentence is None and (m := SENTENCE_END.search(written)) and m.end() >= 12:
                    sentence = now
            elif frame["type"] == "stream.end":
                return first_token, sentence or now, first_audio, now, audio
            elif frame["type"] == "error":
                raise RuntimeError(frame)


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def latency(binary, replies):
    with tempfile.TemporaryDirectory() as data_dir:
        proc, port, token = start(binary, data_dir, "--local-model", "--local-voice")
        try:
            clone = make_clone(port, token)
            rows = [asyncio.run(reply(port, token, clone, f"Tell me something about the sea, please ({i}).", True))
                    for i in range(replies + 1)][1:]  # the first warms the model and the voice
        finally:
            proc.terminate()
            proc.wait(60)
    ms = lambda i: [r[i] * 1000 for r in rows if r[i] is not None]  # noqa: E731
    after = [(r[2] - r[1]) * 1000 for r in rows if r[2] is not None]
    print(f"| local model + local voice, {len(rows)} replies | first token p50 {statistics.median(ms(0)):.0f} ms "
          f"| first sentence complete p50 {statistics.median(ms(1)):.0f} ms | first audio p50 {statistics.median(ms(2)):.0f} / "
          f"max {max(ms(2)):.0f} ms | audio after its sentence p50 {statistics.median(after):.0f} / max {max(after):.0f} ms |")


def cost(binary, replies):
    with tempfile.TemporaryDirectory() as data_dir:
        proc, port, token = start(binary, data_dir, "--local-voice", "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "0",
                                  "--sim-reply-tokens", "120")
        try:
            clone = make_clone(port, token)
            asyncio.run(reply(port, token, clone, "warm up", True))
            result = {}
            for voice in (False, True):
                before, audio = cpu_seconds(proc.pid), 0
                for i in range(replies):
                    audio += asyncio.run(reply(port, token, clone, f"Same words {i}", voice))[4]
                result[voice] = (cpu_seconds(proc.pid) - before, audio / 48_000)
        finally:
            proc.terminate()
            proc.wait(60)
    (plain, _), (voiced, seconds) = result[False], result[True]
    print(f"| simulated text, {replies} replies each | Parley CPU unvoiced {plain * 1000:.0f} ms, voiced {voiced * 1000:.0f} ms "
          f"| audio relayed {seconds:.1f} s | {(voiced - plain) / seconds * 1000:.2f} ms of Parley CPU per second of audio |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=str(ROOT / ".build" / "release" / "parley"))
    parser.add_argument("--replies", type=int, default=10)
    parser.add_argument("--only", choices=["latency", "cost"])
    args = parser.parse_args()
    if args.only != "cost":
        latency(args.binary, args.replies)
    if args.only != "latency":
        cost(args.binary, args.replies)


if __name__ == "__main__":
    sys.exit(main())
