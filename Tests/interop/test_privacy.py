"""The privacy promises through the real binary, on both stores: the export is one valid document
of the caller's data only, deletion leaves nothing readable and closes the caller's sockets, no
raw client address reaches a stored document or a log line, and SIGTERM drains."""
import asyncio
import http.client
import json
import os
import stat
import signal
import threading

import pytest
import websockets

from conftest import Server
from schemas import validate_rest
from test_interop import TIMEOUT, make_clone, read_stream, recv

# Linux routes all of 127/8 to loopback: a client bound here is told apart from the server's own
# 127.0.0.1 in every byte the server writes.
CLIENT_IP = "127.0.0.2"


def http_from(server, method, path, token=None, body=None, source=CLIENT_IP):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=(source, 0))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, (json.loads(raw) if raw else None), {k.lower(): v for k, v in resp.getheaders()}


def chat_once(server, token, clone, text, source=CLIENT_IP):
    async def run():
        async with websockets.connect(f"{server.ws}?token={token}", local_addr=(source, 0)) as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "chat.send", "id": "p1", "clone": clone, "text": text}))
            return await read_stream(ws)
    return asyncio.run(run())


def test_the_export_is_one_valid_document_of_the_callers_data_only(server):
    alice, bob = server.token("alice"), server.token("bob-elsewhere")
    mine, theirs = make_clone(server, alice, name="Mine"), make_clone(server, bob, name="Theirs")
    start, _, _ = chat_once(server, alice, mine["id"], "hello", source="127.0.0.1")
    chat_once(server, bob, theirs["id"], "private words of bob", source="127.0.0.1")
    status, export, headers = http_from(server, "GET", "/v1/me/export", alice, source="127.0.0.1")
    assert status == 200 and headers.get("transfer-encoding") == "chunked"
    validate_rest("export", export)
    assert [c["id"] for c in export["clones"]] == [mine["id"]]
    assert [c["conversation"]["id"] for c in export["conversations"]] == [start["conversation"]]
    assert len(export["conversations"][0]["messages"]) == 2
    text = json.dumps(export)
    assert "bob-elsewhere" not in text and theirs["id"] not in text and "private words of bob" not in text


def test_after_deletion_nothing_is_readable_and_the_socket_is_closed(server):
    token = server.token("dora")
    clone = make_clone(server, token)
    start, _, _ = chat_once(server, token, clone["id"], "remember me", source="127.0.0.1")

    async def delete_while_connected():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await recv(ws)
            status, body = await asyncio.to_thread(server.http, "DELETE", "/v1/me", token)
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            return status, body, closed.value.rcvd
    status, body, close = asyncio.run(delete_while_connected())
    assert status == 200 and validate_rest("account-deletion", body)["removed"]["messages"] == 2
    assert close.code == 1008 and close.reason == "account deleted"
    assert server.http("GET", f"/v1/clones/{clone['id']}", token)[0] == 404
    assert server.http("GET", f"/v1/conversations/{start['conversation']}", token)[0] == 404
    assert server.http("GET", f"/v1/conversations/{start['conversation']}/messages", token)[0] == 404
    _, export, _ = http_from(server, "GET", "/v1/me/export", token, source="127.0.0.1")
    assert all(export[k] == [] for k in ("clones", "conversations", "rooms", "schedules", "ledger"))


def test_no_raw_client_address_in_any_stored_document_or_log_line(start_server, store_args, data_dir):
    server = start_server("--log-format", "json", "--log-level", "info", "--limit-loopback-handshakes",
                          "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "0", "--sim-reply-tokens", "5")
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(server.proc.stderr), daemon=True)
    reader.start()  # the pipe never fills, however much the server logs
    user, admin = server.token("ivy"), server.token("root", role="admin")

    status, clone, _ = http_from(server, "POST", "/v1/clones", user, {"name": "Ada"})
    assert status == 201
    chat_once(server, user, clone["id"], "hello")
    second = http_from(server, "POST", "/v1/clones", user, {"name": "Bo"})[1]
    status, room, _ = http_from(server, "POST", "/v1/rooms", user, {
        "kind": "debate", "topic": "tea?", "clones": [{"clone": clone["id"], "stance": "yes"}, {"clone": second["id"], "stance": "no"}]})
    assert status == 201

    async def moderate():
        async with websockets.connect(f"{server.ws}?token={user}", local_addr=(CLIENT_IP, 0)) as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "room.join", "id": "j", "room": room["id"]}))
            while (await recv(ws))["type"] != "room.state":
                pass
            await ws.send(json.dumps({"type": "room.control", "id": "e", "room": room["id"], "action": "end"}))
            while (await recv(ws))["type"] != "room.event":
                pass
    asyncio.run(moderate())
    assert http_from(server, "POST", "/v1/admin/credits", admin, {"user": "ivy", "credits": 5})[0] == 201
    assert http_from(server, "GET", "/v1/clones", "not-a-token")[0] == 401  # counted per (hashed) address
    assert http_from(server, "DELETE", f"/v1/clones/{second['id']}", user)[0] == 204
    status, audit, _ = http_from(server, "GET", "/v1/admin/audit", admin)
    assert status == 200
    events = validate_rest("audit-page", audit)["events"]
    assert {"clone.created", "room.created", "room.ended", "credits.granted", "clone.deleted"} <= {e["action"] for e in events}
    hashes = {e["ip_hash"] for e in events}
    assert len(hashes) == 1 and None not in hashes, "every event from the one client address, as one keyed hash"
    ghost = server.token("ghost")
    assert http_from(server, "DELETE", "/v1/me", ghost)[0] == 200

    assert server.stop() == 0
    reader.join(timeout=10)
    assert any(json.loads(line).get("request") for line in lines), "access lines carry a request id"
    leaking = [line for line in lines if CLIENT_IP in line]
    assert not leaking, leaking[:3]

    stored = stored_text(store_args, data_dir)
    assert hashes.pop() in stored, "the audit rows are in what was read"
    assert CLIENT_IP not in stored


def stored_text(store_args, data_dir):
    """Everything the store holds, as text: the SQLite files byte for byte, or every document of
    every collection Parley writes."""
    if not store_args:
        return "".join(p.read_bytes().decode("latin-1") for p in data_dir.iterdir() if p.name.startswith("parley.sqlite"))
    from pymongo import MongoClient
    uri = store_args[1]
    client = MongoClient(uri.rsplit("/", 1)[0], serverSelectionTimeoutMS=5000)
    db = client[uri.rsplit("/", 1)[1]]
    names = ["users", "clones", "conversations", "messages", "ledger", "accounts", "schedules", "rooms", "room_entries", "audit", "meta"]
    text = json.dumps({name: list(db[name].find()) for name in names}, default=str)
    client.close()
    return text


def wait_until_refused(port, deadline=10.0):
    """Returns once nothing accepts connections on `port` any more (bounded)."""
    import socket
    import time
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):
            # Reset: the probe was in the listener's backlog as it closed; nothing accepts it either.
            return
        time.sleep(0.01)
    raise AssertionError(f"port {port} still accepts connections {deadline} s after SIGTERM")


def test_sigterm_lets_a_reply_finish_refuses_new_ones_and_exits_0(start_server):
    server = start_server("--sim-ttft-ms", "0", "--sim-tokens-per-sec", "20", "--sim-reply-tokens", "30")
    token = server.token("finn")
    clone = make_clone(server, token)

    async def run():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone["id"], "text": "go"}))
            start = await recv(ws)
            await recv(ws)  # a token: the reply is streaming
            server.proc.send_signal(signal.SIGTERM)
            # The listener closes after requests stop being taken: once it refuses, the drain is on.
            await asyncio.to_thread(wait_until_refused, server.port)
            await ws.send(json.dumps({"type": "chat.send", "id": "late", "clone": clone["id"], "text": "more"}))
            refused, end = None, None
            while end is None:
                frame = await recv(ws)
                if frame.get("ref") == "late":
                    refused = frame
                elif frame["type"] == "stream.end":
                    end = frame
            if refused is None:
                refused = await recv(ws)
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            return start, end, refused, closed.value.rcvd

    start, end, refused, close = asyncio.run(run())
    assert refused["type"] == "error" and refused["code"] == "unavailable", refused
    assert end["reason"] == "complete", "the reply in flight ran to its end"
    assert close.code == 1001
    assert server.proc.wait(timeout=20) == 0


def test_the_data_files_are_readable_by_the_server_user_only(data_dir):
    target = data_dir / "fresh"
    server = Server(target)
    try:
        status, health = server.http("GET", "/healthz")
        assert status == 200 and validate_rest("health", health) == {"status": "ok", "store": "ok"}
        # A write, so the WAL exists too.
        assert server.http("POST", "/v1/clones", server.token("ivy"), {"name": "Ivy"})[0] == 201
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
        for name in ["parley.sqlite", "parley.sqlite-wal", "parley.sqlite-shm", "jwt-secret"]:
            assert stat.S_IMODE(os.stat(target / name).st_mode) == 0o600, name
    finally:
        assert server.stop() == 0
    # A database an older version left world-readable is tightened at the next start.
    os.chmod(target / "parley.sqlite", 0o644)
    server = Server(target)
    try:
        assert stat.S_IMODE(os.stat(target / "parley.sqlite").st_mode) == 0o600
    finally:
        assert server.stop() == 0


def test_transcripts_are_kept_by_default_and_a_retention_period_is_the_operators_choice(data_dir):
    """#28: the privacy policy promises that transcripts stay until the user deletes them, so the
    age purge is off unless an operator sets --retention-days."""
    server = Server(data_dir)
    try:
        admin = server.token("root", role="admin")
        status, body = server.http("POST", "/v1/admin/retention/purge", admin, {})
        assert status == 200 and body["older_than_seconds"] is None and body["messages"] == 0, body
    finally:
        assert server.stop() == 0
    server = Server(data_dir, "--retention-days", "30")
    try:
        status, body = server.http("POST", "/v1/admin/retention/purge", server.token("root", role="admin"), {})
        assert status == 200, body
    finally:
        assert server.stop() == 0


def test_sign_ins_are_audited_once_per_session_and_the_audit_log_keeps_24_months(data_dir):
    """#28: the audit log records sign-ins, accepted (a session's first use from an address,
    however many requests and sockets follow) and refused (once per address and reason a
    minute), the user reads their own in the export, and a retention pass deletes events older
    than 24 months (an old row is written into the SQLite file, as time cannot be wound here)."""
    import sqlite3
    import time

    server = Server(data_dir)
    try:
        admin, alice = server.token("root", role="admin"), server.token("alice")
        for _ in range(3):
            assert http_from(server, "GET", "/v1/clones", alice)[0] == 200

        async def socket():
            async with websockets.connect(f"{server.ws}?token={alice}", local_addr=(CLIENT_IP, 0)) as ws:
                assert (await recv(ws))["type"] == "welcome"
        asyncio.run(socket())
        for _ in range(3):
            assert http_from(server, "GET", "/v1/clones", "not-a-token")[0] == 401
        assert http_from(server, "GET", "/v1/clones")[0] == 401  # no token: no sign-in attempt

        status, audit, _ = http_from(server, "GET", "/v1/admin/audit", admin)
        events = validate_rest("audit-page", audit)["events"]
        signed_in = [e for e in events if e["action"] == "session.signed_in"]
        assert sorted(e["actor"] for e in signed_in) == ["alice", "root"], signed_in
        assert all(e["target"] == e["detail"]["session"] and e["ip_hash"] for e in signed_in)
        refused = [e for e in events if e["action"] == "session.refused"]
        assert [e["detail"]["reason"] for e in refused] == ["invalid token"], refused

        now = int(time.time() * 1000)
        db = sqlite3.connect(data_dir / "parley.sqlite", timeout=10)
        with db:
            for name, days in [("au_00000000000000000000000old", 800), ("au_00000000000000000000young", 700)]:
                db.execute("INSERT INTO audit(id, at, actor, action, target, ip_hash, detail) VALUES(?, ?, 'alice', 'user.deleted', NULL, NULL, '{}')",
                           (name, now - days * 86_400_000))
        db.close()
        status, purged, _ = http_from(server, "POST", "/v1/admin/retention/purge", admin, {})
        assert status == 200, purged
        validate_rest("purge", purged)
        assert purged["audit_events"] == 1 and purged["audit_older_than_seconds"] == 730 * 86_400, purged

        status, export, _ = http_from(server, "GET", "/v1/me/export", alice)
        assert status == 200
        validate_rest("export", export)
        mine = [(e["action"], e["id"]) for e in export["audit"]]
        assert ("session.signed_in", signed_in[[e["actor"] for e in signed_in].index("alice")]["id"]) in mine
        assert ("user.deleted", "au_00000000000000000000young") in mine
        assert all(e["actor"] == "alice" or e["target"] == "alice" for e in export["audit"])
        assert "au_00000000000000000000000old" not in json.dumps(export)
    finally:
        assert server.stop() == 0
