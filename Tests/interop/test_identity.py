"""Tokens from an identity provider (#28): `--jwks-file` with the provider's public keys (RSA, EC
P-256 and Ed25519 here, made by the test), `--jwt-issuer`, `--jwt-audience` and
`--jwt-subject-claim`; every check fails a token that breaks it, and Parley's own HS256 tokens
keep working beside them."""
import asyncio
import json
import time

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from conftest import BINARY, Server
from test_interop import recv

ISSUER = "https://id.example.test/"
AUDIENCE = "parley-test"


class Provider:
    def __init__(self):
        self.keys = {
            "rsa-1": ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            "ec-1": ("ES256", ec.generate_private_key(ec.SECP256R1())),
            "ed-1": ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
        }

    def jwks(self):
        keys = []
        for kid, (alg, key) in self.keys.items():
            to_jwk = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg].to_jwk
            jwk = json.loads(to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": keys}

    def token(self, kid="rsa-1", **overrides):
        alg, key = self.keys[kid]
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "google-oauth2|1234", "email": "ann@example.test", "iat": now, "exp": now + 600}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


@pytest.fixture
def provider_server(data_dir):
    provider = Provider()
    jwks = data_dir / "jwks.json"
    jwks.write_text(json.dumps(provider.jwks()))
    server = Server(data_dir, "--jwks-file", str(jwks), "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE,
                    "--jwt-subject-claim", "email")
    yield server, provider
    assert server.stop() == 0


def test_an_identity_providers_tokens_are_checked_and_name_the_user(provider_server):
    server, provider = provider_server
    for kid in ("rsa-1", "ec-1", "ed-1"):
        status, body = server.http("GET", "/v1/clones", provider.token(kid))
        assert status == 200 and body == {"clones": []}, (kid, status, body)
    # Several audiences, one of them Parley's.
    assert server.http("GET", "/v1/clones", provider.token(aud=["another-app", AUDIENCE]))[0] == 200
    # The user is the configured claim (email), not `sub`.
    token = provider.token()
    assert server.http("POST", "/v1/clones", token, {"name": "Ada"})[0] == 201
    status, export = server.http("GET", "/v1/me/export", token)
    assert status == 200 and export["account"]["user"] == "ann@example.test", export.get("account")

    now = int(time.time())
    refused = {
        "another issuer": provider.token(iss="https://evil.example/"),
        "another audience": provider.token(aud="someone-else"),
        "no audience": provider.token(aud=None),
        "expired": provider.token(exp=now - 60, iat=now - 700),
        "not yet valid": provider.token(nbf=now + 600),
        "a subject Parley cannot name": provider.token(email="no spaces allowed"),
        "no subject claim": provider.token(email=None),
    }
    for why, bad in refused.items():
        status, body = server.http("GET", "/v1/clones", bad)
        assert status == 401 and body["error"]["code"] == "unauthorized", (why, status, body)
    # Signed by a key the JWKS does not hold, under one of its kids; an unknown kid; alg none;
    # HS256 with the provider's public key as the secret (the algorithm-confusion attack).
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "email": "eve@example.test", "exp": now + 600}, stranger,
                        algorithm="RS256", headers={"kid": "rsa-1"})
    unknown = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "email": "eve@example.test", "exp": now + 600}, stranger,
                         algorithm="RS256", headers={"kid": "rsa-9"})
    public_pem = provider.keys["rsa-1"][1].public_key().public_bytes(serialization.Encoding.PEM,
                                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = jwt.utils.base64url_encode(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "email": "eve@example.test",
                                                     "exp": now + 600}).encode())
    import hashlib
    import hmac
    signature = jwt.utils.base64url_encode(hmac.new(public_pem, header + b"." + payload, hashlib.sha256).digest())
    confused = (header + b"." + payload + b"." + signature).decode()
    unsigned = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "email": "eve@example.test", "exp": now + 600}, None, algorithm="none",
                          headers={"kid": "rsa-1"})
    for why, bad in {"forged": forged, "unknown kid": unknown, "HS256 with the public key": confused, "alg none": unsigned}.items():
        assert server.http("GET", "/v1/clones", bad)[0] == 401, why

    # Parley's own tokens still work, and an admin is still only one of those.
    assert server.http("GET", "/v1/clones", server.token("ops"))[0] == 200
    assert server.http("GET", "/v1/admin/audit", provider.token(role="admin"))[0] == 403
    assert server.http("GET", "/v1/admin/audit", server.token("ops", role="admin"))[0] == 200

    async def socket():
        async with websockets.connect(f"{server.ws}?token={provider.token('ec-1')}") as ws:
            return await recv(ws)
    assert asyncio.run(socket())["type"] == "welcome"


def test_a_jwks_that_cannot_be_used_stops_the_start(data_dir):
    import subprocess
    for jwks, expected in (("not json", "cannot use the identity provider's JWKS"),
                           (json.dumps({"keys": []}), "has no key"),
                           # A shared secret is no provider key: refused, whatever its claims.
                           (json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h", "alg": "HS256"}]}),
                            "cannot use the identity provider's JWKS")):
        path = data_dir / "jwks.json"
        path.write_text(jwks)
        result = subprocess.run([str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir / "d"), "--jwks-file", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and expected in result.stderr, result.stderr


def test_keys_fetched_from_a_jwks_url_follow_a_rotation_and_a_flood_of_unknown_kids_fetches_once(data_dir):
    import http.server
    import threading

    first, second = Provider(), Provider()
    served = {"jwks": {"keys": [k for k in first.jwks()["keys"] if k["kid"] == "rsa-1"]}, "fetches": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            served["fetches"] += 1
            body = json.dumps(served["jwks"]).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    jwks_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=jwks_server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{jwks_server.server_address[1]}/.well-known/jwks.json"
    server = Server(data_dir, "--jwks-url", url, "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE, "--jwt-subject-claim", "email")
    try:
        assert served["fetches"] == 1, "fetched at start"
        assert server.http("GET", "/v1/clones", first.token("rsa-1"))[0] == 200
        # The provider rotates to a new key: a token naming it makes Parley fetch the set again.
        rotated = {**second.jwks()["keys"][0], "kid": "rsa-2"}
        served["jwks"] = {"keys": [rotated]}
        second.keys["rsa-2"] = second.keys["rsa-1"]
        assert server.http("GET", "/v1/clones", second.token("rsa-2"))[0] == 200
        assert served["fetches"] == 2
        # The retired key no longer signs in; unknown key ids do not make it fetch again within 30 s.
        assert server.http("GET", "/v1/clones", first.token("rsa-1"))[0] == 401
        for n in range(5):
            forged = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "email": "x@y.z", "exp": int(time.time()) + 60},
                                first.keys["rsa-1"][1], algorithm="RS256", headers={"kid": f"flood-{n}"})
            assert server.http("GET", "/v1/clones", forged)[0] == 401
        assert served["fetches"] == 2, served["fetches"]
    finally:
        assert server.stop() == 0
        jwks_server.shutdown()

    # An unreachable JWKS URL stops the start.
    import subprocess
    result = subprocess.run([str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir / "d"), "--jwks-url", url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "cannot fetch the JWKS" in result.stderr, result.stderr
