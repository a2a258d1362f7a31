"""Parley with --provider openai against a scripted OpenAI-compatible server: a reply streamed
through Parley token by token, usage reconciled from the provider's own usage chunk, and the
clone's persona in the system prompt the provider received."""
import asyncio
import json
import os
import subprocess
import sys
import urllib.request

import pytest

from conftest import ROOT, Server
import websockets

from test_interop import chat_once, make_clone, read_stream, recv


def start_fake_openai(*args):
    proc = subprocess.Popen([sys.executable, str(ROOT / "Tests" / "fixtures" / "fake_openai_server.py"), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, int(line.split()[-1])


@pytest.fixture
def fake_openai():
    proc, port = start_fake_openai()
    yield port
    proc.stdin.close()
    proc.wait(timeout=10)


def test_more_replies_stream_from_one_upstream_at_once_than_a_default_http_pool_holds(data_dir):
    """#26 saw 8 upstream connections at 100 concurrent replies (AsyncHTTPClient's shared client and
    its per-host soft limit of 8): the rest waited seconds for a connection. Here the upstream holds
    every reply after its first piece until 20 stream at once."""
    concurrent = 20
    proc, port = start_fake_openai("--hold", str(concurrent), "--hold-seconds", "15")
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps({"models": {"fake-model": {"input_per_1k": 1, "output_per_1k": 1}}}))
    server = Server(data_dir, "--provider", "openai", "--provider-url", f"http://127.0.0.1:{port}/v1",
                    "--provider-model", "fake-model", "--prices", str(prices), "--provider-concurrency", "32")
    try:
        users = [(server.token(f"u{i}"), None) for i in range(concurrent)]
        users = [(token, make_clone(server, token)["id"]) for token, _ in users]

        async def chat(token, clone):
            async with websockets.connect(f"{server.ws}?token={token}") as ws:
                await recv(ws)
                await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone, "text": "Hello!"}))
                return await read_stream(ws)

        async def everyone():
            return await asyncio.wait_for(asyncio.gather(*(chat(token, clone) for token, clone in users)), 60)

        ends = [end for _, _, end in asyncio.run(everyone())]
        assert [end["reason"] for end in ends] == ["complete"] * concurrent
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/open", timeout=10) as resp:
            assert json.loads(resp.read())["max_open"] == concurrent
    finally:
        assert server.stop() == 0
        proc.stdin.close()
        proc.wait(timeout=10)


def test_a_reply_streams_from_an_openai_compatible_provider(data_dir, fake_openai, monkeypatch):
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps({"models": {"fake-model": {"input_per_1k": 1000, "output_per_1k": 2000}}}))
    monkeypatch.setenv("FAKE_KEY", "sk-fake")
    server = Server(data_dir, "--provider", "openai", "--provider-url", f"http://127.0.0.1:{fake_openai}/v1",
                    "--provider-model", "fake-model", "--provider-key-env", "FAKE_KEY", "--prices", str(prices))
    try:
        token = server.token("alice")
        clone = make_clone(server, token, system_prompt="You are Ada, a lighthouse keeper.")

        start, tokens, end = chat_once(server, token, clone["id"], "Hello!")
        assert start["model"] == "fake-model"
        assert "".join(t["text"] for t in tokens) == "Olá, é um prazer 🌊"
        assert end["reason"] == "complete"
        assert end["usage"] == {"input_tokens": 17, "output_tokens": 6}, "usage is the provider's, reconciled"
        # 17 input tokens at 1000/1k and 6 output at 2000/1k, each rounded up once.
        assert end["cost"] == 17 + 12

        with urllib.request.urlopen(f"http://127.0.0.1:{fake_openai}/v1/requests", timeout=10) as resp:
            sent = json.loads(resp.read())[-1]
        assert sent["path"] == "/v1/chat/completions" and sent["authorization"] == "Bearer sk-fake"
        body = sent["body"]
        assert body["model"] == "fake-model" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["messages"][0]["role"] == "system" and "lighthouse keeper" in body["messages"][0]["content"]
        assert body["messages"][-1] == {"role": "user", "content": "Hello!"}
    finally:
        assert server.stop() == 0


def test_a_real_provider_needs_a_price_for_its_model(data_dir):
    from conftest import BINARY
    result = subprocess.run([str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir), "--provider", "openai",
                             "--provider-url", "http://127.0.0.1:9/v1", "--provider-model", "unpriced"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no entry for model 'unpriced'" in result.stderr


def test_a_clone_names_its_model_and_is_metered_at_its_price(data_dir, fake_openai):
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps({"models": {"fake-model": {"input_per_1k": 1000, "output_per_1k": 2000},
                                             "fake-big": {"input_per_1k": 3000, "output_per_1k": 5000}}}))
    server = Server(data_dir, "--provider", "openai", "--provider-url", f"http://127.0.0.1:{fake_openai}/v1",
                    "--provider-model", "fake-model", "--provider-models", "fake-big", "--prices", str(prices),
                    "--max-reply-tokens", "77")
    try:
        token = server.token("alice")
        status, body = server.http("POST", "/v1/clones", token, {"name": "Ada", "model": "gpt-nope"})
        assert status == 400 and body["error"]["code"] == "bad_request"
        assert "gpt-nope" in body["error"]["message"] and "fake-model, fake-big" in body["error"]["message"]
        big = make_clone(server, token, model="fake-big")
        assert big["model"] == "fake-big"
        plain = make_clone(server, token)
        assert plain["model"] is None

        def last_model_asked():
            with urllib.request.urlopen(f"http://127.0.0.1:{fake_openai}/v1/requests", timeout=10) as resp:
                body = json.loads(resp.read())[-1]["body"]
            assert body["max_tokens"] == 77, "--max-reply-tokens is the provider's max_tokens"
            return body["model"]

        start, _, end = chat_once(server, token, big["id"], "Hello!")
        assert start["model"] == "fake-big" and last_model_asked() == "fake-big"
        assert end["cost"] == 17 * 3 + 6 * 5, "17 input tokens at 3000/1k, 6 output at 5000/1k"
        start, _, end = chat_once(server, token, plain["id"], "Hello!")
        assert start["model"] == "fake-model" and last_model_asked() == "fake-model" and end["cost"] == 17 + 12
        # Back to the default with null.
        status, body = server.http("PATCH", f"/v1/clones/{big['id']}", token, {"model": None})
        assert status == 200 and body["model"] is None
        start, _, _ = chat_once(server, token, big["id"], "Hello!")
        assert start["model"] == "fake-model" and last_model_asked() == "fake-model"
    finally:
        assert server.stop() == 0


def test_every_offered_model_needs_a_price(data_dir):
    from conftest import BINARY
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps({"models": {"fake-model": {"input_per_1k": 1, "output_per_1k": 1}}}))
    result = subprocess.run([str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir), "--provider", "openai",
                             "--provider-url", "http://127.0.0.1:9/v1", "--provider-model", "fake-model",
                             "--provider-models", "fake-model,unpriced", "--prices", str(prices)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no entry for model 'unpriced'" in result.stderr


@pytest.mark.skipif(not os.environ.get("PARLEY_TEST_OPENAI_BASE_URL"),
                    reason="set PARLEY_TEST_OPENAI_BASE_URL (and PARLEY_TEST_OPENAI_MODEL, PARLEY_TEST_OPENAI_API_KEY) to stream from a real server")
def test_smoke_a_real_openai_compatible_server(data_dir):
    """A reply streamed through Parley from the server the environment names (OpenAI, vLLM…)."""
    model = os.environ.get("PARLEY_TEST_OPENAI_MODEL", "gpt-4o-mini")
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps({"models": {model: {"input_per_1k": 1000, "output_per_1k": 1000}}}))
    server = Server(data_dir, "--provider", "openai", "--provider-url", os.environ["PARLEY_TEST_OPENAI_BASE_URL"],
                    "--provider-model", model, "--provider-key-env", "PARLEY_TEST_OPENAI_API_KEY", "--prices", str(prices))
    try:
        token = server.token("alice")
        clone = make_clone(server, token, system_prompt="Answer in five words or fewer.")

        start, tokens, end = chat_once(server, token, clone["id"], "Say hello.")
        assert start["model"] == model and end["reason"] == "complete", end
        assert "".join(t["text"] for t in tokens).strip() and end["usage"]["output_tokens"] > 0
    finally:
        assert server.stop() == 0
