"""Plans (#27) through the real binary, on both stores: `--plans` is read, `GET /v1/plans` and
`GET /v1/me` match their schemas, a free user's debate is refused with plan_required naming the
plan that allows it, and a signed subscription.activated event (applied once, a replay stale)
lets them start it with the plan's allowance in their balance."""
import hashlib
import hmac
import json
import time
import urllib.request

from conftest import Server
from schemas import validate_rest
from test_interop import make_clone

SECRET = "whsec_interop_plans_0123456789"
PLANS = {"default": "free", "plans": [
    {"id": "free", "name": "Free", "features": ["chat"], "limits": {"clones": 5}},
    {"id": "pro", "name": "Pro", "monthly_credits": 3000, "renewal": "top_up"},
]}


def webhook(server, body):
    raw = json.dumps(body).encode()
    signature = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    req = urllib.request.Request(server.base + "/v1/webhooks/payments", data=raw, method="POST", headers={
        "Content-Type": "application/json", "X-Parley-Signature": f"sha256={signature}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_a_subscription_event_lets_a_free_user_start_a_debate(data_dir, store_args, tmp_path):
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps(PLANS))
    server = Server(data_dir, "--plans", str(plans), "--payments-secret", SECRET, "--starting-credits", "0", *store_args)
    try:
        status, listed = server.http("GET", "/v1/plans")
        assert status == 200 and [p["id"] for p in validate_rest("plans", listed)["plans"]] == ["free", "pro"]

        token = server.token("alice")
        ada, bob = make_clone(server, token, name="Ada"), make_clone(server, token, name="Bob")
        body = {"kind": "debate", "topic": "Tabs or spaces?",
                "clones": [{"clone": ada["id"], "stance": "tabs"}, {"clone": bob["id"], "stance": "spaces"}]}
        status, refused = server.http("POST", "/v1/rooms", token, body)
        assert status == 402, refused
        validate_rest("error", refused)
        assert refused["error"]["code"] == "plan_required" and refused["error"]["plan"] == "pro", refused

        now = int(time.time())
        event = {"event": "subscription.activated", "event_id": "evt_1", "user": "alice", "plan": "pro",
                 "period_end": now + 30 * 86400, "timestamp": now}
        assert webhook(server, event)["status"] == "applied"
        assert webhook(server, event)["status"] == "stale"
        status, room = server.http("POST", "/v1/rooms", token, body)
        assert status == 201, room

        status, me = server.http("GET", "/v1/me", token)
        assert status == 200
        validate_rest("me", me)
        assert me["plan"]["id"] == "pro" and me["subscription"]["status"] == "active" and me["balance"] == 3000, me
        _, again = server.http("GET", "/v1/me", token)
        assert again["balance"] == 3000, "the allowance once this month"
        status, usage = server.http("GET", "/v1/me/usage?by=feature", token)
        assert status == 200 and validate_rest("usage", usage)["granted"] == 3000, usage
        status, rooms = server.http("GET", "/v1/rooms", token)
        assert status == 200 and validate_rest("room-list", rooms)["rooms"][0]["cost"] == 0, rooms
    finally:
        assert server.stop() == 0


def test_a_bad_plans_file_stops_the_server_with_what_is_wrong(data_dir, tmp_path):
    import subprocess
    from conftest import BINARY
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"plans": [{"id": "free", "features": ["karaoke"]}]}))
    out = subprocess.run([str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir), "--plans", str(plans)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "unknown feature 'karaoke'" in out.stderr, out.stderr
    # A plan's field named twice: the first value would count where the last was meant.
    plans.write_text('{"plans": [{"id": "free", "monthly_credits": 0, "monthly_credits": 5000}]}')
    out = subprocess.run([str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir), "--plans", str(plans)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert 'the key "monthly_credits" is repeated' in out.stderr, out.stderr
