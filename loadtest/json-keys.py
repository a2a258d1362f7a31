#!/usr/bin/env python3
"""What a REST body of many distinct keys costs the server, and what it costs everyone else.

Usage: loadtest/json-keys.py [--binary .build/release/parley] [--keys 10000,30000,90000]
(from the project's root after `swift build -c release --product parley`).

Starts `parley serve` on loopback with a fresh data directory (`parley_server.py`), then POSTs to
/v1/clones a JSON object of N distinct keys (`{"k0":0,"k1":0,…}`, 400: no name), three times per
N, and prints each answer's time. Then sends two of the largest beside each other and times a
GET of /v1/clones sent half a second later: how long one user's bodies hold the server for
another. Every request has a 120 s timeout.
"""
import argparse
import pathlib
import threading
import time
import urllib.error
import urllib.request

from parley_server import ParleyServer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=str(ROOT / ".build" / "release" / "parley"))
    parser.add_argument("--keys", default="10000,30000,90000")
    args = parser.parse_args()
    sizes = [int(n) for n in args.keys.split(",")]
    with ParleyServer(args.binary) as server:
        token = server.token("alice")
        headers = {"Authorization": "Bearer " + token}
        url = server.base + "/v1/clones"

        def body(n):
            return ("{" + ",".join('"k%d":0' % i for i in range(n)) + "}").encode()

        def post(payload):
            started = time.monotonic()
            try:
                urllib.request.urlopen(urllib.request.Request(url, data=payload, headers=headers), timeout=120).read()
                status = 200
            except urllib.error.HTTPError as error:
                status = error.code
                error.read()
            return time.monotonic() - started, status

        for n in sizes:
            payload = body(n)
            runs = [post(payload) for _ in range(3)]
            print("keys %6d  bytes %7d  status %d  seconds %s" % (
                n, len(payload), runs[0][1], " ".join("%.3f" % t for t, _ in runs)))
        largest = body(max(sizes))
        senders = [threading.Thread(target=post, args=(largest,)) for _ in range(2)]
        for sender in senders:
            sender.start()
        time.sleep(0.5)  # the two bodies are on their way: this is the moment measured
        started = time.monotonic()
        urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=120).read()
        print("GET /v1/clones beside two bodies of %d keys: %.3f s" % (max(sizes), time.monotonic() - started))
        for sender in senders:
            sender.join()


if __name__ == "__main__":
    main()
