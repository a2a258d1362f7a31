"""SIGTERM drains every kind of stream the same way: a debate turn and a translation chat's
reply keep streaming for the grace period like a chat reply, no new turn starts, what is cut
is stored with reason `shutdown`, and a debate is `paused` when the server comes back."""
import asyncio
import json
import signal

import websockets

from test_interop import make_clone, recv

SLOW = ("--sim-ttft-ms", "0", "--sim-tokens-per-sec", "20")


def debate(server, token, max_tokens):
    ada, bob = make_clone(server, token, name="Ada"), make_clone(server, token, name="Bob")
    status, room = server.http("POST", "/v1/rooms", token, {
        "kind": "debate", "topic": "Tabs or spaces?", "rounds": 2, "max_tokens_per_turn": max_tokens,
        "clones": [{"clone": ada["id"], "stance": "tabs"}, {"clone": bob["id"], "stance": "spaces"}]})
    assert status == 201, room
    return room


async def watch_until_closed(ws, seen):
    """Frames until the server closes the socket (1001 on shutdown)."""
    try:
        while True:
            seen.append(await recv(ws))
    except websockets.exceptions.ConnectionClosed as closed:
        return closed.rcvd


def sigterm_after_first_token(server, token, room, say=None):
    """Joins the room, starts it (a debate) or says something (a translation chat), sends
    SIGTERM at the first token, and returns the frames after it and the close frame."""
    async def run():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "room.join", "id": "j", "room": room["id"]}))
            assert (await recv(ws))["type"] == "room.state"
            if say is None:
                await ws.send(json.dumps({"type": "room.control", "id": "go", "room": room["id"], "action": "start"}))
            else:
                await ws.send(json.dumps({"type": "room.say", "id": "s", "room": room["id"], "text": say}))
            while (frame := await recv(ws))["type"] != "token":
                assert frame["type"] != "error", frame
            server.proc.send_signal(signal.SIGTERM)
            after = []
            close = await watch_until_closed(ws, after)
            return frame, after, close

    first, after, close = asyncio.run(run())
    assert close is not None and close.code == 1001, close
    assert server.proc.wait(timeout=30) == 0
    return first, after


def test_sigterm_mid_debate_turn_lets_it_stream_for_the_grace_then_stores_it_cut_and_the_room_paused(start_server):
    args = (*SLOW, "--sim-reply-tokens", "5000", "--shutdown-grace", "1")
    server = start_server(*args)
    mod = server.token("mod")
    room = debate(server, mod, max_tokens=400)
    first, after = sigterm_after_first_token(server, mod, room)
    streamed = [f for f in after if f["type"] == "token" and f["stream"] == first["stream"]]
    # 20 tokens a second for a 1 s grace: the turn kept streaming (it used to be cut at once).
    assert len(streamed) >= 5, f"{len(streamed)} tokens after SIGTERM"
    ends = [f for f in after if f["type"] == "stream.end"]
    assert [e["reason"] for e in ends] == ["shutdown"] and ends[0]["stream"] == first["stream"]
    assert not [f for f in after if f["type"] == "stream.start"], "no new turn starts during the drain"

    again = start_server(*args)
    status, detail = again.http("GET", f"/v1/rooms/{room['id']}", mod)
    assert status == 200, detail
    assert detail["room"]["status"] == "paused"
    [turn] = detail["transcript"]
    assert turn["reason"] == "shutdown" and turn["stream"] == first["stream"]
    assert len(turn["text"]) >= len(first["text"]) + sum(len(f["text"]) for f in streamed) - 1


def test_sigterm_lets_a_debate_turn_finish_and_starts_no_other(start_server):
    args = (*SLOW, "--sim-reply-tokens", "10", "--shutdown-grace", "20")
    server = start_server(*args)
    mod = server.token("mod")
    room = debate(server, mod, max_tokens=100)
    first, after = sigterm_after_first_token(server, mod, room)
    assert [(f["stream"], f["reason"]) for f in after if f["type"] == "stream.end"] == [(first["stream"], "complete")]
    assert not [f for f in after if f["type"] == "stream.start"], "no new turn starts during the drain"

    again = start_server(*args)
    status, detail = again.http("GET", f"/v1/rooms/{room['id']}", mod)
    assert detail["room"]["status"] == "paused" and detail["room"]["turns_taken"] == 1
    assert [t["reason"] for t in detail["transcript"]] == ["complete"]


def test_sigterm_mid_translation_chat_reply_lets_it_stream_for_the_grace_then_stores_it_cut(start_server):
    args = (*SLOW, "--sim-reply-tokens", "5000", "--shutdown-grace", "1")
    server = start_server(*args)
    alice = server.token("alice")
    clone = make_clone(server, alice, name="Coco")
    status, room = server.http("POST", "/v1/rooms", alice, {
        "kind": "translation", "members": [], "languages": {"alice": "en"}, "clones": [{"clone": clone["id"], "language": "en"}]})
    assert status == 201, room
    first, after = sigterm_after_first_token(server, alice, room, say="Tell me a long story")
    streamed = [f for f in after if f["type"] == "token" and f["stream"] == first["stream"]]
    assert len(streamed) >= 5, f"{len(streamed)} tokens after SIGTERM"
    assert [(f["stream"], f["reason"]) for f in after if f["type"] == "stream.end"] == [(first["stream"], "shutdown")]

    again = start_server(*args)
    status, detail = again.http("GET", f"/v1/rooms/{room['id']}", alice)
    assert status == 200, detail
    said, reply = detail["transcript"]
    assert said["text"] == "Tell me a long story"
    assert reply["reason"] == "shutdown" and reply["stream"] == first["stream"] and reply["clone"] == clone["id"]


def test_healthz_says_draining_once_sigterm_arrives_so_a_balancer_stops_sending_sockets(start_server):
    """A balancer that polls /healthz over a keep-alive connection learns of the drain (the
    listening socket is already closed to new ones) while a reply in flight finishes."""
    import http.client

    from schemas import validate_rest
    from test_privacy import wait_until_refused

    server = start_server(*SLOW, "--sim-reply-tokens", "40")
    token = server.token("hana")
    clone = make_clone(server, token)
    balancer = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)

    def health():
        balancer.request("GET", "/healthz")
        response = balancer.getresponse()
        return response.status, validate_rest("health", json.loads(response.read()))

    assert health() == (200, {"status": "ok", "store": "ok"})

    async def run():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone["id"], "text": "go"}))
            while (await recv(ws))["type"] != "token":
                pass
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_until_refused, server.port)
            during = await asyncio.to_thread(health)
            while (frame := await recv(ws))["type"] != "stream.end":
                pass
            return during, frame

    during, end = asyncio.run(run())
    assert during == (503, {"status": "draining", "store": "ok"}), during
    assert end["reason"] == "complete", "the reply in flight still ran to its end"
    balancer.close()
    assert server.proc.wait(timeout=30) == 0
