"""Starts the real `parley` binary on an ephemeral port for the interop tests."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = pathlib.Path(os.environ.get("PARLEY_BIN", ROOT / ".build" / "debug" / "parley"))


def free_port():
    """A port free on 127.0.0.1 now, for a process a test starts on a port it is told. Below the
    kernel's ephemeral range, as Parley's own sidecar port: a port bind(0) gives is soon some
    outgoing connection's local port, and the process told to take it then fails to bind."""
    import random
    import socket
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(64):
        port = random.randrange(max(1024, low - 16384), low) if low > 2048 else 0
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise RuntimeError("no free port below the ephemeral range")


class Server:
    def __init__(self, data_dir, *extra, env=None, preexec_fn=None, ssl_context=None):
        self.data_dir = data_dir
        self.ssl_context = ssl_context  # for https: what http() trusts
        self.proc = subprocess.Popen(
            [str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir), "--log-level", "warning", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=None if env is None else {**os.environ, **env},
            preexec_fn=preexec_fn,
        )
        line = self.proc.stdout.readline()  # blocks until the server has bound its port
        if not line.startswith(("parley listening on http://", "parley listening on https://")):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.base = line.strip().split(" ")[-1]
        self.port = int(self.base.rsplit(":", 1)[1])
        self.ws = f"{'wss' if self.base.startswith('https') else 'ws'}://127.0.0.1:{self.port}/v1/ws"

    def token(self, sub, role=None):
        out = subprocess.run([str(BINARY), "token", "--sub", sub, "--data-dir", str(self.data_dir), *(["--role", role] if role else [])],
                             check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def http(self, method, path, token=None, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ssl_context) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            return err.code, json.loads(raw) if raw else None

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def data_dir():
    with tempfile.TemporaryDirectory(prefix="parley-interop-") as d:
        yield pathlib.Path(d)


@pytest.fixture(scope="session")
def mongo_base():
    """The MongoDB wire-protocol test server (Tests/fixtures), one per test session; or a real
    server when PARLEY_TEST_MONGODB_URI is set."""
    real = os.environ.get("PARLEY_TEST_MONGODB_URI")
    if real:
        yield real.rstrip("/")
        return
    proc = subprocess.Popen([sys.executable, str(ROOT / "Tests" / "fixtures" / "mongo_wire_server.py"), "--port", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    yield f"mongodb://127.0.0.1:{int(line.split()[-1])}"
    proc.stdin.close()
    proc.wait(timeout=10)


@pytest.fixture(params=["sqlite", "mongodb"])
def store_args(request):
    """Every server test runs once per store: the embedded default, then MongoDB."""
    if request.param == "sqlite":
        return []
    return ["--store", database_uri(request.getfixturevalue("mongo_base"), f"parley_{uuid.uuid4().hex[:16]}")]


def database_uri(base, database):
    """`base` (mongodb://hosts[/path][?options]) naming `database`, its options kept; a database in
    its path is where credentials are checked, so it stays that as authSource (as in
    Tests/ParleyTestSupport/MongoFixture.swift)."""
    hosts, _, query = base.partition("?")
    options = [o for o in query.split("&") if o]
    scheme, _, rest = hosts.partition("://")
    rest, _, path = rest.partition("/")
    if path and not any(o.lower().startswith("authsource=") for o in options):
        options.append(f"authSource={path}")
    return f"{scheme}://{rest}/{database}" + ("?" + "&".join(options) if options else "")


@pytest.fixture
def start_server(data_dir, store_args):
    started = []

    def start(*extra):
        server = Server(data_dir, *store_args, *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture
def server(start_server):
    return start_server("--sim-ttft-ms", "0", "--sim-tokens-per-sec", "0", "--sim-reply-tokens", "20")


@pytest.fixture(scope="session")
def model_server():
    """Sources/ParleySidecar/model-server.py (llama.cpp's server with SmolLM2-135M), one per test session."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "Sources" / "ParleySidecar" / "model-server.py"), "--max-seconds", "1800"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.startswith("model server listening on "), line
    proc.base = line.split()[-1]
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def voice_server():
    """Sources/ParleySidecar/voice-server.py, Parley's local voice (Piper and faster-whisper, installed by
    scripts/setup.sh --test): its OpenAI-compatible base URL. One per test session: loading both
    models takes a few seconds."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "Sources" / "ParleySidecar" / "voice-server.py"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # printed once both models are loaded and the port is bound
    if not line.startswith("voice-server listening on "):
        proc.kill()
        raise RuntimeError(f"voice-server did not start: {line!r} {proc.stderr.read()}")
    yield line.split()[-1] + "/v1"
    proc.terminate()
    proc.wait(timeout=10)
