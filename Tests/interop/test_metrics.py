"""GET /metrics on the real binary: admin only, and Prometheus text that Prometheus's own parser
(prometheus_client) reads, with the values a chat stream fanned out to two sockets must leave."""
import asyncio
import json
import urllib.error
import urllib.request

import websockets
from prometheus_client.parser import text_string_to_metric_families

from test_interop import make_clone


def scrape(server, token):
    req = urllib.request.Request(server.base + "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], json.loads(error.read())


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(family, suffix="", **labels):
    return sum(s.value for s in family.samples
               if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_are_admin_only(server):
    assert scrape(server, None)[0] == 401
    status, _, body = scrape(server, server.token("eve"))
    assert status == 403 and body["error"]["code"] == "forbidden"


def test_metrics_parse_as_prometheus_text_and_count_a_stream(server):
    token = server.token("mia")
    clone = make_clone(server, token)

    async def chat():
        # `a`'s frames are left unread: without max_queue=None the client stops reading at 16 and
        # does not see the server's close frame, so closing waited out its 10 s close_timeout.
        async with websockets.connect(f"{server.ws}?token={token}", max_queue=None) as a, \
                websockets.connect(f"{server.ws}?token={token}") as b:
            for ws in (a, b):
                assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
            await a.send(json.dumps({"type": "chat.send", "id": "m1", "clone": clone["id"], "text": "Count me"}))
            while True:  # both sockets of the user get the stream: a fan-out to two
                frame = json.loads(await asyncio.wait_for(b.recv(), 10))
                if frame["type"] == "stream.end":
                    return frame
    end = asyncio.run(chat())
    output = end["usage"]["output_tokens"]

    status, content_type, text = scrape(server, server.token("ops", role="admin"))
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    found = families(text)
    for name in ("parley_sockets_open", "parley_streams_active", "parley_tokens", "parley_time_to_first_token_seconds",
                 "parley_inter_token_seconds", "parley_fanout_delay_seconds", "parley_store_seconds", "parley_streams_ended",
                 "parley_credits_debited", "parley_paywall_hits", "parley_schedules_pending", "parley_slow_reader_disconnects"):
        assert name in found, f"{name} missing from {sorted(found)}"
    assert found["parley_time_to_first_token_seconds"].type == "histogram"
    assert value(found["parley_tokens"], "_total") == output
    assert value(found["parley_time_to_first_token_seconds"], "_count") == 1
    assert value(found["parley_inter_token_seconds"], "_count") == output - 1
    assert value(found["parley_fanout_delay_seconds"], "_count") >= output, "each token went to two sockets"
    assert value(found["parley_streams_ended"], "_total", reason="complete") == 1
    assert value(found["parley_streams_active"]) == 0
    assert value(found["parley_store_seconds"], "_count") > 0
    if value(found["parley_store_seconds"], "_count", store="sqlite"):
        # The reply's writes were committed, and every commit answered at least one store call.
        commits = value(found["parley_store_commits"], "_total", store="sqlite")
        assert 0 < commits <= value(found["parley_store_seconds"], "_count", store="sqlite")
    charged = value(found["parley_credits_debited"], "_total") - value(found["parley_credits_refunded"], "_total")
    assert charged == end["cost"] > 0
