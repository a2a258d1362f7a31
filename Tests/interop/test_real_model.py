"""Parley against a real model on this machine (Sources/ParleySidecar/model-server.py: llama.cpp's server with
SmolLM2-135M), through both providers: a real streamed reply, a title and a regenerated reply
written by it, credits settled from the usage the model server reported, and a cancel that stops
the model server's work."""
import asyncio
import json
import time
import urllib.request

import pytest
import websockets

from conftest import Server
from test_interop import make_clone, read_stream, recv


def slots_busy(base):
    with urllib.request.urlopen(f"{base}/slots", timeout=5) as response:
        return [slot["id"] for slot in json.loads(response.read()) if slot.get("is_processing")]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_real_model_streams_through_parley(data_dir, model_server, provider):
    base = model_server.base
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps({"models": {"smollm2": {"input_per_1k": 1000, "output_per_1k": 2000}}}))
    url = base + "/v1" if provider == "openai" else base
    server = Server(data_dir, "--provider", provider, "--provider-url", url, "--provider-model", "smollm2", "--prices", str(prices),
                    "--generated-titles")
    try:
        token = server.token("alice")
        clone = make_clone(server, token, system_prompt="You are Ada. Answer in one short sentence.")

        async def run():
            async with websockets.connect(f"{server.ws}?token={token}") as ws:
                await recv(ws)
                await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone["id"], "text": "Say hello."}))
                reply = await read_stream(ws)
                # The model titles the new conversation, then writes another reply in the first's place.
                title = await recv(ws)
                await ws.send(json.dumps({"type": "chat.regenerate", "id": "r1", "message": reply[2]["message"]}))
                regenerated = await read_stream(ws)
                assert title["type"] == "conversation.title" and title["title"].strip(), title
                assert regenerated[0]["parent"] == reply[0]["parent"] and regenerated[2]["reason"] == "complete"
                assert "".join(t["text"] for t in regenerated[1]).strip()
                # A long reply, cancelled after its first token: the model server must stop too.
                await ws.send(json.dumps({"type": "chat.send", "id": "c2", "clone": clone["id"],
                                          "text": "Write a very long story about the sea, at least five hundred words."}))
                start = await recv(ws)
                assert start["type"] == "stream.start", start
                while (await recv(ws))["type"] != "token":
                    pass
                await ws.send(json.dumps({"type": "chat.cancel", "id": "x", "stream": start["stream"]}))
                while True:
                    frame = await recv(ws)
                    if frame["type"] == "stream.end":
                        return reply, frame

        (start, tokens, end), cancelled = asyncio.run(run())
        assert start["model"] == "smollm2"
        assert end["reason"] == "complete" and len(tokens) >= 1 and "".join(t["text"] for t in tokens).strip()
        usage = end["usage"]
        assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
        assert end["cost"] == usage["input_tokens"] + 2 * usage["output_tokens"], "settled from the model server's usage"
        assert cancelled["reason"] == "cancelled"
        deadline = time.monotonic() + 3  # the long story alone would keep a slot busy for several seconds
        while slots_busy(base):  # bounded poll: the model server has no event to wait on
            assert time.monotonic() < deadline, "the model server kept generating after the cancel"
            time.sleep(0.05)
    finally:
        assert server.stop() == 0


def test_a_real_model_folds_a_long_conversation_into_a_summary(data_dir, model_server):
    """With a small prompt budget the conversation outgrows its prompt within a few turns: the
    model writes the rolling summary, metered as feature `summary`, and it is stored."""
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps({"models": {"smollm2": {"input_per_1k": 1000, "output_per_1k": 2000}}}))
    server = Server(data_dir, "--provider", "openai", "--provider-url", model_server.base + "/v1", "--provider-model", "smollm2",
                    "--prices", str(prices), "--context-budget", "300", "--max-reply-tokens", "48")
    try:
        token = server.token("ann")
        clone = make_clone(server, token, system_prompt="You are Ada. Answer in one short sentence.")
        said = ["My sister is called Wilhelmina and she lives in Porto, by the sea.",
                "What is a good fruit to eat in the spring, and why is it good for you?",
                "What is a good fruit to eat in the summer, and why is it good for you?",
                "What is a good fruit to eat in the autumn, and why is it good for you?",
                "What is a good fruit to eat in the winter, and why is it good for you?",
                "Which of those fruits keeps longest in a cool dark cupboard at home?",
                "And which of them would you bake into a pie for a family dinner?",
                "How long should that pie bake, and at what temperature in the oven?"]

        async def run():
            conversation = None
            async with websockets.connect(f"{server.ws}?token={token}") as ws:
                await recv(ws)
                for i, text in enumerate(said):
                    frame = {"type": "chat.send", "id": f"c{i}", "clone": clone["id"], "text": text}
                    if conversation:
                        frame["conversation"] = conversation
                    await ws.send(json.dumps(frame))
                    start, _, end = await read_stream(ws)
                    assert end["reason"] == "complete", end
                    conversation = start["conversation"]
                    summary = server.http("GET", f"/v1/conversations/{conversation}", token)[1].get("summary")
                    if summary:
                        return conversation, summary
            return conversation, None

        conversation, summary = asyncio.run(run())
        assert summary and summary["text"].strip(), "no fold within the turns"
        messages = server.http("GET", f"/v1/conversations/{conversation}/messages", token)[1]["messages"]
        assert summary["through"] in [m["id"] for m in messages[:-2]]
        entries = server.http("GET", "/v1/credits?limit=100", token)[1]["entries"]
        assert any(e.get("feature") == "summary" for e in entries), entries
    finally:
        assert server.stop() == 0
