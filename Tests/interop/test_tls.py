"""TLS termination (#28): `parley serve --tls-cert --tls-key` serves HTTPS and wss:// on its port,
TLS 1.2 at least, ALPN http/1.1, HSTS; a certificate chain (server, intermediate) checked by
clients that trust only the root the test makes with Debian's openssl; SIGHUP reads a renewed
certificate without dropping a socket; a certificate that cannot be used is a clear error."""
import asyncio
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import warnings

import pytest
import websockets

from conftest import BINARY, Server, free_port
from test_interop import make_clone, read_stream, recv


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class PKI:
    """A root CA, an intermediate CA, and server certificates for 127.0.0.1 signed by the
    intermediate; `chain` is the server certificate followed by the intermediate."""

    def __init__(self, directory):
        self.dir = directory
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "root.key",
                "-out", "root.pem", "-days", "2", "-subj", "/CN=Parley Test Root", cwd=directory)
        (directory / "ca.ext").write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "mid.key", "-out", "mid.csr",
                "-subj", "/CN=Parley Test Intermediate", cwd=directory)
        openssl("x509", "-req", "-in", "mid.csr", "-CA", "root.pem", "-CAkey", "root.key", "-CAcreateserial", "-out", "mid.pem",
                "-days", "2", "-extfile", "ca.ext", cwd=directory)
        self.root = directory / "root.pem"
        self.key = directory / "server.key"
        self.chain = directory / "chain.pem"

    def issue(self, serial, names="IP:127.0.0.1,DNS:localhost"):
        """A server certificate with `serial` for `names`, written with the intermediate into `chain`."""
        (self.dir / "server.ext").write_text(f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "server.key.new",
                "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=self.dir)
        openssl("x509", "-req", "-in", "server.csr", "-CA", "mid.pem", "-CAkey", "mid.key", "-set_serial", str(serial),
                "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=self.dir)
        chain = (self.dir / "server.pem").read_text() + (self.dir / "mid.pem").read_text()
        # Written whole and renamed, as a certificate manager does: a reload never sees half a file.
        (self.dir / "chain.pem.new").write_text(chain)
        os.replace(self.dir / "chain.pem.new", self.chain)
        os.replace(self.dir / "server.key.new", self.key)

    def client(self):
        context = ssl.create_default_context(cafile=str(self.root))
        context.set_alpn_protocols(["http/1.1"])
        return context


def peer(port, context):
    """The certificate's serial, the protocol and ALPN choice of a fresh TLS connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert()["serialNumber"], tls.version(), tls.selected_alpn_protocol()


@pytest.fixture
def pki(data_dir):
    directory = data_dir / "pki"
    directory.mkdir()
    authority = PKI(directory)
    authority.issue(serial=1001)
    return authority


def chat(server, token, clone, ws=None):
    async def run():
        async with websockets.connect(f"{server.ws}?token={token}", ssl=server.ssl_context) as socket_:
            assert (await recv(socket_))["type"] == "welcome"
            await socket_.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone, "text": "Hello over TLS"}))
            return await read_stream(socket_)
    return asyncio.run(run())


def test_https_and_wss_on_one_port_with_tls_1_2_at_least_and_hsts(data_dir, pki):
    server = Server(data_dir, "--tls-cert", str(pki.chain), "--tls-key", str(pki.key), ssl_context=pki.client())
    try:
        assert server.base.startswith("https://127.0.0.1:")
        status, health = server.http("GET", "/healthz")
        assert status == 200, health
        import urllib.request
        with urllib.request.urlopen(server.base + "/healthz", context=pki.client(), timeout=10) as response:
            assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
        serial, version, alpn = peer(server.port, pki.client())
        assert serial == "03E9" and version in ("TLSv1.2", "TLSv1.3") and alpn == "http/1.1"
        # A TLS 1.2 client is served; a TLS 1.1 one is refused in the handshake.
        only12 = pki.client()
        only12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert peer(server.port, only12)[1] == "TLSv1.2"
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(pki.root))
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():  # Python deprecates TLS 1.1 too: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            peer(server.port, old)
        # A client that does not trust the chain's root gets no session.
        with pytest.raises(ssl.SSLCertVerificationError):
            peer(server.port, ssl.create_default_context())
        # Plain HTTP to the TLS port gets nothing it could read as HTTP.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not raw.recv(4096).startswith(b"HTTP/")

        token = server.token("tia")
        clone = make_clone(server, token)
        start, tokens, end = chat(server, token, clone["id"])
        assert end["reason"] == "complete" and tokens and start["conversation"]

        # Node's ws over wss://, trusting the test's root through NODE_EXTRA_CA_CERTS.
        node = shutil.which("node") or shutil.which("nodejs")
        env = dict(os.environ, NODE_PATH="/usr/share/nodejs", NODE_EXTRA_CA_CERTS=str(pki.root))
        here = os.path.dirname(__file__)
        result = subprocess.run([node, os.path.join(here, "ws_chat.mjs"), f"{server.ws}?token={token}", clone["id"], "plain"],
                                capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["end"]["reason"] == "complete"
    finally:
        assert server.stop() == 0


def said(server, text):
    """Reads the server's stderr up to a line holding `text`."""
    line = server.proc.stderr.readline()
    while text not in line:
        assert line, f"the server exited without saying {text!r}"
        line = server.proc.stderr.readline()


def test_sighup_serves_a_renewed_certificate_and_keeps_open_sockets(data_dir, pki):
    server = Server(data_dir, "--tls-cert", str(pki.chain), "--tls-key", str(pki.key), ssl_context=pki.client())
    try:
        token = server.token("ren")
        clone = make_clone(server, token)["id"]

        async def run():
            async with websockets.connect(f"{server.ws}?token={token}", ssl=pki.client()) as open_socket:
                assert (await recv(open_socket))["type"] == "welcome"
                assert peer(server.port, pki.client())[0] == "03E9"
                pki.issue(serial=2002)
                server.proc.send_signal(signal.SIGHUP)
                said(server, "reloaded the TLS certificate")
                assert peer(server.port, pki.client())[0] == "07D2"
                # The socket opened before the reload still works.
                await open_socket.send(json.dumps({"type": "chat.send", "id": "c2", "clone": clone, "text": "Still here?"}))
                return await read_stream(open_socket)

        _, _, end = asyncio.run(run())
        assert end["reason"] == "complete"
        # A reload that cannot use the files keeps the certificate in use, and says so.
        pki.chain.write_text("not a certificate\n")
        server.proc.send_signal(signal.SIGHUP)
        said(server, "kept the TLS certificate in use")
        assert peer(server.port, pki.client())[0] == "07D2"
        assert server.http("GET", "/healthz")[0] == 200
    finally:
        assert server.stop() == 0


def test_a_certificate_that_cannot_be_used_is_a_clear_start_up_error(data_dir, pki):
    other = data_dir / "other.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(other)],
                   check=True, capture_output=True)
    for cert, key, expected in ((pki.chain, other, "cannot use the TLS certificate"),
                                (data_dir / "missing.pem", pki.key, "cannot read the TLS certificate chain"),
                                (pki.chain, data_dir / "missing.key", "cannot read the TLS private key")):
        result = subprocess.run([str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir / "d"), "--tls-cert", str(cert),
                                 "--tls-key", str(key)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and expected in result.stderr, result.stderr
    result = subprocess.run([str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir / "d"), "--tls-cert", str(pki.chain)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "--tls-cert and --tls-key go together" in result.stderr


def test_chromium_uses_the_app_over_https_and_wss(data_dir, pki):
    """The browser client over TLS: Chromium told to trust the server's key (its SPKI hash, the
    way Chromium takes a test certificate) signs in, and a reply streams over wss://."""
    from playwright.sync_api import expect, sync_playwright
    spki = subprocess.run(f"openssl x509 -in {pki.chain} -pubkey -noout | openssl pkey -pubin -outform der"
                          " | openssl dgst -sha256 -binary | base64", shell=True, check=True, capture_output=True, text=True).stdout.strip()
    server = Server(data_dir, "--dev", "--tls-cert", str(pki.chain), "--tls-key", str(pki.key), ssl_context=pki.client())
    try:
        token = server.token("cera")
        assert server.http("POST", "/v1/clones", token, {"name": "Ada"})[0] == 201
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", f"--ignore-certificate-errors-spki-list={spki}"])
            page = browser.new_page()
            page.goto(server.base + "/")
            page.get_by_label("Your name").fill("cera")
            page.get_by_role("button", name="Dev sign-in").click()
            expect(page.locator("#connection")).to_have_text("connected", timeout=15_000)
            page.get_by_label("Message", exact=True).fill("Hello over TLS")
            page.get_by_label("Message", exact=True).press("Enter")
            expect(page.locator("#messages li.assistant").last).to_have_attribute("data-reason", "complete", timeout=15_000)
            assert page.evaluate("() => location.protocol") == "https:"
            browser.close()
    finally:
        assert server.stop() == 0


class Stunnel:
    """Debian's stunnel4 as a TLS front before a plain TCP server: what a managed MongoDB's TLS
    looks like to a driver."""

    def __init__(self, directory, target_port, pki):
        self.port = free_port()  # for stunnel to take
        config = directory / f"stunnel-{self.port}.conf"
        config.write_text(f"foreground = yes\npid =\n[mongo]\naccept = 127.0.0.1:{self.port}\n"
                          f"connect = 127.0.0.1:{target_port}\ncert = {pki.chain}\nkey = {pki.key}\n")
        self.proc = subprocess.Popen([shutil.which("stunnel4") or "stunnel4", str(config)], stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        while "Configuration successful" not in line:
            assert line, "stunnel4 exited (installed by scripts/setup.sh --test)"
            line = self.proc.stderr.readline()
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # its log never fills the pipe

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_the_mongodb_store_over_tls_with_a_ca_file_and_clear_errors(data_dir, pki, mongo_base):
    """`tls=true&tlsCAFile=…` in the store URI: libmongoc (built with OpenSSL) checks the chain and
    the name; a wrong CA or a certificate for another name stops the start with the reason."""
    target = int(mongo_base.rsplit(":", 1)[1].split("/")[0])
    front = Stunnel(data_dir, target, pki)
    try:
        uri = f"mongodb://127.0.0.1:{front.port}/parley_tls?tls=true&tlsCAFile={pki.root}"
        server = Server(data_dir / "ok", "--store", uri)
        try:
            token = server.token("mona")
            clone = make_clone(server, token)
            start, _, end = chat(server, token, clone["id"])
            assert end["reason"] == "complete"
            status, page = server.http("GET", f"/v1/conversations/{start['conversation']}/messages", token)
            assert status == 200 and [m["role"] for m in page["messages"]] == ["user", "assistant"]
        finally:
            assert server.stop() == 0

        stranger = data_dir / "stranger"
        stranger.mkdir()
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "k.pem",
                "-out", "other-root.pem", "-days", "2", "-subj", "/CN=Someone Else", cwd=stranger)
        for bad_uri, data in ((f"mongodb://127.0.0.1:{front.port}/parley_tls?tls=true&tlsCAFile={stranger / 'other-root.pem'}"
                               "&serverSelectionTimeoutMS=2000", "bad-ca"),):
            result = subprocess.run([str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir / data), "--store", bad_uri],
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 1, result.stderr
            assert "cannot reach MongoDB" in result.stderr and "TLS handshake failed: certificate verify failed" in result.stderr, \
                result.stderr
    finally:
        front.stop()

    pki.issue(serial=3003, names="DNS:db.invalid")
    front = Stunnel(data_dir, target, pki)
    try:
        uri = f"mongodb://127.0.0.1:{front.port}/parley_tls?tls=true&tlsCAFile={pki.root}&serverSelectionTimeoutMS=2000"
        result = subprocess.run([str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir / "bad-name"), "--store", uri],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        assert "TLS handshake failed: certificate verify failed" in result.stderr and "mismatch" in result.stderr, result.stderr
    finally:
        front.stop()
