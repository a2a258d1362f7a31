"""Slow HTTP clients (slowloris) against the real server: a request head fed a line at a time, a
body that stalls, an idle keep-alive connection and a flood of unfinished heads on a server with
few descriptors. Each is bounded by a timeout or the cap on connections still speaking HTTP."""
import resource
import socket
import time
import urllib.request

import pytest

from conftest import Server
from test_rfc6455 import RawSocket

# Short timeouts so each case takes about a second; the defaults are 10 s / 60 s / 30 s.
FAST = ("--http-head-timeout", "0.5", "--http-idle-timeout", "0.8", "--http-body-timeout", "0.5")


@pytest.fixture
def server(data_dir):
    s = Server(data_dir, *FAST)
    yield s
    assert s.stop() == 0


def read_until_closed(sock, limit):
    """Everything the server sends until it closes; fails if it is still open after `limit` s."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        pytest.fail(f"still open after {limit} s; got {data[:200]!r}")
    except ConnectionResetError:
        pass
    return data


def test_a_connection_that_sends_nothing_gets_408_and_is_closed(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    started = time.monotonic()
    data = read_until_closed(sock, 5)
    assert data.startswith(b"HTTP/1.1 408 ") and b'"code":"bad_request"' in data
    assert time.monotonic() - started >= 0.4, "not before the head timeout"


def test_a_head_fed_one_line_at_a_time_is_cut_at_the_head_timeout(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    closed = False
    for n in range(40):  # a header line every 0.1 s: bytes keep coming, the head never ends
        try:
            sock.sendall(f"X-Slow-{n}: x\r\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        sock.settimeout(0.1)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        assert data.startswith(b"HTTP/1.1 408 "), data
        closed = True
        break
    assert closed, "a trickling head kept the connection open"
    assert time.monotonic() - started < 2.5


def test_a_stalled_body_gets_408_and_a_trickling_one_is_read(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/dev/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user\"")
    data = read_until_closed(sock, 5)
    assert data.startswith(b"HTTP/1.1 408 "), data
    # Each piece within the timeout resets it: a body slower in total than the timeout still arrives.
    body = b'{"user":"zoe"}'
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/dev/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode())
    for byte in body:
        time.sleep(0.1)  # the pacing under test: 14 pieces over 1.4 s, each 0.1 s apart
        sock.sendall(bytes([byte]))
    data = read_until_closed(sock, 5)
    assert data.startswith(b"HTTP/1.1 404 "), "read whole and answered (dev sign-in is off here)"


def test_a_body_refused_at_its_head_and_never_sent_is_closed_at_the_body_timeout_with_nothing_after_the_413(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/clones HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n\r\n")
    data = read_until_closed(sock, 5)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head, data
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    assert body.startswith(b'{"error":{"code":"too_large"') and len(body) == length, f"no 408 after the 413: {data!r}"


def test_an_idle_keep_alive_connection_is_closed_without_a_response(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(5)
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 ")
    started = time.monotonic()
    assert read_until_closed(sock, 5) == b"", "closed quietly"
    assert time.monotonic() - started >= 0.6, "after the idle timeout, not the head timeout"


def test_a_websocket_is_not_held_to_the_http_timeouts(server):
    raw = RawSocket(server, server.token("ray"))
    assert raw.json()["type"] == "welcome"
    raw.sock.settimeout(2)
    with pytest.raises(socket.timeout):
        raw.sock.recv(1)  # 2 s: past every HTTP timeout, and nothing comes
    raw.send(0x9, b"still here")
    assert raw.frame() == (0xA, b"still here")


def test_unfinished_heads_cannot_starve_healthz_on_a_server_with_few_descriptors(data_dir):
    def few_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    # Long head timeout: only the cap on connections in their HTTP phase protects the server.
    server = Server(data_dir, "--http-head-timeout", "120", preexec_fn=few_descriptors)
    try:
        slow = []
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
            slow.append(sock)
        started = time.monotonic()
        with urllib.request.urlopen(server.base + "/healthz", timeout=5) as response:
            assert response.status == 200
        assert time.monotonic() - started < 5
        # The oldest unfinished heads were closed to make room (quietly: no request was read).
        evicted = 0
        for sock in slow[:10]:
            sock.settimeout(5)
            try:
                evicted += sock.recv(1) == b""
            except ConnectionResetError:
                evicted += 1
        assert evicted == 10
        for sock in slow:
            sock.close()
    finally:
        assert server.stop() == 0
