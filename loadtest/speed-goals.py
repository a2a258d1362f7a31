#!/usr/bin/env python3
"""Reads what loadtest/run-speed-goals.sh left in OUT and prints each #26 goal beside its target.
Usage: loadtest/speed-goals.py OUT"""
import json
import re
import sys

out = sys.argv[1]
rows = []  # (goal, verdict, measured, target)
notes = []


def goal(name, measured, target, met):
    rows.append((name, "met" if met else "NOT met", measured, target))


def unmeasured(name, why):
    rows.append((name, "-", why, None))


def fan_out(mode):
    """bench-peers/run.sh's rows (name → its figures), without those that did not finish."""
    found = {}
    for line in open(f"{out}/{mode}.txt"):
        name, *fields = line.split()
        values = dict(f.split("=", 1) for f in fields if "=" in f)
        if "spread_p99_ms" in values:
            found[name] = {k: float(v) for k, v in values.items() if re.fullmatch(r"[0-9.]+", v)}
    for name in ("go", "node", "py", "parley", "parley-joined"):
        if name not in found:
            notes.append(f"{mode}, {name}: no row in {out}/{mode}.txt")
        elif found[name]["delivered"] < found[name]["expected"]:
            # Its rate would be the client's timeout's, not its own.
            r = found.pop(name)
            notes.append(f"{mode}, {name}: {r['delivered']:,.0f} of {r['expected']:,.0f} frames arrived before the client's timeout; left out")
    peers = {n: r for n, r in found.items() if not n.startswith("parley")}
    return found, peers


burst, peers = fan_out("burst")
best = min(peers, key=lambda n: peers[n]["spread_p99_ms"], default=None)
go = burst.get("go")
for name, unit in (("parley", "frame"), ("parley-joined", "token")):
    p = burst.get(name)
    if p is None:
        unmeasured(f"burst, {name}", "no complete row")
        continue
    if go is None:
        unmeasured(f"burst, {name}: {unit}s/s and CPU against Go's", "no complete Go row")
    else:
        ratio = p["frames_per_s"] / go["frames_per_s"]
        goal(f"burst, {name}: {unit}s/s ÷ Go's", f"{p['frames_per_s']:,.0f} ÷ {go['frames_per_s']:,.0f} = {ratio:.2f}×", "≥ 1.5×", ratio >= 1.5)
        goal(f"burst, {name}: CPU per {unit}", f"{p['server_us_per_frame']:.2f} µs (Go {go['server_us_per_frame']:.2f})", "≤ Go's",
             p["server_us_per_frame"] <= go["server_us_per_frame"])
    if best is None:
        unmeasured(f"burst, {name}: spread p99", "no complete peer row")
    else:
        goal(f"burst, {name}: spread p99", f"{p['spread_p99_ms']:.1f} ms (best peer: {best} {peers[best]['spread_p99_ms']:.1f})",
             "≤ the best peer's", p["spread_p99_ms"] <= peers[best]["spread_p99_ms"])

paced, peers = fan_out("paced")
p = paced.get("parley")
if p is None:
    unmeasured("paced", "no complete Parley row")
else:
    shown = ", ".join(f"{n} {r['spread_p99_ms']:.1f}" for n, r in peers.items())
    below = all(p["spread_p99_ms"] < r["spread_p99_ms"] for r in peers.values())
    goal("paced: spread p99", f"{p['spread_p99_ms']:.1f} ms (peers: {shown})", "≤ 10 ms and below every peer's",
         p["spread_p99_ms"] <= 10 and below and len(peers) == 3)
    goal("paced: CPU per frame", f"{p['server_us_per_frame']:.2f} µs", "≤ 10 µs", p["server_us_per_frame"] <= 10)

chat = json.load(open(f"{out}/chat-1000.json"))
us = chat["server"]["cpu_us_per_frame_delivered"]
goal("chat, 1,000 streams: CPU per frame", f"{us:.1f} µs", "≤ 15 µs", us <= 15)
delay = chat["latency"]["added_inter_token_delay"]["p99_ms"]
goal("chat, 1,000 streams: added inter-token p99", f"{delay:.2f} ms", "≤ 10 ms", delay <= 10)

provider = re.search(r"server CPU per token ([0-9.]+) us", open(f"{out}/provider.txt").read())
if provider is None:
    unmeasured("provider, 100 streams", f"no figure in {out}/provider.txt")
else:
    us = float(provider.group(1))
    goal("provider, 100 streams: Parley CPU per token", f"{us:.1f} µs", "≤ 15 µs", us <= 15)

big = json.load(open(f"{out}/chat-10000.json"))
asked = 10000 / 22 * 400  # a 400-token reply every 22 s a socket
rate = big["counters"]["frames_per_s"]
goal("10,000 streams: tokens/s delivered", f"{rate:,.0f} of {asked:,.0f} asked ({rate / asked:.0%}); server {big['server']['cpu_utilization']:.0%} "
     f"of a core, the load client {big['client']['cpu_utilization']:.0%}", "all of them", rate >= 0.95 * asked)
delay = big["latency"]["added_inter_token_delay"]["p99_ms"]
goal("10,000 streams: added delay p99", f"{delay:,.0f} ms", "≤ 50 ms", delay <= 50)

width = max(len(r[0]) for r in rows)
for name, verdict, measured, target in rows:
    print(f"{name:<{width}}  {verdict:<7}  {measured}" + (f"  (goal {target})" if target else ""))
for note in notes:
    print("note:", note)
