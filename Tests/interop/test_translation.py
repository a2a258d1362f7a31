"""A translation chat through the real binary with a third-party client: every frame against the schemas."""
import asyncio
import json

import websockets

from schemas import validate_rest
from test_interop import recv

STAND_IN = "[simulated {} translation] {}"


async def read_messages(ws, count):
    """Frames until `count` messages arrived whole; returns {message id: text} in arrival order."""
    texts, stream_of, open_streams = {}, {}, set()
    while len(texts) < count or open_streams:
        frame = await recv(ws)
        if frame["type"] == "room.event" and frame["event"] == "said":
            entry = frame["entry"]
            texts[entry.get("source", entry["id"])] = entry["text"]
        elif frame["type"] == "stream.start":
            stream_of[frame["stream"]] = frame["source"]
            texts[frame["source"]] = ""
            open_streams.add(frame["stream"])
        elif frame["type"] == "token":
            texts[stream_of[frame["stream"]]] += frame["text"]
        elif frame["type"] == "stream.end":
            open_streams.discard(frame["stream"])
        assert frame["type"] != "error", frame
    return texts


def test_three_languages_each_read_every_message_in_their_own(server):
    alice, bruno, chen = server.token("alice"), server.token("bruno"), server.token("chen")
    status, room = server.http("POST", "/v1/rooms", alice, {
        "kind": "translation", "members": ["bruno", "chen"], "languages": {"alice": "en", "bruno": "pt"}})
    assert status == 201, room
    validate_rest("room", room)
    status, error = server.http("POST", "/v1/rooms", alice, {"kind": "translation", "members": ["bruno"], "languages": {"bruno": "português"}})
    assert status == 400 and error["error"]["code"] == "bad_request"

    async def run():
        sockets = {}
        for user, token, language in (("alice", alice, None), ("bruno", bruno, None), ("chen", chen, "zh-hant")):
            ws = await websockets.connect(f"{server.ws}?token={token}")
            await recv(ws)
            join = {"type": "room.join", "id": "j", "room": room["id"]}
            if language:
                join["language"] = language
            await ws.send(json.dumps(join))
            state = await recv(ws)
            assert state["type"] == "room.state", state
            sockets[user] = ws
        for user, text in (("alice", "Good morning"), ("bruno", "Bom dia"), ("chen", "早安")):
            await sockets[user].send(json.dumps({"type": "room.say", "id": "s", "room": room["id"], "text": text}))
            await asyncio.sleep(0)  # no wait for placement: each reader still sees one order
        seen = {user: await read_messages(ws, 3) for user, ws in sockets.items()}
        for ws in sockets.values():
            await ws.close()
        return seen

    seen = asyncio.run(run())
    orders = {user: list(texts) for user, texts in seen.items()}
    assert orders["alice"] == orders["bruno"] == orders["chen"]
    by_original = {}
    for user, texts in seen.items():
        for message, text in texts.items():
            by_original.setdefault(message, {})[user] = text
    said_by = {"Good morning": "alice", "Bom dia": "bruno", "早安": "chen"}
    tags = {"alice": "en", "bruno": "pt", "chen": "zh-Hant"}
    for message in orders["alice"]:
        row = by_original[message]
        original = next(text for text, speaker in said_by.items() if row[speaker] == text)
        for user, tag in tags.items():
            expected = original if said_by[original] == user else STAND_IN.format(tag, original)
            assert row[user] == expected, (user, row)
    assert {next(t for t in said_by if by_original[m][said_by[t]] == t) for m in orders["alice"]} == set(said_by)

    status, detail = server.http("GET", f"/v1/rooms/{room['id']}", chen)
    assert status == 200
    validate_rest("room-detail", detail)
    assert [e["text"] for e in detail["transcript"]] == [seen["chen"][m] for m in orders["chen"]]
    assert detail["room"]["languages"]["chen"] == "zh-Hant"
