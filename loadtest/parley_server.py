"""A `parley serve` for a load script: a fresh data directory, port 0 (the bound port is read
from the line the server prints when it listens), tokens signed with its secret, and a stop that
removes the directory.

    with ParleyServer(binary, "--sim-ttft-ms", "0") as server:
        token = server.token("alice")
        server.base  # http://127.0.0.1:<port>
"""
import json
import shutil
import subprocess
import tempfile
import time


class ParleyServer:
    def __init__(self, binary, *extra):
        self.binary = binary
        self.extra = list(extra)

    def __enter__(self):
        self.data = tempfile.mkdtemp(prefix="parley-load-")
        self.process = subprocess.Popen(
            [self.binary, "serve", "--port", "0", "--data-dir", self.data, *self.extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in self.process.stdout:
            if line.startswith("parley listening on "):
                self.base = line.split()[-1]
                self.port = int(self.base.rsplit(":", 1)[1])
                return self
        self.__exit__(None, None, None)
        raise SystemExit("parley serve stopped before it listened")

    def first_token_times(self, token, clone, text, replies):
        """Sends `replies` messages of `text` to `clone` in one conversation over one socket;
        the seconds each reply took to its first token."""
        from websockets.sync.client import connect
        conversation, times = None, []
        with connect("ws://127.0.0.1:%d/v1/ws?token=%s" % (self.port, token), max_size=None, open_timeout=30) as ws:
            ws.recv()  # welcome
            for i in range(replies):
                frame = {"type": "chat.send", "id": "m%d" % i, "clone": clone, "text": text}
                if conversation:
                    frame["conversation"] = conversation
                sent, first = time.monotonic(), None
                ws.send(json.dumps(frame))
                while True:
                    answer = json.loads(ws.recv(timeout=300))
                    if answer["type"] == "stream.start":
                        conversation = answer["conversation"]
                    elif answer["type"] == "token" and first is None:
                        first = time.monotonic() - sent
                    elif answer["type"] == "stream.end":
                        break
                    elif answer["type"] == "error":
                        raise SystemExit(answer)
                times.append(first)
        return times

    def token(self, sub):
        return subprocess.check_output([self.binary, "token", "--sub", sub, "--data-dir", self.data], text=True).strip()

    def __exit__(self, *_):
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.data, ignore_errors=True)
