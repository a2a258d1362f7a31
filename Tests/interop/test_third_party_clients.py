"""A full chat stream through clients nobody here wrote, with permessage-deflate negotiated and
without: Python's `websockets`, aiohttp, and Node's `ws` (Debian's node-ws). Each must get every
token of the reply, and with compression on, the extension each reports is the one Parley
answered (server window 12 bits, no client context takeover)."""
import asyncio
import json
import os
import shutil
import subprocess

import aiohttp
import pytest
import websockets

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
                # aiohttp reports its own compressor's window bits (15), 0 for no extension.
                assert ws.compress == (15 if compress else 0)
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


@pytest.mark.parametrize("compression", ["deflate", None], ids=["deflate", "plain"])
def test_python_websockets_streams_a_whole_reply(server, compression):
    token = server.token("pyw")
    clone = make_clone(server, token)

    async def run():
        async with websockets.connect(f"{server.ws}?token={token}", compression=compression) as ws:
            negotiated = [(e.name, e.remote_no_context_takeover, e.remote_max_window_bits) for e in ws.protocol.extensions]
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
            await ws.send(json.dumps({"type": "chat.send", "id": "w1", "clone": clone["id"], "text": "Hello from websockets"}))
            tokens = []
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame["type"] == "token":
                    tokens.append(frame)
                elif frame["type"] == "stream.end":
                    return negotiated, tokens, frame

    negotiated, tokens, end = asyncio.run(run())
    check(tokens, end)
    # Seen from the client, the server is the remote end: its window is 12 bits.
    assert negotiated == ([("permessage-deflate", False, 12)] if compression else [])


@pytest.mark.parametrize("deflate", [True, False], ids=["deflate", "plain"])
def test_node_ws_streams_a_whole_reply(server, deflate):
    node = shutil.which("node") or shutil.which("nodejs")
    assert node, "node is installed by scripts/setup.sh --test"
    token = server.token("nod")
    clone = make_clone(server, token)
    env = dict(os.environ, NODE_PATH="/usr/share/nodejs")
    result = subprocess.run([node, os.path.join(HERE, "ws_chat.mjs"), f"{server.ws}?token={token}", clone["id"], "deflate" if deflate else "plain"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["binary"] is False
    assert summary["extensions"] == ("permessage-deflate" if deflate else "")
    check([{"seq": s} for s in summary["seqs"]], summary["end"])
    assert summary["text"].strip()
