// One chat stream through Parley with Node's `ws` (Debian's node-ws): connect, wait for
// welcome, send chat.send, collect tokens to stream.end, print a JSON summary on stdout.
// Usage: NODE_PATH=/usr/share/nodejs node ws_chat.mjs URL CLONE deflate|plain
import { createRequire } from "node:module";
const WebSocket = createRequire(import.meta.url)("ws");

const [url, clone, mode] = process.argv.slice(2);
const ws = new WebSocket(url, { perMessageDeflate: mode === "deflate" });
const tokens = [];
const timer = setTimeout(() => { console.error("timed out"); process.exit(2); }, 20000);
ws.on("message", (data, isBinary) => {
  const frame = JSON.parse(data.toString("utf8"));
  if (frame.type === "welcome") {
    ws.send(JSON.stringify({ type: "chat.send", id: "n1", clone, text: "Hello from node" }));
  } else if (frame.type === "token") {
    tokens.push(frame);
  } else if (frame.type === "stream.end") {
    clearTimeout(timer);
    console.log(JSON.stringify({ binary: isBinary, seqs: tokens.map((t) => t.seq), text: tokens.map((t) => t.text).join(""), end: frame,
                                 extensions: ws.extensions }));
    ws.close(1000, "done");
  }
});
ws.on("close", (code) => process.exit(code === 1000 || code === 1005 ? 0 : 1));
ws.on("error", (error) => { console.error(String(error)); process.exit(1); });
