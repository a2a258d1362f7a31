#!/usr/bin/env python3
"""What a big lorebook costs a reply before its first token.

Usage: loadtest/lorebook-prompt.py [--binary .build/release/parley] [--replies 6] [--content-chars 0]
(from the project's root after `swift build -c release --product parley`).

Starts `parley serve` on loopback (`parley_server.py`; simulated model: no time to first token,
five tokens a reply), imports a card whose book holds 1,024 entries of 64 keys each (none of them
said, so every key is looked for) with `scan_depth` 1000, creates a plain clone beside it, and
sends `--replies` messages of 7,900 characters to each clone in one conversation, printing each
reply's time to first token. The difference is what finding the book's keys in the history costs.
"""
import argparse
import json
import pathlib
import urllib.request

from parley_server import ParleyServer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=str(ROOT / ".build" / "release" / "parley"))
    parser.add_argument("--replies", type=int, default=6)
    parser.add_argument("--content-chars", type=int, default=0,
                        help="each entry's content this long (default: 'fact N'); a book's contents are read on every reply")
    args = parser.parse_args()
    flags = ["--log-level", "warning", "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "0", "--sim-reply-tokens", "5",
             "--starting-credits", "10000000"]
    with ParleyServer(args.binary, *flags) as server:
        token = server.token("alice")

        def post(path, body):
            request = urllib.request.Request(server.base + path, data=json.dumps(body).encode(),
                                             headers={"Authorization": "Bearer " + token}, method="POST")
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())

        entries = [{"keys": ["zqx%05dk%02d" % (i, j) for j in range(64)], "content": ("fact %d " % i + "the sky-port's lore " * (args.content_chars // 20 + 1))[:args.content_chars or len("fact %d" % i)], "enabled": True,
                    "insertion_order": i} for i in range(1024)]
        persona = {"name": "Lore", "description": "d", "personality": "", "scenario": "", "first_mes": "", "mes_example": ""}
        card = {"spec": "chara_card_v2", "spec_version": "2.0",
                "data": {**persona, "character_book": {"entries": entries, "scan_depth": 1000}}}
        clones = [("plain", post("/v1/clones", {"name": "Plain"})["id"]), ("lorebook", post("/v1/clones/import", card)["id"])]
        text = ("lorem ipsum dolor sit amet " * 300)[:7900]
        for name, clone in clones:
            times = server.first_token_times(token, clone, text, args.replies)
            print("%-8s time to first token, ms: %s" % (name, " ".join("%.0f" % (t * 1000) for t in times)))

if __name__ == "__main__":
    main()
