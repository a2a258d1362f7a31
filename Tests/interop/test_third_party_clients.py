"""A full chat stream through clients nobody here wrote: aiohttp (with and without offering
permessage-deflate) and Node's `ws` (Debian's node-ws, which offers it by default). Parley
negotiates no extension, so each must fall back to plain frames and still get every token."""
import asyncio
import json
import os
import shutil
import subprocess

import aiohttp
import pytest

from test_interop import make_clone

HERE = os.path.dirname(__file__)


def check(tokens, end):
    assert end["reason"] == "complete" and end["usage"]["output_tokens"] == len(tokens) > 0
    assert [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1)), "every token once, in order"


@pytest.mark.parametrize("compress", [0, 15], ids=["plain", "offers-deflate"])
def test_aiohttp_streams_a_whole_reply(server, compress):
    token = server.token("ana")
    clone = make_clone(server, token)

    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.ws}?token={token}", compress=compress, timeout=aiohttp.ClientWSTimeout(ws_close=10)) as ws:
                assert (await ws.receive_json(timeout=10))["type"] == "welcome"
                assert ws.compress == 0, "no extension was negotiated"
                await ws.send_json({"type": "chat.send", "id": "a1", "clone": clone["id"], "text": "Hello from aiohttp"})
                tokens = []
                while True:
                    frame = await ws.receive_json(timeout=10)
                    if frame["type"] == "token":
                        tokens.append(frame)
                    elif frame["type"] == "stream.end":
                        await ws.close()
                        return tokens, frame, ws.close_code

    tokens, end, code = asyncio.run(run())
    check(tokens, end)
    assert code == 1000


def test_node_ws_streams_a_whole_reply(server):
    node = shutil.which("node") or shutil.which("nodejs")
    assert node, "node is installed by scripts/setup.sh --test"
    token = server.token("nod")
    clone = make_clone(server, token)
    env = dict(os.environ, NODE_PATH="/usr/share/nodejs")
    result = subprocess.run([node, os.path.join(HERE, "ws_chat.mjs"), f"{server.ws}?token={token}", clone["id"]],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["binary"] is False and summary["extensions"] == ""
    check([{"seq": s} for s in summary["seqs"]], summary["end"])
    assert summary["text"].strip()
