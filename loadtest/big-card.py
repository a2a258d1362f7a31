#!/usr/bin/env python3
"""What a clone imported from a big card costs each read of it.

Usage: loadtest/big-card.py [--binary .build/release/parley] [--numbers 1000000] [--replies 8]
(from the project's root after `swift build -c release --product parley`).

Starts `parley serve` on loopback (`parley_server.py`; simulated model: no time to first token,
five tokens a reply), imports a V2 card whose `extensions` hold an array of `--numbers` numbers
(1,000,000 make a card of 7.9 MB, under the 8 MiB import limit) and creates a plain clone beside
it. Then sends `--replies` short messages to each clone in one conversation, printing each
reply's time to first token, and times `GET /v1/clones/<id>` of each, `GET /v1/clones`, and a
`PATCH` of each clone's name. The difference between the two clones is what the card's fields a
prompt never uses cost a read (and a write that does not change them).
"""
import argparse
import json
import pathlib
import time
import urllib.request

from parley_server import ParleyServer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=str(ROOT / ".build" / "release" / "parley"))
    parser.add_argument("--numbers", type=int, default=1_000_000)
    parser.add_argument("--replies", type=int, default=8)
    args = parser.parse_args()
    flags = ["--log-level", "warning", "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "0", "--sim-reply-tokens", "5",
             "--starting-credits", "10000000", "--max-requests-per-second", "0"]
    with ParleyServer(args.binary, *flags) as server:
        token = server.token("alice")

        def call(method, path, body=None):
            request = urllib.request.Request(server.base + path, data=None if body is None else json.dumps(body).encode(),
                                             headers={"Authorization": "Bearer " + token}, method=method)
            started = time.monotonic()
            with urllib.request.urlopen(request, timeout=300) as response:
                answer = json.loads(response.read() or b"null")
            return answer, time.monotonic() - started

        persona = {"name": "Big", "description": "d", "personality": "", "scenario": "", "first_mes": "", "mes_example": ""}
        card = {"spec": "chara_card_v2", "spec_version": "2.0",
                "data": {**persona, "extensions": {"numbers": list(range(args.numbers))}}}
        print("card: %.1f MB" % (len(json.dumps(card)) / 1e6))
        big, took = call("POST", "/v1/clones/import", card)
        print("import: %.0f ms" % (took * 1000))
        plain, _ = call("POST", "/v1/clones", {"name": "Plain"})
        clones = [("plain", plain["id"]), ("big", big["id"])]
        for name, clone in clones:
            times = server.first_token_times(token, clone, "hello there", args.replies)
            print("%-6s time to first token, ms: %s" % (name, " ".join("%.0f" % (t * 1000) for t in times)))
        for name, clone in clones:
            reads = [call("GET", "/v1/clones/" + clone)[1] for _ in range(args.replies)]
            print("%-6s GET /v1/clones/<id>, ms: %s" % (name, " ".join("%.0f" % (t * 1000) for t in reads)))
        lists = [call("GET", "/v1/clones")[1] for _ in range(args.replies)]
        print("GET /v1/clones (both), ms: %s" % " ".join("%.0f" % (t * 1000) for t in lists))
        for name, clone in clones:
            renames = [call("PATCH", "/v1/clones/" + clone, {"name": "%s %d" % (name, i)})[1] for i in range(args.replies)]
            print("%-6s PATCH /v1/clones/<id> (its name), ms: %s" % (name, " ".join("%.0f" % (t * 1000) for t in renames)))


if __name__ == "__main__":
    main()
