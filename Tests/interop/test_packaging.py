"""What a deployment copies: the `parley` binary, and the resource bundles SwiftPM builds beside
it (`parley_ParleyServer.resources`: the web client; `parley_ParleySidecar.resources`: the local
model's and voice's server scripts)."""
import subprocess
import urllib.error
import urllib.request

import pytest

from conftest import BINARY


def test_a_binary_copied_without_its_bundles_serves_and_says_what_it_lacks(data_dir, tmp_path):
    """`parley` copied alone: SwiftPM's `Bundle.module` found the bundles in the build directory
    by its absolute path while that existed (and stopped the process at start-up once it was
    gone); the binary now looks beside itself only, so what it serves does not depend on a build
    directory elsewhere: no web client (404, and a warning), the API as ever, and the local model
    says its script is missing."""
    alone = tmp_path / "parley"
    alone.write_bytes(BINARY.read_bytes())
    alone.chmod(0o755)
    proc = subprocess.Popen([str(alone), "serve", "--port", "0", "--data-dir", str(data_dir), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("parley listening on http://"), line
        base = line.strip().split(" ")[-1]
        with urllib.request.urlopen(base + "/healthz", timeout=10) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/", timeout=10)
        assert err.value.code == 404
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    assert "the web client is not beside this binary" in proc.stderr.read()
    result = subprocess.run(
        [str(alone), "serve", "--port", "0", "--data-dir", str(data_dir), "--local-model", "--provider-model", "smollm2"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stderr
    assert "this build has no model-server.py beside it" in result.stderr


def test_the_built_binary_serves_its_web_client(data_dir):
    """Beside its bundles (where the build puts them), the same binary serves the web client."""
    proc = subprocess.Popen([str(BINARY), "serve", "--port", "0", "--data-dir", str(data_dir), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("parley listening on http://"), line
        with urllib.request.urlopen(line.strip().split(" ")[-1] + "/", timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
