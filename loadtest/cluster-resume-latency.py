#!/usr/bin/env python3
"""How long a `stream.resume` takes on a cluster (#22): from sending it to its ack and to the first
replayed token, on the node generating the stream (its own history), on another node that followed
the stream (its mirror) and on another node that never saw it (JetStream: a head read and an
ordered consumer). Starts nats-server, SecantusDB and two release nodes itself.

    swift build -c release --product parley && python3 loadtest/cluster-resume-latency.py [ROUNDS]
"""
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, ".build", "release", "parley")
SECRET = "resume-latency-secret-0123456789-abcdef"


def start(args, pattern):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        match = re.search(pattern, line)
        if match:
            return proc, int(match.group(1))
    raise RuntimeError(f"{args[0]} did not start")


def main(rounds):
    work = tempfile.mkdtemp(prefix="parley-resume-")
    procs = []
    try:
        nats, nats_port = start(["nats-server", "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", f"{work}/nats"],
                                r"Listening for client connections on 127\.0\.0\.1:(\d+)")
        procs.append(nats)
        code = "import sys; from secantus.cli import main; sys.argv[0] = 'secantusd-py'; sys.exit(main())"
        store, store_port = start([sys.executable, "-c", code, "--standalone", "--storage-path", ":memory:", "--host", "127.0.0.1",
                                   "--port", "0"], r"secantus listening on 127\.0\.0\.1:(\d+)")
        procs.append(store)
        ports = []
        for name in ("node-a", "node-b"):
            node, port = start([BINARY, "serve", "--port", "0", "--data-dir", f"{work}/{name}", "--node-id", name, "--log-level", "warning",
                                "--broker", f"nats://127.0.0.1:{nats_port}", "--store", f"mongodb://127.0.0.1:{store_port}/parley",
                                "--jwt-secret", SECRET, "--starting-credits", "100000000", "--sim-ttft-ms", "0",
                                "--sim-tokens-per-sec", "50", "--sim-reply-tokens", "100000"], r"parley listening on http://127\.0\.0\.1:(\d+)")
            procs.append(node)
            ports.append(port)
        token = subprocess.run([BINARY, "token", "--sub", "alice", "--jwt-secret", SECRET], check=True, capture_output=True,
                               text=True).stdout.strip()
        # A bound, so a stuck run says so instead of hanging.
        return asyncio.run(asyncio.wait_for(measure(ports, token, rounds), 120))
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait()


async def measure(ports, token, rounds):
    import urllib.request
    request = urllib.request.Request(f"http://127.0.0.1:{ports[0]}/v1/clones", data=json.dumps({"name": "Ada"}).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    clone = json.loads(urllib.request.urlopen(request).read())["id"]
    url = "ws://127.0.0.1:{}/v1/ws?token=" + token
    results = {"own node": [], "other node, followed": [], "other node, not followed": []}
    async with websockets.connect(url.format(ports[0])) as on_a, websockets.connect(url.format(ports[1])) as follower:
        await on_a.recv()
        await follower.recv()
        await follower.send(json.dumps({"type": "chat.cancel", "id": "probe", "stream": "st_none"}))
        await follower.recv()
        await on_a.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone, "text": "a very long story"}))
        stream, seq = None, 0
        while seq < 20:
            frame = json.loads(await on_a.recv())
            stream = frame.get("stream", stream)
            seq = frame.get("seq", seq)
        for i in range(rounds):
            for case, port in (("own node", ports[0]), ("other node, followed", ports[1])):
                results[case].append(await resume(url.format(port), stream, i))
    # A stream node B never followed (no socket of Alice's was on B when it started): every
    # resume there reads JetStream.
    async with websockets.connect(url.format(ports[0])) as on_a:
        await on_a.recv()
        await on_a.send(json.dumps({"type": "chat.send", "id": "c2", "clone": clone, "text": "another long story"}))
        stream, seq = None, 0
        while seq < 20:
            frame = json.loads(await on_a.recv())
            stream = frame.get("stream", stream) if frame.get("type") != "stream.end" else stream
            seq = frame.get("seq", seq) if frame.get("stream") == stream else seq
        for i in range(rounds):
            results["other node, not followed"].append(await resume(url.format(ports[1]), stream, i))
    print(f"{rounds} resumes each, after token 10 of a stream at 50 tokens/s (ms: p50 / p90 / max)")
    print("| resumed on | to the ack | to the first replayed token |")
    print("| --- | --- | --- |")
    for case, samples in results.items():
        acks = sorted(s[0] for s in samples)
        firsts = sorted(s[1] for s in samples)
        fmt = lambda xs: f"{statistics.median(xs):.2f} / {xs[int(len(xs) * 0.9) - 1]:.2f} / {xs[-1]:.2f}"
        print(f"| {case} | {fmt(acks)} | {fmt(firsts)} |")


async def resume(url, stream, i):
    async with websockets.connect(url) as ws:
        await ws.recv()
        sent = time.perf_counter()
        await ws.send(json.dumps({"type": "stream.resume", "id": f"r{i}", "stream": stream, "after": 10}))
        ack = json.loads(await ws.recv())
        acked = time.perf_counter()
        assert ack.get("ref") == f"r{i}", ack
        first = json.loads(await ws.recv())
        assert first.get("seq") == 11, first
        return (acked - sent) * 1000, (time.perf_counter() - sent) * 1000


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
