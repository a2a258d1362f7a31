"""Scheduled messages through the real binary: frames and REST bodies against the schemas, and
durability across a crash (SIGKILL) and restart."""
import asyncio
import json
import signal
import time
from datetime import datetime

import websockets

from schemas import validate_frame, validate_rest
from test_interop import TIMEOUT, make_clone, read_stream, recv


async def next_of(ws, kind):
    """Frames until one of type `kind` (every frame is schema-checked on the way)."""
    while True:
        frame = await recv(ws)
        if frame["type"] == kind:
            return frame


def test_text_and_prompt_schedules_are_streamed_delivered_and_listed(server):
    token = server.token("alice")
    clone = make_clone(server, token)

    async def run():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "schedule.create", "id": "s1", "clone": clone["id"], "delay_ms": 100,
                                      "text": "Good morning"}))
            ok = await recv(ws)
            assert ok["type"] == "schedule.ok" and ok["ref"] == "s1" and ok["schedule"]["status"] == "pending"
            text_delivery = await next_of(ws, "delivery")
            assert text_delivery["schedule"] == ok["schedule"]["id"]
            assert text_delivery["message"]["text"] == "Good morning"

            await ws.send(json.dumps({"type": "schedule.create", "id": "s2", "clone": clone["id"],
                                      "conversation": text_delivery["conversation"], "delay_ms": 0, "prompt": "the news"}))
            ok2 = await next_of(ws, "schedule.ok")
            start, tokens, end = await read_stream(ws)
            assert start["schedule"] == ok2["schedule"]["id"] and end["reason"] == "complete"
            prompt_delivery = await next_of(ws, "delivery")
            assert prompt_delivery["message"]["text"] == "".join(t["text"] for t in tokens)

            await ws.send(json.dumps({"type": "schedule.create", "id": "s3", "clone": clone["id"], "delay_ms": 3_600_000,
                                      "text": "later"}))
            later = (await next_of(ws, "schedule.ok"))["schedule"]
            await ws.send(json.dumps({"type": "schedule.cancel", "id": "x1", "schedule": later["id"]}))
            cancelled = await recv(ws)
            assert cancelled["type"] == "schedule.cancelled" and cancelled["schedule"]["status"] == "cancelled"
            await ws.send(json.dumps({"type": "schedule.cancel", "id": "x2", "schedule": later["id"]}))
            assert (await recv(ws))["code"] == "conflict"
            return ok["schedule"]["id"], ok2["schedule"]["id"], later["id"]

    first, second, third = asyncio.run(run())
    status, page = server.http("GET", "/v1/schedules?limit=2", token)
    assert status == 200
    validate_rest("schedule-page", page)
    assert [s["id"] for s in page["schedules"]] == [third, second]
    status, rest = server.http("GET", f"/v1/schedules?limit=2&before={page['next_before']}", token)
    assert status == 200 and [s["id"] for s in validate_rest("schedule-page", rest)["schedules"]] == [first]
    assert rest["next_before"] is None
    validate_rest("schedule", await_status(server, token, first, "delivered"))
    status, body = server.http("DELETE", f"/v1/schedules/{first}", token)
    assert status == 409 and validate_rest("error", body)["error"]["code"] == "conflict"
    status, body = server.http("POST", "/v1/schedules", token, {"clone": clone["id"], "at": "not a time", "text": "x"})
    assert status == 400 and body["error"]["message"].startswith("'at' must be an RFC 3339 time")


def test_a_schedule_survives_a_crash_and_is_delivered_once(start_server, data_dir, store_args):
    server = start_server()
    token = server.token("bob")
    clone = make_clone(server, token)
    status, created = server.http("POST", "/v1/schedules", token, {"clone": clone["id"], "delay_ms": 3_000, "text": "remember me"})
    assert status == 201, created
    validate_rest("schedule", created)
    server.stop(signal.SIGKILL)

    again = start_server()
    # A delivery for a socket that is open when it fires, or from the inbox if it fired first.
    async def run():
        async with websockets.connect(f"{again.ws}?token={token}") as ws:
            await recv(ws)
            delivery = await next_of(ws, "delivery")
            assert delivery["schedule"] == created["id"] and delivery["message"]["text"] == "remember me"
            assert time.time() * 1000 >= delivery_time(created)
    asyncio.run(run())

    # Delivered exactly once: recorded as such, and the transcript holds the message once.
    state = await_status(again, token, created["id"], "delivered")
    status, page = again.http("GET", f"/v1/conversations/{state['conversation']}/messages", token)
    assert [m["text"] for m in page["messages"]] == ["remember me"]

    async def reconnect():
        async with websockets.connect(f"{again.ws}?token={token}") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "schedule.create", "id": "probe", "clone": clone["id"], "delay_ms": 0, "text": "probe"}))
            frames = []
            while True:
                frame = await recv(ws)
                frames.append(frame)
                if frame["type"] == "delivery" and frame["message"]["text"] == "probe":
                    return frames
    frames = asyncio.run(reconnect())
    assert [f for f in frames if f["type"] == "delivery" and f["schedule"] == created["id"]] == []
    assert again.stop() == 0


def await_status(server, token, schedule_id, status):
    """Polls until the schedule reaches `status`: a change that has no frame of its own."""
    deadline = time.monotonic() + TIMEOUT
    while (state := server.http("GET", f"/v1/schedules/{schedule_id}", token)[1])["status"] != status:
        assert time.monotonic() < deadline, state
        time.sleep(0.02)  # poll interval, not a synchronisation delay
    return state


def delivery_time(schedule):
    return datetime.fromisoformat(schedule["at"].replace("Z", "+00:00")).timestamp() * 1000
