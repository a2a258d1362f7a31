"""How the real server answers requests at the edge of HTTP/1.1 framing: what its parser refuses
gets a JSON error and the connection closes at once (the head timeout here is the default 10 s,
so a connection left open would outlast each bound below)."""
import json
import socket

import pytest

from conftest import Server
from test_http_timeouts import read_until_closed


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(str(tmp_path_factory.mktemp("framing")))
    yield s
    assert s.stop() == 0


def exchange(server, request, limit=5):
    """Sends `request`, then returns everything the server sent until it closed; fails if the
    connection is still open after `limit` seconds."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        return read_until_closed(sock, limit)


def response(data):
    """The status code, headers (lower-cased names) and JSON body of one whole response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict((k.lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    assert len(body) == int(headers["content-length"]), f"one response and nothing after it: {data!r}"
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.mark.parametrize("request_bytes, detail", [
    (b"POST /v1/clones HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", "content-length"),
    (b"BREW /v1/clones HTTP/1.1\r\nHost: x\r\n\r\n", "method"),
    (b"POST /v1/clones HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n", "header"),
])
def test_a_request_the_parser_refuses_gets_a_json_400_and_the_connection_closes(server, request_bytes, detail):
    status, headers, body = response(exchange(server, request_bytes))
    assert status == 400 and headers["connection"] == "close" and headers["x-request-id"].startswith("req_")
    assert body["error"]["code"] == "bad_request"
    assert body["error"]["message"].startswith("the request is not valid HTTP/1.1 (") and detail in body["error"]["message"]


@pytest.mark.parametrize("request_bytes, message", [
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "the request is not valid HTTP/1.1 (it looks like HTTP/2, which this server does not speak)"),
    # Both lengths (a request smuggler's pair): the parser says nothing a client could use.
    (b"POST /v1/clones HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     "the request is not valid HTTP/1.1"),
])
def test_what_the_parser_cannot_say_in_a_clients_terms_is_said_plainly(server, request_bytes, message):
    status, _, body = response(exchange(server, request_bytes))
    assert status == 400 and body["error"]["message"] == message


def test_a_head_too_large_gets_431(server):
    status, headers, body = response(exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"))
    assert status == 431 and headers["connection"] == "close"
    assert body["error"]["code"] == "too_large"


def test_a_refused_request_after_a_good_one_is_answered_after_it(server):
    data = exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nBREW / HTTP/1.1\r\nHost: x\r\n\r\n")
    first, _, rest = data.partition(b'{"status":"ok","store":"ok"}')
    assert first.startswith(b"HTTP/1.1 200 "), data
    status, _, body = response(rest)
    assert status == 400 and body["error"]["code"] == "bad_request"


def head_only(server, path, headers, version="1.1"):
    """A socket that sent a request head and no body yet."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/{version}\r\nHost: x\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n")
    sock.settimeout(5)
    return sock


def read_response(sock):
    """One whole response with a Content-Length body, read from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head = data.split(b"\r\n\r\n", 1)[0]
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(data) < len(head) + 4 + length:
        data += sock.recv(65536)
    return response(data)


def test_a_client_that_expects_100_continue_hears_it_before_it_sends_the_body(server):
    body = json.dumps({"name": "Ada"}).encode()
    sock = head_only(server, "/v1/clones", {
        "Authorization": f"Bearer {server.token('alice')}", "Content-Type": "application/json",
        "Content-Length": len(body), "Expect": "100-continue", "Connection": "close"})
    assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n", "nothing else before the body"
    sock.sendall(body)
    status, _, clone = read_response(sock)
    assert status == 201 and clone["name"] == "Ada"


def test_an_http_1_0_client_gets_no_100_continue(server):
    body = json.dumps({"name": "Ada"}).encode()
    sock = head_only(server, "/v1/clones", {
        "Authorization": f"Bearer {server.token('alice')}", "Content-Type": "application/json",
        "Content-Length": len(body), "Expect": "100-continue"}, version="1.0")
    sock.sendall(body)
    status, _, _ = read_response(sock)
    assert status == 201, "the final answer is the first thing it reads"


@pytest.mark.parametrize("expect", [True, False])
def test_a_body_announced_over_the_cap_is_refused_before_it_is_sent(server, expect):
    headers = {"Content-Type": "application/json", "Content-Length": 2 * 1024 * 1024}
    if expect:
        headers["Expect"] = "100-continue"
    sock = head_only(server, "/v1/clones", headers)
    status, headers, body = read_response(sock)
    assert status == 413 and headers["connection"] == "close" and body["error"]["code"] == "too_large"
    # A client that sends the body anyway is read to its end, then the connection closes: a
    # request pipelined behind it is neither answered nor carried out.
    token = server.token("pipeliner")
    clone = json.dumps({"name": "Behind"}).encode()
    behind = (f"POST /v1/clones HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(clone)}\r\n\r\n").encode() + clone
    sock.sendall(b"x" * (2 * 1024 * 1024) + behind)
    assert sock.recv(65536) == b"", "closed after the body, with nothing more said"
    assert server.http("GET", "/v1/clones", token=token) == (200, {"clones": []})


def test_a_chunked_body_is_refused_once_it_passes_the_cap_and_closed_at_its_end(server):
    sock = head_only(server, "/v1/clones", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    piece = b"x" * 65536
    for _ in range(17):  # 1.06 MiB, past the 1 MiB cap, and the body has not ended
        sock.sendall(b"10000\r\n" + piece + b"\r\n")
    status, headers, body = read_response(sock)
    assert status == 413 and headers["connection"] == "close" and body["error"]["code"] == "too_large"
    sock.sendall(b"0\r\n\r\n")
    assert sock.recv(65536) == b"", "closed at the body's end, with nothing more said"


def test_nothing_after_a_request_that_says_connection_close_is_answered_or_carried_out(server):
    token = server.token("closer")
    clone = json.dumps({"name": "Behind"}).encode()
    behind = (f"POST /v1/clones HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(clone)}\r\n\r\n").encode() + clone
    data = exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + behind)
    status, headers, body = response(data)  # one response, nothing after it
    assert status == 200 and headers["connection"] == "close" and body["status"] == "ok"
    assert server.http("GET", "/v1/clones", token=token) == (200, {"clones": []})
