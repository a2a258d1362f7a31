"""parley-load against the real binary: each scenario runs small and reports what it saw."""
import json
import os
import subprocess

from conftest import ROOT, Server

LOAD = os.environ.get("PARLEY_LOAD_BIN", str(ROOT / ".build" / "debug" / "parley-load"))


def load(server, data_dir, scenario, *args, pid=None, name=None):
    out = data_dir / f"{name or scenario}.json"
    result = subprocess.run(
        [LOAD, scenario, "--port", str(server.port), "--secret-file", str(data_dir / "jwt-secret"),
         "--server-pid", str(pid or server.proc.pid), "--json", str(out), *args],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["scenario"] == (name or scenario)
    assert report["counters"]["errors"] == {} and report["counters"]["sockets_dropped"] == 0, report
    assert report["server"]["cpu_s"] >= 0 and report["client"]["cpu_s"] >= 0 and report["server"]["rss_peak_bytes"] > 0
    return report, result.stdout


def test_chat_times_every_reply_from_its_scheduled_send(data_dir):
    server = Server(data_dir, "--sim-ttft-ms", "50", "--sim-tokens-per-sec", "100", "--sim-reply-tokens", "8")
    try:
        report, table = load(server, data_dir, "chat", "--sockets", "10", "--interval-ms", "400", "--duration", "1.2",
                             "--tokens-per-second", "100")
        latency = report["latency"]
        # 10 sockets, phases 0-360 ms, each sending every 400 ms for 1.2 s: 3 sends each.
        assert report["counters"]["streams"] == 30 and latency["whole_stream"]["count"] == 30
        assert latency["time_to_first_token"]["count"] == 30 and latency["time_to_first_token"]["p50_ms"] >= 50
        assert latency["inter_token_gap"]["count"] == 30 * 7 and report["counters"]["tokens"] == 30 * 8
        assert latency["connect"]["count"] == 10
        assert "time_to_first_token" in table and "p99.9" in table
    finally:
        assert server.stop() == 0


def test_debate_measures_fan_out_to_every_member(data_dir):
    server = Server(data_dir, "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "200", "--sim-reply-tokens", "10")
    try:
        report, _ = load(server, data_dir, "debate", "--members", "20", "--rounds", "1", "--turn-tokens", "10")
        # Two turns of 10 tokens, each to 20 members.
        assert report["latency"]["fanout_delay"]["count"] == 2 * 10 * 20
        assert report["counters"]["tokens"] == 400
    finally:
        assert server.stop() == 0


def test_debate_with_joined_tokens_counts_and_times_every_token_of_every_frame(data_dir):
    # Unpaced: tokens come faster than a flush, so members get frames of several.
    server = Server(data_dir, "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "0", "--sim-reply-tokens", "50")
    try:
        report, table = load(server, data_dir, "debate", "--members", "20", "--rounds", "1", "--turn-tokens", "50", "--coalesce")
        # Two turns of 50 tokens, each to 20 members: each token timed, however it came.
        assert report["latency"]["fanout_delay"]["count"] == 2 * 50 * 20 and report["counters"]["tokens"] == 2000
        assert report["server"]["cpu_us_per_token_delivered"] >= 0 and "per token" in table
    finally:
        assert server.stop() == 0


def test_deflate_reports_bytes_on_the_wire_beside_the_json(data_dir):
    server = Server(data_dir, "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "200", "--sim-reply-tokens", "10")
    try:
        plain, _ = load(server, data_dir, "debate", "--members", "20", "--rounds", "1", "--turn-tokens", "10", name="debate")
        report, table = load(server, data_dir, "debate", "--members", "20", "--rounds", "1", "--turn-tokens", "10", "--deflate",
                             "--user-prefix", "deflated", name="debate")
        # Every member got every token, decompressed, and the stream shrank on the wire.
        assert report["latency"]["fanout_delay"]["count"] == 2 * 10 * 20 and report["counters"]["tokens"] == 400
        deflate = report["deflate"]
        assert deflate["compressed_sockets"] == 21  # the members and the moderator
        assert deflate["wire_bytes"] < 0.5 * deflate["json_bytes"], deflate
        assert "deflate" not in plain
        assert "on the wire" in table
    finally:
        assert server.stop() == 0


def test_translation_idle_and_schedule_scenarios_report_their_measures(data_dir):
    server = Server(data_dir, "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "200")
    try:
        report, _ = load(server, data_dir, "translation", "--members", "4", "--languages", "2", "--interval-ms", "500",
                         "--duration", "1", "--tokens-per-second", "200")
        # 4 members say 2 things each; each message reaches the 3 others.
        assert report["latency"]["delivery_delay"]["count"] == 4 * 2 * 3
        report, _ = load(server, data_dir, "idle", "--sockets", "30", "--hold", "0.2")
        assert report["server_rss_per_socket_bytes"] > 0 and report["latency"]["connect"]["count"] == 30
        report, _ = load(server, data_dir, "schedule", "--users", "3", "--per-user", "10", "--lead-ms", "1500")
        assert report["latency"]["delivery_delay"]["count"] == 30
    finally:
        assert server.stop() == 0


def test_model_times_a_real_model_through_parley_and_directly(data_dir, model_server):
    prices = data_dir / "prices.json"
    prices.write_text(json.dumps({"models": {"smollm2": {"input_per_1k": 0, "output_per_1k": 0}}}))
    server = Server(data_dir, "--provider", "openai", "--provider-url", model_server.base + "/v1", "--provider-model", "smollm2",
                    "--prices", str(prices))
    try:
        # Two streams asking three times each, closed loop: six replies, each with a first token.
        for name, extra, pid in [("model", [], None), ("model-direct", ["--direct", model_server.base + "/v1"], model_server.pid)]:
            report, table = load(server, data_dir, "model", "--streams", "2", "--requests", "3", "--max-tokens", "48", *extra,
                                 pid=pid, name=name)
            latency, counters = report["latency"], report["counters"]
            assert counters["streams"] == 6 and latency["whole_stream"]["count"] == 6, name
            assert latency["time_to_first_token"]["count"] == 6 and counters["tokens"] >= 6
            assert latency["inter_token_gap"]["count"] == counters["tokens"] - 6
            assert report["parameters"]["via"] == ("direct" if extra else "parley")
    finally:
        assert server.stop() == 0


def test_it_refuses_targets_outside_loopback(data_dir):
    result = subprocess.run([LOAD, "idle", "--host", "10.1.2.3", "--secret", "x"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "only loopback targets" in result.stderr
    result = subprocess.run([LOAD, "model", "--direct", "http://10.1.2.3:8081/v1", "--secret", "x"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "only loopback targets" in result.stderr
