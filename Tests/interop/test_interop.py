"""Drives the real server with Python's `websockets` package, a client nobody here wrote, and
checks every frame it receives against the published JSON Schemas."""
import asyncio
import json
import signal

import pytest
import websockets

from schemas import FRAMES, REST, SCHEMAS, validate_frame, validate_rest

TIMEOUT = 10  # a watchdog per receive, not a synchronisation delay


async def recv(ws):
    return validate_frame(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))


async def read_stream(ws):
    start = await recv(ws)
    assert start["type"] == "stream.start", start
    tokens = []
    while True:
        frame = await recv(ws)
        if frame["type"] == "stream.end":
            return start, tokens, frame
        assert frame["type"] == "token", frame
        tokens.append(frame)


def chat_once(server, token, clone, text):
    """One chat.send on a fresh socket: (stream.start, tokens, stream.end)."""
    async def chat():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone, "text": text}))
            return await read_stream(ws)
    return asyncio.run(chat())


def make_clone(server, token, **fields):
    status, body = server.http("POST", "/v1/clones", token, {"name": "Ada", "traits": ["curious"], **fields})
    assert status == 201, body
    return validate_rest("clone", body)


def test_full_chat_over_websockets(server):
    token = server.token("alice")
    assert validate_rest("health", server.http("GET", "/healthz")[1]) == {"status": "ok", "store": "ok"}
    clone = make_clone(server, token, sliders={"warmth": 60}, memory=["likes jazz"])

    async def run():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            assert await recv(ws) == {"type": "welcome", "user": "alice", "protocol": 1}
            await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone["id"], "text": "Hi there"}))
            return await read_stream(ws)

    start, tokens, end = asyncio.run(run())
    assert start["ref"] == "c1" and start["clone"] == clone["id"]
    assert [t["seq"] for t in tokens] == list(range(1, 21))
    assert end["reason"] == "complete" and end["usage"]["output_tokens"] == 20

    status, page = server.http("GET", f"/v1/conversations/{start['conversation']}/messages", token)
    assert status == 200
    validate_rest("message-page", page)
    assert [m["role"] for m in page["messages"]] == ["user", "assistant"]
    assert page["messages"][1]["id"] == end["message"]
    assert page["messages"][1]["text"] == "".join(t["text"] for t in tokens)
    validate_rest("conversation-page", server.http("GET", "/v1/conversations", token)[1])
    validate_rest("conversation", server.http("GET", f"/v1/conversations/{start['conversation']}", token)[1])
    validate_rest("clone-list", server.http("GET", "/v1/clones", token)[1])
    status, found = server.http("GET", "/v1/search?q=hi%20THERE", token)
    assert status == 200
    validate_rest("search-page", found)
    kinds = [item["kind"] for item in found["items"]]
    assert "message" in kinds and "title" in kinds, found
    user_hit = next(item for item in found["items"] if item["kind"] == "message" and item["message"]["role"] == "user")
    assert [run["text"] for run in user_hit["snippet"] if run.get("match")] == ["Hi", "there"]
    status, refused = server.http("GET", "/v1/search?q=%20", token)
    assert status == 400
    validate_rest("error", refused)


def test_regenerate_edit_and_choose_a_branch_over_websockets(server):
    """Every frame and body of #24's actions matches the published schemas."""
    token = server.token("carol")
    clone = make_clone(server, token)

    async def run():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone["id"], "text": "Hi there"}))
            first = await read_stream(ws)
            await ws.send(json.dumps({"type": "chat.regenerate", "id": "r1", "message": first[2]["message"]}))
            second = await read_stream(ws)
            path = validate_rest("message-page", server.http("GET", f"/v1/conversations/{first[0]['conversation']}/messages", token)[1])
            await ws.send(json.dumps({"type": "chat.edit", "id": "e1", "message": path["messages"][0]["id"], "text": "Hello"}))
            third = await read_stream(ws)
            await ws.send(json.dumps({"type": "chat.edit", "id": "e2", "message": third[2]["message"], "text": "x"}))
            refused = await recv(ws)
            return first, second, path, third, refused

    first, second, path, third, refused = asyncio.run(run())
    assert second[0]["ref"] == "r1" and second[0]["parent"] == first[0]["parent"] == path["messages"][0]["id"]
    assert [(m["alternatives"], m["alternative"]) for m in path["messages"]] == [(1, 0), (2, 1)]
    assert third[0]["ref"] == "e1" and refused["type"] == "error" and refused["code"] == "bad_request"
    conversation = first[0]["conversation"]
    status, chosen = server.http("POST", f"/v1/conversations/{conversation}/active", token, {"message": first[2]["message"]})
    assert status == 200 and [m["id"] for m in validate_rest("message-page", chosen)["messages"]] == [path["messages"][0]["id"], first[2]["message"]]
    status, error = server.http("POST", f"/v1/conversations/{conversation}/active", token, {"message": "msg_none"})
    assert status == 404 and validate_rest("error", error)["error"]["code"] == "not_found"


def test_authorization_header_and_refusals(server):
    token = server.token("bob")

    async def run():
        async with websockets.connect(server.ws, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            assert (await recv(ws))["user"] == "bob"
        for bad in [None, token[:-4] + "AAAA"]:
            url = server.ws if bad is None else f"{server.ws}?token={bad}"
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                async with websockets.connect(url):
                    pass
            assert refused.value.response.status_code == 401
            validate_rest("error", json.loads(refused.value.response.body))

    asyncio.run(run())


def test_errors_keep_the_socket_open(server):
    token = server.token("carol")
    clone = make_clone(server, token)

    async def run():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await recv(ws)
            for raw in ["{nope", json.dumps({"type": "chat.send", "id": "x"}), json.dumps({"type": "who", "id": "y"})]:
                await ws.send(raw)
                error = await recv(ws)
                assert error["type"] == "error" and error["code"] == "bad_request"
            await ws.send(json.dumps({"type": "chat.send", "id": "z", "clone": "cl_nope", "text": "hi"}))
            assert (await recv(ws))["code"] == "not_found"
            await ws.send(json.dumps({"type": "chat.send", "id": "ok", "clone": clone["id"], "text": "hi"}))
            _, _, end = await read_stream(ws)
            assert end["reason"] == "complete"

    asyncio.run(run())


def test_resume_after_reconnect(start_server):
    server = start_server("--sim-ttft-ms", "0", "--sim-tokens-per-sec", "100", "--sim-reply-tokens", "40")
    token = server.token("dana")
    clone = make_clone(server, token)

    async def run():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone["id"], "text": "story"}))
            start = await recv(ws)
            seen = [await recv(ws) for _ in range(5)]
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "stream.resume", "id": "r1", "stream": start["stream"], "after": seen[-1]["seq"]}))
            ack, rest, end = await read_stream(ws)
            assert ack["ref"] == "r1"
            return seen + rest, end

    tokens, end = asyncio.run(run())
    assert [t["seq"] for t in tokens] == list(range(1, 41))
    assert end["reason"] == "complete"


def test_sigterm_ends_streams_stores_them_and_closes_with_1001(start_server, data_dir):
    # No grace: the reply is ended at once (test_privacy.py covers the drain that lets it finish).
    server = start_server("--sim-ttft-ms", "0", "--sim-tokens-per-sec", "20", "--sim-reply-tokens", "5000", "--shutdown-grace", "0")
    token = server.token("erin")
    clone = make_clone(server, token)

    async def run():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone["id"], "text": "go"}))
            start = await recv(ws)
            await recv(ws)  # the first token: the stream is running
            server.proc.send_signal(signal.SIGTERM)
            while True:
                frame = await recv(ws)
                if frame["type"] == "stream.end":
                    break
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            return start, frame, closed.value.rcvd

    start, end, close = asyncio.run(run())
    assert end["reason"] == "shutdown" and "message" in end
    assert close.code == 1001
    assert server.proc.wait(timeout=20) == 0

    # Restarted on the same data directory, the partial reply is there.
    again = start_server("--sim-ttft-ms", "0", "--sim-tokens-per-sec", "0")
    status, page = again.http("GET", f"/v1/conversations/{start['conversation']}/messages", again.token("erin"))
    assert status == 200
    last = page["messages"][-1]
    assert last["id"] == end["message"] and last["reason"] == "shutdown"
    assert again.stop() == 0


def test_a_user_past_the_socket_limit_is_closed_with_1008_and_the_others_stay(data_dir):
    from conftest import Server
    server = Server(data_dir, "--max-sockets-per-user", "2")
    try:
        token = server.token("fay")

        async def run():
            async with websockets.connect(f"{server.ws}?token={token}") as a, websockets.connect(f"{server.ws}?token={token}") as b:
                assert (await recv(a))["type"] == "welcome" and (await recv(b))["type"] == "welcome"
                async with websockets.connect(f"{server.ws}?token={token}") as c:
                    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                        await asyncio.wait_for(c.recv(), TIMEOUT)
                # The two within the limit still work; another user is not affected.
                await a.send(json.dumps({"type": "nope", "id": "still-here"}))
                assert (await recv(a))["ref"] == "still-here"
                async with websockets.connect(f"{server.ws}?token={server.token('gus')}") as other:
                    assert (await recv(other))["type"] == "welcome"
                return closed.value.rcvd

        close = asyncio.run(run())
        assert close.code == 1008 and "too many open sockets" in close.reason
    finally:
        assert server.stop() == 0


def test_examples_match_the_schemas():
    examples = sorted((SCHEMAS.parent / "examples").glob("*.jsonl"))
    assert examples, "no example sessions"
    count = 0
    for path in examples:
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if "frame" not in entry:
                continue
            if entry.get("invalid"):
                with pytest.raises(Exception):
                    validate_frame(entry["frame"])
            else:
                validate_frame(entry["frame"])
            count += 1
    assert count > 10
    assert {"welcome", "chat.send", "chat.cancel", "stream.resume", "stream.start", "token", "stream.end", "error"} <= FRAMES.keys()
    assert {"clone", "message", "error"} <= REST.keys()


def test_schemas_reject_what_the_server_must_never_send():
    with pytest.raises(Exception):
        validate_frame({"type": "token", "stream": "s", "seq": 0, "text": "x"})
    with pytest.raises(Exception):
        validate_frame({"type": "stream.end", "stream": "s", "reason": "finished", "usage": {"input_tokens": 1, "output_tokens": 1}})
    with pytest.raises(Exception):
        validate_frame({"type": "welcome", "user": "a", "protocol": 1, "extra": True})


def test_handshakes_over_the_per_ip_rate_get_429_with_a_json_body(data_dir):
    from conftest import Server
    server = Server(data_dir, "--max-handshakes-per-ip", "1", "--limit-loopback-handshakes")  # bursts of 2
    try:
        token = server.token("hal")

        async def run():
            for _ in range(2):
                async with websockets.connect(f"{server.ws}?token={token}") as ws:
                    assert (await recv(ws))["type"] == "welcome"
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                await websockets.connect(f"{server.ws}?token={token}")
            return refused.value.response

        response = asyncio.run(run())
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        body = validate_rest("error", json.loads(response.body))
        assert body["error"]["code"] == "rate_limited"
        assert server.http("GET", "/healthz")[0] == 200, "only handshakes are limited"
    finally:
        assert server.stop() == 0


def test_failed_sign_ins_from_one_address_are_slowed_down(data_dir):
    from conftest import Server
    from websockets.exceptions import InvalidStatus
    # Loopback is exempt by default (a local proxy); this server holds it to the limit.
    server = Server(data_dir, "--limit-loopback-handshakes", "--max-handshakes-per-ip", "0")
    try:
        for _ in range(5):
            assert server.http("GET", "/v1/clones", "forged")[0] == 401
        status, body = server.http("GET", "/v1/clones", "forged")
        assert status == 401, "the sixth failure is answered, then the address waits"
        status, body = server.http("GET", "/v1/clones", server.token("val"))
        assert status == 429 and body["error"]["code"] == "rate_limited", "even a good token waits out the block"

        async def handshake():
            with pytest.raises(InvalidStatus) as refused:
                async with websockets.connect(f"{server.ws}?token=forged"):
                    pass
            return refused.value.response
        response = asyncio.run(handshake())
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    finally:
        assert server.stop() == 0


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_handshake_budget(data_dir):
    """`--trusted-proxies` names the balancer: the address its X-Forwarded-For gives is the
    client's for the per-address limits; without it, the header is not believed."""
    from conftest import Server

    async def handshake(server, token, forwarded=None):
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        try:
            async with websockets.connect(f"{server.ws}?token={token}", additional_headers=headers) as ws:
                return (await recv(ws))["type"]
        except websockets.exceptions.InvalidStatus as refused:
            return refused.response.status_code

    proxied = Server(data_dir, "--max-handshakes-per-ip", "1", "--trusted-proxies", "127.0.0.1/32")  # bursts of 2
    try:
        token = proxied.token("pat")

        async def run():
            first = [await handshake(proxied, token, "203.0.113.5") for _ in range(3)]
            # A client that writes its own header first is still known by what the proxy appended.
            forged = await handshake(proxied, token, "198.51.100.99, 203.0.113.5")
            other = await handshake(proxied, token, "198.51.100.7")
            return first, forged, other

        first, forged, other = asyncio.run(run())
        assert first == ["welcome", "welcome", 429] and forged == 429, (first, forged)
        assert other == "welcome", "another client behind the same proxy has a budget of its own"
    finally:
        assert proxied.stop() == 0

    plain = Server(data_dir, "--max-handshakes-per-ip", "1")  # loopback is exempt, and the header is not believed
    try:
        token = plain.token("pat")
        async def three():
            return [await handshake(plain, token, "203.0.113.5") for _ in range(3)]

        results = asyncio.run(three())
        assert results == ["welcome"] * 3, results
    finally:
        assert plain.stop() == 0
