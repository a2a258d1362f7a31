#!/usr/bin/env python3
"""A reader slower than its stream: what it receives token by token and with joined tokens.

Usage: loadtest/slow-reader.py [--turns 10] [--read-bytes 512] [--every-ms 1]
(from the project's root after `swift build -c release --product parley`).

Starts a release `parley serve` with an unpaced simulated model, creates a debate of `--turns`
turns of 100 tokens, and lets two members read it: a fast one (the moderator, who starts it) and a
slow one, a raw socket with a 4 KiB receive buffer that reads `--read-bytes` every `--every-ms`.
Twice: the slow member reading token by token, then asking for joined tokens (`?coalesce=tokens`).
Prints, for the slow member, the token frames and bytes it received, the tokens they carried, and
how long after the fast member it had the last token.
"""
import argparse
import base64
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

from websockets.sync.client import connect

ROOT = pathlib.Path(__file__).resolve().parents[1]
BINARY = ROOT / ".build" / "release" / "parley"
SECRET = "slow-reader-secret-0123456789abcdef0123456789"


def token(sub):
    env = {**os.environ, "PARLEY_JWT_SECRET": SECRET}
    return subprocess.run([str(BINARY), "token", "--sub", sub], check=True, capture_output=True, text=True, env=env).stdout.strip()


def post(base, path, bearer, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


class RawReader:
    """A WebSocket client on a plain socket, reading `chunk` bytes every `every` seconds."""

    def __init__(self, port, path, chunk, every):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.chunk, self.every, self.bytes = chunk, every, 0

    def send(self, frame):
        payload = json.dumps(frame).encode()
        mask = os.urandom(4)
        assert len(payload) < 126
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def frame(self):
        while True:
            if len(self.buffer) >= 2:
                length, at = self.buffer[1] & 0x7F, 2
                if length == 126 and len(self.buffer) >= 4:
                    length, at = int.from_bytes(self.buffer[2:4], "big"), 4
                elif length == 127 and len(self.buffer) >= 10:
                    length, at = int.from_bytes(self.buffer[2:10], "big"), 10
                if length < 126 or at > 2:
                    if len(self.buffer) >= at + length:
                        payload, self.buffer = self.buffer[at:at + length], self.buffer[at + length:]
                        return json.loads(payload)
            time.sleep(self.every)
            data = self.sock.recv(self.chunk)
            assert data, "closed"
            self.bytes += len(data)
            self.buffer += data


def run(base, port, turns, chunk, every, joined):
    mod = token("mod")
    clones = [post(base, "/v1/clones", mod, {"name": n})["id"] for n in ("Ada", "Bob")]
    room = post(base, "/v1/rooms", mod, {"kind": "debate", "topic": "Is cheese a dessert?", "rounds": turns // 2,
                                         "clones": [{"clone": clones[0], "stance": "yes"}, {"clone": clones[1], "stance": "no"}],
                                         "max_tokens_per_turn": 100, "visibility": "link"})["id"]
    slow = RawReader(port, f"/v1/ws?token={token('slow')}" + ("&coalesce=tokens" if joined else ""), chunk, every)
    assert slow.frame()["type"] == "welcome"
    slow.send({"type": "room.join", "id": "j", "room": room})
    while slow.frame()["type"] != "room.state":
        pass
    done = {}
    with connect(f"ws://127.0.0.1:{port}/v1/ws?token={mod}", max_size=None) as fast:
        json.loads(fast.recv())
        fast.send(json.dumps({"type": "room.join", "id": "j", "room": room}))
        fast.send(json.dumps({"type": "room.control", "id": "go", "room": room, "action": "start"}))

        def read_fast():
            tokens = 0
            while tokens < turns * 100:
                f = json.loads(fast.recv())
                if f["type"] == "token":
                    tokens += f["seq"] - f.get("from", f["seq"]) + 1
            done["fast"] = time.monotonic()

        reader = threading.Thread(target=read_fast)
        reader.start()
        frames = tokens = 0
        start = time.monotonic()
        while tokens < turns * 100:
            f = slow.frame()
            if f["type"] == "token":
                frames += 1
                tokens += f["seq"] - f.get("from", f["seq"]) + 1
        done["slow"] = time.monotonic()
        reader.join()
    print(f"{'joined' if joined else 'token by token'}: slow member got {tokens} tokens in {frames} frames, "
          f"{slow.bytes} bytes; its last token {1000 * (done['slow'] - done['fast']):.0f} ms after the fast member's "
          f"({1000 * (done['slow'] - start):.0f} ms from the start)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--read-bytes", type=int, default=512)
    parser.add_argument("--every-ms", type=float, default=1.0)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen([str(BINARY), "serve", "--port", str(port), "--data-dir", data, "--sim-ttft-ms", "0",
                                   "--sim-tokens-per-sec", "0", "--sim-reply-tokens", "100", "--starting-credits", "100000000"],
                                  env={**os.environ, "PARLEY_JWT_SECRET": SECRET}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    urllib.request.urlopen(base + "/healthz", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            for joined in (False, True):
                run(base, port, args.turns, args.read_bytes, args.every_ms / 1000, joined)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
