#!/usr/bin/env python3
"""How much memory GET /v1/me/export costs: seeds one account with N messages straight into a
fresh SQLite store, then streams the export and compares the server's peak RSS (VmHWM) before and
after with the size of the document. A streamed export keeps the growth flat as N grows; one
built in memory grows with the document.

    loadtest/export-memory.py [--messages 200000] [--binary .build/release/parley]
"""
import argparse
import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]


def peak_rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def start(binary, data_dir):
    proc = subprocess.Popen([binary, "serve", "--port", "0", "--data-dir", data_dir, "--log-level", "warning",
                             "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "0", "--retention-days", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("parley listening on "), line
    return proc, line.split()[-1]


def token(binary, data_dir, sub):
    return subprocess.run([binary, "token", "--sub", sub, "--data-dir", data_dir], check=True, capture_output=True, text=True).stdout.strip()


def call(base, method, path, tok, body=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body is not None else None)
    req.add_header("Authorization", f"Bearer {tok}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--binary", default=str(ROOT / ".build" / "release" / "parley"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parley-export-") as data_dir:
        proc, base = start(args.binary, data_dir)
        tok = token(args.binary, data_dir, "exporter")
        clone = call(base, "POST", "/v1/clones", tok, {"name": "Scribe"})
        schedule = call(base, "POST", "/v1/schedules", tok, {"clone": clone["id"], "delay_ms": 0, "text": "hello"})
        while call(base, "GET", f"/v1/schedules/{schedule['id']}", tok)["status"] == "pending":
            time.sleep(0.05)  # the schedule makes the conversation; bounded by the timer wheel
        conversation = call(base, "GET", "/v1/conversations", tok)["conversations"][0]["id"]
        proc.terminate()
        proc.wait(timeout=30)

        db = sqlite3.connect(os.path.join(data_dir, "parley.sqlite"))
        text = "a message of ordinary length, about as long as people write in a chat " * 2
        db.executemany(
            "INSERT INTO messages(id, conversation, role, text, created_at, saved) VALUES(?, ?, 'user', ?, ?, 0)",
            ((f"msg_seed{i:018d}", conversation, text, 1_764_000_000_000 + i) for i in range(args.messages)))
        db.commit()
        db.close()

        proc, base = start(args.binary, data_dir)
        call(base, "GET", "/v1/clones", tok)  # warm: every pool and cache the export also uses
        before = peak_rss_kib(proc.pid)
        req = urllib.request.Request(base + "/v1/me/export")
        req.add_header("Authorization", f"Bearer {tok}")
        size, started = 0, time.monotonic()
        with urllib.request.urlopen(req, timeout=600) as resp:
            while chunk := resp.read(1 << 16):
                size += len(chunk)
        elapsed = time.monotonic() - started
        after = peak_rss_kib(proc.pid)
        proc.terminate()
        proc.wait(timeout=30)
    print(f"messages {args.messages}  export {size / 1e6:.1f} MB in {elapsed:.1f} s ({size / 1e6 / elapsed:.1f} MB/s)  "
          f"server peak RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB (+{(after - before) / 1024:.1f} MiB, "
          f"{(after - before) * 1024 / size:.3f} of the document)")


if __name__ == "__main__":
    sys.exit(main())
