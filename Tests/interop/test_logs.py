"""--log-format json: every line the server writes is one JSON object, and at info level no line
carries what users wrote or what a clone answered."""
import asyncio
import json

import websockets

from conftest import Server
from test_interop import make_clone


def test_json_logs_parse_line_by_line_and_hold_no_message_text(data_dir):
    server = Server(data_dir, "--log-format", "json", "--log-level", "info")
    secret = "my-private-words-7f3a"
    try:
        token = server.token("lea")
        clone = make_clone(server, token)

        async def chat():
            async with websockets.connect(f"{server.ws}?token={token}") as ws:
                await ws.recv()
                await ws.send(json.dumps({"type": "chat.send", "id": "l1", "clone": clone["id"], "text": secret}))
                reply = []
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if frame["type"] == "token":
                        reply.append(frame["text"])
                    if frame["type"] == "stream.end":
                        return "".join(reply)
        reply = asyncio.run(chat())
        assert server.http("GET", "/v1/clones/cl_missing", token)[0] == 404
    finally:
        assert server.stop() == 0
    lines = [line for line in server.proc.stderr.read().splitlines() if line]
    assert lines, "the server logged its start and stop at least"
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "label", "message"} <= entry.keys(), entry
        assert entry["level"] in ("info", "notice", "warning", "error", "critical")
    text = "\n".join(lines)
    assert secret not in text and reply.strip() and reply.strip() not in text
    assert any(json.loads(line)["message"] == "listening" and json.loads(line)["port"] == str(server.port) for line in lines)
