"""RFC 6455 at the byte level, against the real server: a raw socket that frames by hand, so
fragmentation, interleaved control frames, masking, reserved bits, opcodes and sizes are exactly
what the test says (no client library smoothing them over)."""
import base64
import json
import os
import socket
import struct

import pytest

from conftest import Server

TIMEOUT = 10


class RawSocket:
    def __init__(self, server, token, extensions=None):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        offer = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
        self.sock.sendall((f"GET /v1/ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            assert chunk, "closed during the handshake"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        lines = head.decode().split("\r\n")[1:]
        self.headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
        self.buffer = b""

    def send(self, opcode, payload=b"", fin=True, mask=True, rsv=0):
        first = (0x80 if fin else 0) | (rsv << 4) | opcode
        n = len(payload)
        length = bytes([n | (0x80 if mask else 0)]) if n < 126 else (
            bytes([126 | (0x80 if mask else 0)]) + struct.pack(">H", n) if n < 65536 else bytes([127 | (0x80 if mask else 0)]) + struct.pack(">Q", n))
        if mask:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            length += key
        self.sock.sendall(bytes([first]) + length + payload)

    def _read(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def frame(self):
        """(opcode, payload) of the next frame from the server (which never masks)."""
        _, _, opcode, payload = self.full_frame()
        return opcode, payload

    def full_frame(self):
        """(fin, rsv bits, opcode, payload) of the next frame from the server."""
        b0, b1 = self._read(2)
        assert b1 & 0x80 == 0, "a server must not mask"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._read(8))[0]
        return bool(b0 & 0x80), (b0 >> 4) & 0x7, b0 & 0x0F, self._read(n)

    def json(self):
        opcode, payload = self.frame()
        assert opcode == 1, (opcode, payload)
        return json.loads(payload)

    def close_code(self):
        """Reads to the close frame; its status code."""
        while True:
            opcode, payload = self.frame()
            if opcode == 8:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None

    def closed_by_server(self):
        """Whether the server closed the TCP connection after its close frame, politely: a FIN,
        never a reset (which can destroy the close frame before the peer reads it)."""
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return False
        except socket.timeout:
            return False


@pytest.fixture
def ws_server(data_dir):
    server = Server(data_dir)
    yield server
    assert server.stop() == 0


def connect(server):
    raw = RawSocket(server, server.token("ray"))
    assert raw.json()["type"] == "welcome"
    return raw


def unknown(id):
    return json.dumps({"type": "nope", "id": id}).encode()


def test_a_fragmented_message_with_control_frames_between_its_fragments(ws_server):
    raw = connect(ws_server)
    message = unknown("fragmented")
    raw.send(0x1, message[:5], fin=False)
    raw.send(0x9, b"mid-message ping")  # control frames may come between fragments
    raw.send(0x0, message[5:12], fin=False)
    raw.send(0x0, message[12:], fin=True)
    assert raw.frame() == (0xA, b"mid-message ping"), "the ping is answered at once with its payload"
    assert raw.json()["ref"] == "fragmented", "the fragments are one message"


def test_close_handshake_echoes_the_code(ws_server):
    raw = connect(ws_server)
    raw.send(0x8, struct.pack(">H", 1000) + b"bye")
    assert raw.close_code() == 1000
    assert raw.closed_by_server()


VALID = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
MUST_NOT_BE_SENT = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("payload,answer", [
    *[(struct.pack(">H", code) + "ça va".encode(), code) for code in VALID],  # echoed
    (b"", 1000),  # no status: 1000, never 1005
    *[(struct.pack(">H", code), 1002) for code in MUST_NOT_BE_SENT],
    (b"\x03", 1002),  # one byte: no status code
    (struct.pack(">H", 1000) + b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80", 1007),  # a reason that is not UTF-8
])
def test_a_close_frame_is_answered_with_its_code_or_the_error_it_is(ws_server, payload, answer):
    raw = connect(ws_server)
    raw.send(0x8, payload)
    assert raw.close_code() == answer, payload
    assert raw.closed_by_server()


@pytest.mark.parametrize("case,send,code", [
    ("unmasked client frame", dict(opcode=0x1, payload=b'{"type":"nope","id":"u"}', mask=False), 1002),
    ("reserved bit without an extension", dict(opcode=0x1, payload=b'{"type":"nope","id":"r"}', rsv=0b100), 1002),
    ("reserved opcode", dict(opcode=0x3, payload=b"x"), 1002),
    ("reserved control opcode", dict(opcode=0xB, payload=b"x"), 1002),
    ("fragmented control frame", dict(opcode=0x9, payload=b"x", fin=False), 1002),
    ("continuation with nothing to continue", dict(opcode=0x0, payload=b"x"), 1002),
    ("invalid UTF-8 in a text frame", dict(opcode=0x1, payload=b'{"x":"\xff\xfe"}'), 1007),
    ("binary frame", dict(opcode=0x2, payload=b"\x00\x01"), 1003),
    ("a frame over the message limit", dict(opcode=0x1, payload=b"x" * (64 * 1024 + 1)), 1009),
])
def test_protocol_violations_close_with_their_code(ws_server, case, send, code):
    raw = connect(ws_server)
    raw.send(**send)
    assert raw.close_code() == code, case
    assert raw.closed_by_server(), case
    # The server is still there for everyone else.
    assert connect(ws_server).json is not None


@pytest.mark.parametrize("size", [200_000, 2_000_000])
def test_a_frame_far_over_the_limit_is_answered_1009_and_the_peer_can_read_it(ws_server, size):
    raw = connect(ws_server)
    # The whole frame goes out (the server reads and drops what follows the header) and the close
    # frame is still there to read: no reset destroys it.
    raw.send(0x1, b"x" * size)
    assert raw.close_code() == 1009
    assert raw.closed_by_server()


def test_after_its_close_frame_the_server_half_closes_and_drops_what_still_comes(ws_server):
    raw = connect(ws_server)
    raw.send(0x1, b"\xff")  # invalid UTF-8: 1007, then the server waits for our FIN
    assert raw.close_code() == 1007
    raw.sock.settimeout(10)
    assert raw.sock.recv(1) == b"", "the server's FIN comes right after its close frame"
    raw.send(0x9, b"ignored")  # still accepted and dropped while the server lingers


def test_a_message_over_the_limit_in_fragments_closes_with_1009(ws_server):
    raw = connect(ws_server)
    piece = b"x" * (16 * 1024)
    for _ in range(4):
        raw.send(0x1 if _ == 0 else 0x0, piece, fin=False)
    raw.send(0x0, b"xx", fin=True)
    assert raw.close_code() == 1009


def test_the_message_limit_is_configurable(data_dir):
    server = Server(data_dir, "--max-message-bytes", "2048")
    try:
        raw = connect(server)
        raw.send(0x1, json.dumps({"type": "nope", "id": "big", "pad": "x" * 1900}).encode())
        assert raw.json()["ref"] == "big", "under the limit"
        raw.send(0x1, b"x" * 1500, fin=False)
        raw.send(0x0, b"x" * 600, fin=True)
        assert raw.close_code() == 1009
    finally:
        assert server.stop() == 0


def test_a_control_frame_over_125_bytes_closes_with_1002(ws_server):
    raw = connect(ws_server)
    raw.send(0x9, b"p" * 126)
    assert raw.close_code() == 1002


def raw_handshake(server, lines, request_line="GET /v1/ws?token={token} HTTP/1.1"):
    """Sends a handshake made of `lines` by hand; (status, headers, JSON body) of the answer."""
    token = server.token("ray")
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(("\r\n".join([request_line.format(token=token), *lines]) + "\r\n\r\n").encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in head.decode().split("\r\n")[1:] if ":" in l)}
    return status, headers, json.loads(body) if body else None


KEY = "Sec-WebSocket-Key: " + base64.b64encode(b"0123456789abcdef").decode()
GOOD = ["Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade", KEY, "Sec-WebSocket-Version: 13"]


def without(name):
    return [line for line in GOOD if not line.lower().startswith(name.lower() + ":")]


@pytest.mark.parametrize("case,lines,request_line,status", [
    ("no Sec-WebSocket-Key", without("Sec-WebSocket-Key"), None, 400),
    ("a key that is not 16 bytes", without("Sec-WebSocket-Key") + ["Sec-WebSocket-Key: " + base64.b64encode(b"short").decode()], None, 400),
    ("a key that is not base64", without("Sec-WebSocket-Key") + ["Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!=="], None, 400),
    ("two keys", GOOD + [KEY], None, 400),
    ("no Sec-WebSocket-Version", without("Sec-WebSocket-Version"), None, 400),
    ("an unsupported version", without("Sec-WebSocket-Version") + ["Sec-WebSocket-Version: 8"], None, 426),
    ("no Connection: Upgrade", without("Connection") + ["Connection: keep-alive"], None, 400),
    ("no Host", without("Host"), None, 400),
    ("HTTP/1.0", GOOD, "GET /v1/ws?token={token} HTTP/1.0", 400),
    ("a POST", GOOD + ["Content-Length: 0"], "POST /v1/ws?token={token} HTTP/1.1", 405),
    ("joined what?", GOOD, "GET /v1/ws?coalesce=words&token={token} HTTP/1.1", 400),
    ("whose token?", GOOD, "GET /v1/ws?token={token}&token=another HTTP/1.1", 400),
    ("a token not in UTF-8", GOOD, "GET /v1/ws?token=%FF HTTP/1.1", 400),
])
def test_a_malformed_handshake_gets_its_status(ws_server, case, lines, request_line, status):
    got, headers, body = raw_handshake(ws_server, lines, *([request_line] if request_line else []))
    assert got == status, case
    assert body["error"]["code"] == "bad_request" and body["error"]["message"], case
    if status == 426:
        assert headers["sec-websocket-version"] == "13", "section 4.2.2: the versions the server speaks"


def test_a_plain_get_of_the_socket_path_is_told_to_upgrade(ws_server):
    status, headers, body = raw_handshake(ws_server, ["Host: 127.0.0.1"])
    assert status == 426 and headers["upgrade"] == "websocket"


def test_a_well_formed_handshake_still_upgrades(ws_server):
    token = ws_server.token("ray")
    with socket.create_connection(("127.0.0.1", ws_server.port), timeout=TIMEOUT) as sock:
        sock.sendall(("\r\n".join([f"GET /v1/ws?token={token} HTTP/1.1", *GOOD]) + "\r\n\r\n").encode())
        assert sock.recv(12) == b"HTTP/1.1 101"
