"""A debate through the real binary with a third-party client: every frame against the schemas."""
import asyncio
import json

import websockets

from schemas import validate_rest
from test_interop import make_clone, recv


async def frames_until(ws, predicate):
    out = []
    while True:
        frame = await recv(ws)
        out.append(frame)
        if predicate(frame):
            return out


def debate(server, mod, rounds):
    """A debate of two new clones, Ada (`yes`) and Bob (`no`), that anyone with its link may join."""
    ada, bob = make_clone(server, mod, name="Ada"), make_clone(server, mod, name="Bob")
    status, room = server.http("POST", "/v1/rooms", mod, {
        "kind": "debate", "topic": "Is cheese a dessert?", "rounds": rounds, "visibility": "link",
        "clones": [{"clone": ada["id"], "stance": "yes"}, {"clone": bob["id"], "stance": "no"}]})
    assert status == 201, room
    validate_rest("room", room)
    return ada, bob, room


def test_a_debate_streams_to_every_member_and_is_stored(server):
    mod = server.token("mod")
    ada, bob, room = debate(server, mod, rounds=1)
    viewer = server.token("vic")

    async def run():
        async with websockets.connect(f"{server.ws}?token={mod}") as m, websockets.connect(f"{server.ws}?token={viewer}") as v:
            await recv(m), await recv(v)
            await m.send(json.dumps({"type": "room.join", "id": "j1", "room": room["id"]}))
            state = await recv(m)
            assert state["type"] == "room.state" and state["stream"] is None
            await v.send(json.dumps({"type": "room.join", "id": "j2", "room": room["id"]}))
            assert (await recv(v))["type"] == "room.state"
            await v.send(json.dumps({"type": "room.control", "id": "c0", "room": room["id"], "action": "start"}))
            refused = await frames_until(v, lambda f: f["type"] == "error")
            assert refused[-1]["code"] == "forbidden"
            await m.send(json.dumps({"type": "room.control", "id": "c1", "room": room["id"], "action": "start"}))
            ended = lambda f: f["type"] == "room.event" and f["event"] == "ended"
            return await frames_until(m, ended), await frames_until(v, ended)

    seen_by_mod, seen_by_viewer = asyncio.run(run())
    streamed = lambda frames: [f for f in frames if f["type"] in ("stream.start", "token", "stream.end")]
    unpaid = lambda f: {k: v for k, v in f.items() if k not in ("cost", "balance")}
    # The same frames, except that only the moderator (who pays) sees cost and balance.
    assert [unpaid(f) for f in streamed(seen_by_mod)] == streamed(seen_by_viewer)
    assert all("balance" in f for f in streamed(seen_by_mod) if f["type"] == "stream.end")
    starts = [f for f in seen_by_mod if f["type"] == "stream.start"]
    assert [s["clone"] for s in starts] == [ada["id"], bob["id"]] and all(s["room"] == room["id"] for s in starts)

    status, detail = server.http("GET", f"/v1/rooms/{room['id']}", viewer)
    assert status == 200
    validate_rest("room-detail", detail)
    assert detail["room"]["status"] == "ended" and [e["clone"] for e in detail["transcript"]] == [ada["id"], bob["id"]]


def test_a_member_that_asks_for_joined_tokens_reads_the_same_debate_in_fewer_or_as_many_frames(server):
    """`?coalesce=tokens` (protocol: Joined tokens): every token of every turn exactly once, in
    order, the same text as a member reading token by token; a frame of several says `from`."""
    mod = server.token("mod")
    _, _, room = debate(server, mod, rounds=2)

    async def run():
        async with websockets.connect(f"{server.ws}?token={mod}") as m, \
                websockets.connect(f"{server.ws}?coalesce=tokens&token={server.token('joe')}") as joined:
            assert "coalesce" not in await recv(m)
            assert (await recv(joined))["coalesce"] == "tokens"
            for ws, ref in ((m, "j1"), (joined, "j2")):
                await ws.send(json.dumps({"type": "room.join", "id": ref, "room": room["id"]}))
                assert (await recv(ws))["type"] == "room.state"
            await m.send(json.dumps({"type": "room.control", "id": "c1", "room": room["id"], "action": "start"}))
            ended = lambda f: f["type"] == "room.event" and f["event"] == "ended"
            return await frames_until(m, ended), await frames_until(joined, ended)

    plain, joined = asyncio.run(run())

    def turns(frames):
        """Per stream: its text, and the (from, seq) of each token frame, in order."""
        out = {}
        for f in frames:
            if f["type"] == "token":
                text, spans = out.setdefault(f["stream"], ("", []))
                if "from" in f:
                    assert f["from"] < f["seq"], f
                out[f["stream"]] = (text + f["text"], spans + [(f.get("from", f["seq"]), f["seq"])])
        return out

    by_plain, by_joined = turns(plain), turns(joined)
    assert len(by_plain) == 4 and by_plain.keys() == by_joined.keys()
    for stream, (text, spans) in by_joined.items():
        assert text == by_plain[stream][0]
        # Contiguous from 1, each token once: the next frame starts right after the last one's seq.
        assert [first for first, _ in spans] == [1] + [last + 1 for _, last in spans[:-1]], spans
        assert spans[-1][1] == by_plain[stream][1][-1][1] == len(by_plain[stream][1])
    # Nothing else is joined or reordered: the frames around the tokens are the same ones (the
    # moderator's also say that the other member joined).
    others = lambda frames: [f["type"] + f.get("event", "") for f in frames if f["type"] != "token" and f.get("event") != "joined"]
    assert others(plain) == others(joined)
