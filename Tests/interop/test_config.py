"""`parley serve` options from a JSON config file and PARLEY_<OPTION> environment variables:
every option reachable, the command line over the environment over the file, and bad input
refused at start-up with where it came from."""
import json
import os
import re
import subprocess

from conftest import BINARY, Server
from test_rfc6455 import RawSocket


def write(path, options):
    path.write_text(json.dumps(options))
    return str(path)


def serve(*args, env=None, data_dir):
    return subprocess.run([str(BINARY), "serve", "--data-dir", str(data_dir), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def limit_of(server):
    """The message limit the server runs with: a 3000-byte message is read below it, closed 1009 above."""
    raw = RawSocket(server, server.token("cfg"))
    assert raw.json()["type"] == "welcome"
    raw.send(0x1, json.dumps({"type": "nope", "id": "size", "pad": "x" * 2950}).encode())
    opcode, payload = raw.frame()
    return "under 3000" if opcode == 0x1 else ("1009" if struct_code(payload) == 1009 else payload)


def struct_code(payload):
    return int.from_bytes(payload[:2], "big")


def test_a_config_file_sets_options_and_the_environment_and_command_line_override_it(data_dir, tmp_path):
    config = write(tmp_path / "parley.json", {"max-message-bytes": 2048, "ws-deflate": False, "log-level": "warning"})
    server = Server(data_dir, "--config", config)
    try:
        assert limit_of(server) == "1009"
        offered = RawSocket(server, server.token("cfg"), extensions="permessage-deflate")
        assert "sec-websocket-extensions" not in offered.headers, "ws-deflate false in the file turned it off"
    finally:
        assert server.stop() == 0

    server = Server(data_dir, "--config", config, env={"PARLEY_MAX_MESSAGE_BYTES": "4096", "PARLEY_WS_DEFLATE": "true"})
    try:
        assert limit_of(server) == "under 3000", "the environment wins over the file"
        offered = RawSocket(server, server.token("cfg"), extensions="permessage-deflate")
        assert offered.headers["sec-websocket-extensions"].startswith("permessage-deflate")
    finally:
        assert server.stop() == 0

    server = Server(data_dir, "--max-message-bytes", "2048", env={"PARLEY_CONFIG": config, "PARLEY_MAX_MESSAGE_BYTES": "4096"})
    try:
        assert limit_of(server) == "1009", "the command line wins over both (and PARLEY_CONFIG names the file)"
    finally:
        assert server.stop() == 0


def test_the_environment_turns_off_a_flag_the_file_turned_on(data_dir, tmp_path):
    config = write(tmp_path / "dev.json", {"dev": True})
    server = Server(data_dir, "--config", config)
    try:
        assert server.http("GET", "/v1/info")[1]["dev"] is True
    finally:
        assert server.stop() == 0
    server = Server(data_dir, "--config", config, env={"PARLEY_DEV": "false"})
    try:
        assert server.http("GET", "/v1/info")[1]["dev"] is False, "a flag with no --no- form is still turned off"
    finally:
        assert server.stop() == 0


def test_every_option_of_serve_can_come_from_the_file_and_the_environment(data_dir, tmp_path):
    helptext = subprocess.run([str(BINARY), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    options = sorted(set(re.findall(r"^\s+--(?:\[no-\])?([a-z][a-z0-9-]*)", helptext, re.M)) - {"help", "config"})
    assert len(options) > 30 and "ws-deflate" in options and "max-message-bytes" in options
    # Every name is accepted (null keeps the default); an invalid command-line value then stops
    # the start before anything listens, so the refusal must be that value, not an unknown name.
    config = write(tmp_path / "all.json", {name: None for name in options})
    result = serve("--config", config, "--max-message-bytes", "1", data_dir=data_dir)
    assert result.returncode == 64 and "unknown option" not in result.stderr and "--max-message-bytes must be" in result.stderr
    env = {"PARLEY_" + name.upper().replace("-", "_"): "" for name in options}  # empty counts as unset
    result = serve("--max-message-bytes", "1", env=env, data_dir=data_dir)
    assert result.returncode == 64 and "--max-message-bytes must be" in result.stderr, result.stderr


def test_bad_configuration_is_refused_with_its_source(data_dir, tmp_path):
    cases = [
        ({"prot": 8080}, None, "unknown option 'prot' (did you mean port?)"),
        ({"dev": "yes"}, None, "'dev' is a flag: give true or false"),
        ({"port": {"n": 1}}, None, "'port' needs a string, a number or a list of strings"),
        ({"port": "eighty"}, None, "from "),
        (None, {"PARLEY_WS_DEFLATE": "maybe"}, "PARLEY_WS_DEFLATE=maybe: a flag's value is true or false"),
        (None, {"PARLEY_PORT": "99999"}, "(from the environment: --port)"),
        ({"trusted-proxies": "10.0.0.0/33"}, None, "--trusted-proxies: '10.0.0.0/33' is not an IP address or CIDR block"),
        (None, {"PARLEY_SQLITE_COMMIT_WINDOW_MS": "500"}, "--sqlite-commit-window-ms must be 0-100"),
        # A negative value reaches the range check (it was read as an option, and its own
        # option as missing a value).
        ({"max-frames-per-second": -1}, None, "--max-requests-per-second 0 or more"),
        (None, {"PARLEY_MAX_FRAMES_PER_SECOND": "-5"}, "--max-requests-per-second 0 or more"),
        ({"max-clones": 0}, None, "--max-clones must be 1-1000000"),
        (None, {"PARLEY_MAX_STREAMS_PER_USER": "0"}, "--max-streams-per-user must be 1-10000"),
    ]
    for options, env, message in cases:
        args = ["--config", write(tmp_path / "bad.json", options)] if options is not None else []
        result = serve(*args, env=env, data_dir=data_dir)
        assert result.returncode == 64 and message in result.stderr, (options, env, result.stderr)
    (tmp_path / "broken.json").write_text("{not json")
    result = serve("--config", str(tmp_path / "broken.json"), data_dir=data_dir)
    assert result.returncode == 64 and "not valid JSON: expected a key in quotes at byte 1" in result.stderr
    # An option given twice would count once, silently: the first, where an editor of the file
    # expects the last.
    for text, message in [
        ('{"port": 9000, "log-level": "debug", "port": 9001}', 'not valid JSON: the key "port" is repeated at byte 37'),
        ('{"port": 9000, "--port": 9001}', "option 'port' is given twice"),
    ]:
        (tmp_path / "twice.json").write_text(text)
        result = serve("--config", str(tmp_path / "twice.json"), data_dir=data_dir)
        assert result.returncode == 64 and message in result.stderr, (text, result.stderr)


def test_dev_mode_needs_a_loopback_ip_literal(data_dir):
    # Names are not resolved: a name that starts with 127. or says localhost could point anywhere.
    for host in ["127.evil.example", "127.0.0.1.nip.io", "localhost", "0.0.0.0", "::", "10.0.0.1"]:
        result = serve("--dev", "--host", host, data_dir=data_dir)
        assert result.returncode == 64 and "loopback IP address" in result.stderr, (host, result.stderr)
    for host in ["127.0.0.2", "::1"]:
        result = serve("--dev", "--host", host, "--http-head-timeout", "0", data_dir=data_dir)
        # Accepted as loopback: the start stops at the next invalid option instead.
        assert result.returncode == 64 and "--http-head-timeout must be" in result.stderr, (host, result.stderr)


def test_a_second_server_on_a_data_directory_in_use_is_refused_and_the_first_serves_on(start_server, store_args, data_dir):
    """Two processes on one data directory would share its SQLite file, secret and node id and
    each resume the other's rooms and schedules: the second is refused, naming the first."""
    first = start_server()
    second = serve("--port", "0", *store_args, data_dir=data_dir)
    assert second.returncode == 1, second.stderr
    assert f"another parley process (pid {first.proc.pid}) is using the data directory {data_dir}" in second.stderr, second.stderr
    assert first.http("GET", "/healthz")[0] == 200


def test_a_users_request_rate_is_set_on_the_command_line_and_0_lifts_it(data_dir):
    import time
    server = Server(data_dir, "--max-requests-per-second", "1")
    try:
        token = server.token("rate")
        statuses, started = [], time.monotonic()
        while len(statuses) < 50 and 429 not in statuses:
            statuses.append(server.http("GET", "/v1/clones", token)[0])
        elapsed = time.monotonic() - started
        # A burst of 2, then one a second: how many pass depends only on how long the loop took.
        assert statuses[:2] == [200, 200] and statuses[-1] == 429, statuses
        assert len(statuses) <= 3 + int(elapsed), (statuses, elapsed)
        status, body = server.http("GET", "/v1/clones", server.token("other"))
        assert status == 200, "another user's requests are not held back"
    finally:
        assert server.stop() == 0
    server = Server(data_dir, "--max-requests-per-second", "0")
    try:
        token = server.token("rate")
        assert all(server.http("GET", "/v1/clones", token)[0] == 200 for _ in range(60)), "0: no limit"
    finally:
        assert server.stop() == 0


def test_readme_documents_every_serve_option_with_its_default():
    """README's options are `parley serve --help`'s: each option is named there in backticks, each
    row of its options table names an option that exists, and a row's plain default is the one
    the command line applies (`10` for a help's `10.0`)."""
    from conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    usage = subprocess.run([str(BINARY), "serve", "--help"], capture_output=True, text=True, timeout=30)
    options, current = {}, None
    for line in (usage.stdout + usage.stderr).splitlines():
        named = re.match(r"^  (--[a-z0-9-]+)", line)
        if named:
            current = named.group(1)
            options[current] = line
        elif current and line.startswith("   "):
            options[current] += " " + line.strip()
    assert len(options) > 50, usage
    undocumented = [o for o in options if "`%s`" % o not in readme and "`%s " % o not in readme]
    assert undocumented == [], "README does not name these options"
    rows = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `(--[a-z0-9-]+)`[^|]*\|([^|]*)\|", readme, re.M)}
    assert [o for o in rows if o not in options] == [], "README's options table names options parley serve lacks"
    def same(written, applied):
        try:
            return float(written) == float(applied)
        except ValueError:
            return written == applied

    differing = {}
    for option, cell in rows.items():
        default = re.search(r"\(default: ([^)]*)\)", options[option])
        plain = re.fullmatch(r"`([^`]+)`", cell)
        if default and plain and not same(plain.group(1), default.group(1)):
            differing[option] = (cell, default.group(1))
    assert differing == {}, "README's default (first) against the command line's"


def test_a_users_replies_at_once_are_set_on_the_command_line(data_dir):
    """`--max-streams-per-user 2`: with two replies streaming (slowly, paced) in two conversations,
    a third is refused with rate_limited and says how many may stream."""
    server = Server(data_dir, "--max-streams-per-user", "2", "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "2",
                    "--sim-reply-tokens", "200")
    try:
        token = server.token("streams")
        status, clone = server.http("POST", "/v1/clones", token, {"name": "Ada"})
        assert status == 201, clone
        raw = RawSocket(server, token)
        assert raw.json()["type"] == "welcome"
        started = 0
        for n in range(3):
            raw.send(0x1, json.dumps({"type": "chat.send", "id": "c%d" % n, "clone": clone["id"], "text": "hello"}).encode())
            while True:
                frame = raw.json()
                if frame["type"] == "stream.start" and frame.get("ref") == "c%d" % n:
                    started += 1
                    break
                if frame["type"] == "error":
                    assert n == 2 and frame["ref"] == "c2", frame
                    assert frame["code"] == "rate_limited" and frame["message"] == "at most 2 replies may stream at once", frame
                    break
        assert started == 2
    finally:
        assert server.stop() == 0
