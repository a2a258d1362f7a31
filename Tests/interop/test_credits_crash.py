"""Kills the server with SIGKILL in the middle of many metered streams, restarts it on the same
store, and checks the ledger: the balance is the sum of the entries, no entry is doubled, and
every token a client received was paid for before it was sent. Also: the debit options set how
a reply's debits grow."""
import asyncio
import collections
import json
import os
import signal
import subprocess

import websockets

from conftest import BINARY
from schemas import validate_rest

BATCH = 8
USERS = ["kim", "lee", "max"]
STREAMS_PER_USER = 3


def reply_end(server, token, clone, text, cancel_at=None):
    """Sends one chat message and returns its reply's `stream.end`; with `cancel_at`, the reply
    is cancelled once that token arrives."""
    async def chat():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone, "text": text}))
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if frame["type"] == "token" and frame["seq"] == cancel_at:
                    await ws.send(json.dumps({"type": "chat.cancel", "id": "stop", "stream": frame["stream"]}))
                if frame["type"] == "stream.end":
                    return frame
    return asyncio.run(chat())


def credits(server, token):
    entries, before, balance = [], None, None
    while True:
        status, page = server.http("GET", "/v1/credits?limit=200" + (f"&before={before}" if before else ""), token)
        assert status == 200, page
        validate_rest("credits", page)
        balance = page["balance"]
        entries += page["entries"]
        before = page["next_before"]
        if before is None:
            return balance, entries


def test_sigkill_mid_stream_loses_and_doubles_no_debit(start_server):
    args = ["--sim-ttft-ms", "0", "--sim-tokens-per-sec", "150", "--sim-reply-tokens", "5000",
            "--credit-batch-tokens", str(BATCH), "--starting-credits", "1000000"]
    server = start_server(*args)
    tokens = {user: server.token(user) for user in USERS}
    clones = {}
    for user in USERS:
        status, body = server.http("POST", "/v1/clones", tokens[user], {"name": f"Clone of {user}"})
        assert status == 201, body
        clones[user] = body["id"]

    received = collections.Counter()  # stream id -> tokens the client got
    owner = {}

    async def run_user(user, started):
        async with websockets.connect(f"{server.ws}?token={tokens[user]}") as ws:
            json.loads(await ws.recv())
            for i in range(STREAMS_PER_USER):
                await ws.send(json.dumps({"type": "chat.send", "id": f"{user}{i}", "clone": clones[user], "text": f"story {i}"}))
            try:
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
                    if frame["type"] == "stream.start":
                        owner[frame["stream"]] = user
                    elif frame["type"] == "token":
                        assert frame["seq"] == received[frame["stream"]] + 1
                        received[frame["stream"]] += 1
                        if sum(received[s] >= 25 for s in owner) == len(USERS) * STREAMS_PER_USER:
                            started.set()
            except websockets.exceptions.ConnectionClosed:
                return  # the server died: everything it sent has been read

    async def main():
        started = asyncio.Event()
        users = [asyncio.create_task(run_user(u, started)) for u in USERS]
        await asyncio.wait_for(started.wait(), 30)
        server.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*users), 30)

    asyncio.run(main())
    assert server.proc.wait(timeout=10) == -signal.SIGKILL
    assert len(owner) == len(USERS) * STREAMS_PER_USER

    again = start_server(*args)  # same data dir and store: recovery runs before serving
    for user in USERS:
        token = again.token(user)
        balance, entries = credits(again, token)
        ids = [e["id"] for e in entries]
        assert len(ids) == len(set(ids)), "a ledger entry appears twice"
        assert sum(e["credits"] for e in entries) == balance, "balance is not the sum of the entries"
        assert balance >= 0
        for stream, user_of_stream in owner.items():
            if user_of_stream != user:
                continue
            debits = {int(e["id"].rsplit(":", 1)[1]): e["tokens"] for e in entries
                      if e.get("stream") == stream and e["kind"] == "debit" and e["id"].rsplit(":", 1)[1].isdigit()}
            paid = sum(debits.values())
            # A reply's debits double from BATCH (16 here would be 8, 16, 32, …, up to 128).
            assert [debits[n] for n in sorted(debits)][:3] == [BATCH, 2 * BATCH, 4 * BATCH][:len(debits)], debits
            # Nothing was sent unpaid, and at most the batch being prepaid (plus one in flight) is unsent.
            last = debits[max(debits)]
            assert received[stream] <= paid <= received[stream] + 2 * last, (stream, received[stream], paid)

    # The restarted server meters new streams on top of the recovered ledger.
    end = reply_end(again, again.token("kim"), clones["kim"], "still there?", cancel_at=3)
    assert end["reason"] == "cancelled" and end["cost"] > 0
    balance, entries = credits(again, again.token("kim"))
    assert sum(e["credits"] for e in entries) == balance == end["balance"]


def test_a_reply_cut_by_sigkill_is_stored_as_far_as_it_was_seen_and_settled_exactly(start_server):
    """37 tokens reach the user, then SIGKILL: after the restart the transcript holds the reply as
    far as it was journaled (a prefix of what the user saw, at most ~200 ms short), marked
    interrupted, and the stream is settled for exactly that text: its prompt and the tokens stored."""
    batch = 16
    args = ["--sim-ttft-ms", "0", "--sim-tokens-per-sec", "40", "--sim-reply-tokens", "400",
            "--credit-batch-tokens", str(batch), "--starting-credits", "100000"]
    server = start_server(*args)
    token = server.token("ivy")
    status, clone = server.http("POST", "/v1/clones", token, {"name": "Ivy's clone"})
    assert status == 201, clone
    seen = []

    async def chat():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone["id"], "text": "tell me a long story"}))
            start = None
            while len(seen) < 37:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if frame["type"] == "stream.start":
                    start = frame
                elif frame["type"] == "token":
                    seen.append(frame["text"])
            server.proc.send_signal(signal.SIGKILL)
            return start

    start = asyncio.run(chat())
    assert server.proc.wait(timeout=10) == -signal.SIGKILL

    again = start_server(*args)
    status, page = again.http("GET", f"/v1/conversations/{start['conversation']}/messages", token)
    assert status == 200, page
    validate_rest("message-page", page)
    assert [m["role"] for m in page["messages"]] == ["user", "assistant"], "the cut reply is in the transcript"
    reply = page["messages"][1]
    assert reply["reason"] == "interrupted" and reply["stream"] == start["stream"]
    stored = reply["usage"]["output_tokens"]
    # Journaled with every prepaid batch (tokens 1, 17 and 49 buy one) and offered every 100 ms,
    # written with the other replies' within 100 ms more: at 40 tokens/s at most 8 tokens (and
    # one for the commit) short of what the user saw.
    assert 37 - 9 <= stored <= 37, stored
    assert reply["text"] == "".join(seen[:stored]), "exactly the first tokens the user saw"

    status, prices = again.http("GET", "/v1/credits/prices")
    price = prices["models"]["simulated"]
    percent = prices["features"]["chat"]

    def cost(tokens, per_1k):
        return -(-tokens * per_1k * percent // 100_000)

    balance, entries = credits(again, token)
    mine = [e for e in entries if e.get("stream") == start["stream"]]
    assert any(e["id"] == start["stream"] + ":settle" for e in mine), "settled at start-up"
    paid = -sum(e["credits"] for e in mine)
    assert paid == cost(reply["usage"]["input_tokens"], price["input_per_1k"]) + cost(stored, price["output_per_1k"])
    assert sum(e["credits"] for e in entries) == balance
    # The journal is gone: a second restart stores and settles nothing twice.
    again.proc.send_signal(signal.SIGKILL)
    again.proc.wait(timeout=10)
    third = start_server(*args)
    status, page = third.http("GET", f"/v1/conversations/{start['conversation']}/messages", token)
    assert len(page["messages"]) == 2 and page["messages"][1] == reply
    assert credits(third, token) == (balance, entries)


def test_a_killed_server_leaves_no_shared_memory_segment(start_server, store_args):
    """libmongoc keeps its statistics in /dev/shm/mongoc-<pid> unless told not to; a SIGKILLed
    process never removes it, and a later process given the same pid warns on stderr at start-up."""
    server = start_server()
    segment = f"/dev/shm/mongoc-{server.proc.pid}"
    status, _ = server.http("GET", "/healthz")
    assert status == 200
    server.proc.send_signal(signal.SIGKILL)
    assert server.proc.wait(timeout=10) == -signal.SIGKILL
    assert not os.path.exists(segment), f"{segment} outlived the server ({store_args or 'sqlite'})"


def test_the_debit_options_set_the_size_of_a_replys_debits(start_server, data_dir):
    """`--credit-batch-tokens` is the first debit, `--credit-batch-max-tokens` the ceiling the
    doubling stops at; a ceiling below the first debit is refused at start-up."""
    refused = subprocess.run([str(BINARY), "serve", "--data-dir", str(data_dir), "--credit-batch-tokens", "32",
                              "--credit-batch-max-tokens", "16"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 64 and "--credit-batch-max-tokens must be" in refused.stderr, refused.stderr

    server = start_server("--sim-ttft-ms", "0", "--sim-tokens-per-sec", "0", "--sim-reply-tokens", "30",
                          "--credit-batch-tokens", "4", "--credit-batch-max-tokens", "8", "--starting-credits", "100000")
    token = server.token("ona")
    status, clone = server.http("POST", "/v1/clones", token, {"name": "Ona's clone"})
    assert status == 201, clone

    end = reply_end(server, token, clone["id"], "thirty tokens")
    assert end["reason"] == "complete" and end["usage"]["output_tokens"] == 30
    _, entries = credits(server, token)
    mine = {e["id"].rsplit(":", 1)[1]: e for e in entries if e.get("stream") == end["stream"]}
    # 4 + 8 + 8 + 8 = 28 tokens, then 8 more for the last 2: 36 bought, 6 refunded.
    assert [mine[str(n)]["tokens"] for n in range(1, 6)] == [4, 8, 8, 8, 8] and "6" not in mine, mine
    assert mine["settle"]["credits"] > 0
