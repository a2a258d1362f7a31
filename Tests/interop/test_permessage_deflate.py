"""permessage-deflate (RFC 7692) at the byte level: a raw socket that offers the extension,
compresses its own frames with zlib and decompresses the server's, so negotiation, RSV1, the
stripped sync-flush tail, context takeover, window bits and the decompressed-size cap are
exactly what the test says."""
import json
import struct
import zlib

import pytest

from conftest import Server
from test_interop import make_clone
from test_rfc6455 import RawSocket

TAIL = b"\x00\x00\xff\xff"


def compress(payload, final_block=False):
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    if final_block:
        return c.compress(payload) + c.flush(zlib.Z_FINISH)  # ends with BFINAL, no tail
    data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(TAIL)
    return data[:-4]


class Inbound:
    """The client's side of the server's compressed stream: one decompressor for the socket's
    life (context takeover) sized to the window the server announced."""

    def __init__(self, raw, window_bits=15, takeover=True):
        self.raw, self.window_bits, self.takeover = raw, window_bits, takeover
        self.inflate = zlib.decompressobj(-window_bits)
        self.wire = self.plain = 0

    def message(self):
        fin, rsv, opcode, payload = self.raw.full_frame()
        assert fin and opcode == 0x1, (fin, opcode)
        assert rsv == 0b100, "every server message is compressed"
        if not self.takeover:
            self.inflate = zlib.decompressobj(-self.window_bits)
        text = self.inflate.decompress(payload + TAIL)
        self.wire += len(payload)
        self.plain += len(text)
        return json.loads(text)


def offer(server, extensions, user="zed"):
    return RawSocket(server, server.token(user), extensions=extensions)


@pytest.fixture
def ws_server(data_dir):
    server = Server(data_dir)
    yield server
    assert server.stop() == 0


def test_a_whole_chat_stream_compressed_both_ways(ws_server):
    token = ws_server.token("zed")
    clone = make_clone(ws_server, token)
    raw = RawSocket(ws_server, token, extensions="permessage-deflate; client_max_window_bits")
    assert raw.headers["sec-websocket-extensions"] == "permessage-deflate; client_no_context_takeover; server_max_window_bits=12"
    inbound = Inbound(raw, window_bits=12)
    assert inbound.message()["type"] == "welcome"
    # The request compressed and split over two fragments: RSV1 on the first only.
    request = compress(json.dumps({"type": "chat.send", "id": "z1", "clone": clone["id"], "text": "Hello, compressed"}).encode())
    raw.send(0x1, request[:7], fin=False, rsv=0b100)
    raw.send(0x0, request[7:], fin=True)
    tokens, end = [], None
    while end is None:
        frame = inbound.message()
        if frame["type"] == "token":
            tokens.append(frame)
        elif frame["type"] == "stream.end":
            end = frame
    assert end["reason"] == "complete" and [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1)) and tokens
    # Token frames repeat their keys: with context takeover each costs a fraction of its size.
    assert inbound.wire < inbound.plain * 0.5, (inbound.wire, inbound.plain)


def test_an_uncompressed_message_on_a_compressing_socket_is_read(ws_server):
    raw = offer(ws_server, "permessage-deflate")
    inbound = Inbound(raw)
    inbound.message()
    raw.send(0x1, b'{"type":"nope","id":"plain"}')
    assert inbound.message()["ref"] == "plain"


def test_a_message_ending_in_a_final_block_is_read(ws_server):
    raw = offer(ws_server, "permessage-deflate")
    inbound = Inbound(raw)
    inbound.message()
    raw.send(0x1, compress(b'{"type":"nope","id":"final"}', final_block=True), rsv=0b100)
    raw.send(0x1, compress(b'{"type":"nope","id":"next"}'), rsv=0b100)
    assert inbound.message()["ref"] == "final"
    assert inbound.message()["ref"] == "next"


def test_server_no_context_takeover_makes_every_message_stand_alone(ws_server):
    raw = offer(ws_server, "permessage-deflate; server_no_context_takeover")
    assert "server_no_context_takeover" in raw.headers["sec-websocket-extensions"]
    inbound = Inbound(raw, takeover=False)  # a fresh decompressor per message
    inbound.message()
    for i in range(5):
        raw.send(0x1, compress(json.dumps({"type": "nope", "id": f"n{i}"}).encode()), rsv=0b100)
        assert inbound.message()["ref"] == f"n{i}"


def test_the_server_window_follows_the_offer(ws_server):
    raw = offer(ws_server, "permessage-deflate; server_max_window_bits=9")
    assert raw.headers["sec-websocket-extensions"].endswith("server_max_window_bits=9")
    inbound = Inbound(raw, window_bits=9)
    inbound.message()
    for i in range(20):
        raw.send(0x1, json.dumps({"type": "nope", "id": f"w{i}", "pad": "p" * i}).encode())
        assert inbound.message()["ref"] == f"w{i}"


@pytest.mark.parametrize("extensions", [
    "permessage-deflate; server_max_window_bits=8",  # zlib cannot compress with 256 bytes
    "permessage-deflate; no_such_parameter",
    "permessage-deflate; server_no_context_takeover=yes",
])
def test_an_unacceptable_offer_gets_no_extension(ws_server, extensions):
    raw = offer(ws_server, extensions)
    assert "sec-websocket-extensions" not in raw.headers
    assert raw.json()["type"] == "welcome", "plain frames"
    raw.send(0x1, compress(b'{"type":"nope"}'), rsv=0b100)
    assert raw.close_code() == 1002


def test_the_server_can_turn_it_off(data_dir):
    server = Server(data_dir, "--no-ws-deflate")
    try:
        raw = offer(server, "permessage-deflate")
        assert "sec-websocket-extensions" not in raw.headers
        assert raw.json()["type"] == "welcome"
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("case,frames,code", [
    ("a compression bomb in one frame", [dict(opcode=0x1, payload=compress(b" " * (4 << 20)), rsv=0b100)], 1009),
    ("a bomb over fragments", [dict(opcode=0x1, payload=compress(b" " * (4 << 20))[:100], rsv=0b100, fin=False),
                               dict(opcode=0x0, payload=compress(b" " * (4 << 20))[100:])], 1009),
    ("RSV1 on a continuation", [dict(opcode=0x1, payload=compress(b"hello")[:2], rsv=0b100, fin=False),
                                dict(opcode=0x0, payload=compress(b"hello")[2:], rsv=0b100)], 1002),
    ("a compressed ping", [dict(opcode=0x9, payload=compress(b"ping"), rsv=0b100)], 1002),
    ("data that does not decompress", [dict(opcode=0x1, payload=b"\xff\xff\xff\x00\x13", rsv=0b100)], 1007),
    ("RSV2", [dict(opcode=0x1, payload=compress(b"{}"), rsv=0b110)], 1002),
])
def test_violations_on_a_compressing_socket_close_with_their_code(ws_server, case, frames, code):
    raw = offer(ws_server, "permessage-deflate")
    Inbound(raw).message()
    for frame in frames:
        raw.send(**frame)
    assert raw.close_code() == code, case
    assert raw.closed_by_server(), case
    assert offer(ws_server, "permessage-deflate").headers["sec-websocket-extensions"], "the server is still there"
