"""Voiced replies (#29) through the real binary and the real local voice: Piper speaks each
sentence of a reply as it streams, and faster-whisper, which never saw the text, must hear it
back. The audio arrives as binary WebSocket frames (PROTOCOL.md, Voice), is charged per sentence
before it is made, and a resume after a cut mid-audio loses and repeats nothing."""
import asyncio
import io
import json
import math
import re
import socket
import struct
import urllib.error
import urllib.request
import uuid
import wave

import pytest
import websockets

from conftest import Server
from schemas import validate_frame, validate_rest
from test_interop import make_clone
from test_providers import start_fake_openai

# What the scripted model answers for the listening test: plain sentences, so that a word the
# recogniser gets wrong is the voice's fault, not a made-up word's.
REPLY = ("Good morning! The weather is lovely today, and the garden is full of flowers. "
         "I would like to take a long walk by the river this afternoon. "
         "Would you like to come with me? We could have coffee in the little town after that.")

TIMEOUT = 30  # a watchdog per receive: speech of a sentence takes a fraction of a second


def audio_frame(data):
    """(header, pcm) of a binary audio frame: 0x01, a big-endian UInt16 header length, header JSON, audio."""
    assert data[0] == 1, data[:8]
    (length,) = struct.unpack(">H", data[1:3])
    header = json.loads(data[3:3 + length])
    assert header["type"] == "audio" and header["format"] == "pcm" and header["sample_rate"] == 24000, header
    return header, data[3 + length:]


async def next_frame(ws):
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
    if isinstance(raw, bytes):
        return "audio", audio_frame(raw)
    return "json", validate_frame(json.loads(raw))


async def read_voiced(ws, tokens, chunks, stop_after_chunks=None):
    """Reads a voiced stream's frames into `tokens` and `chunks` until stream.end (returned) or,
    with `stop_after_chunks`, until that many audio chunks were read (None returned)."""
    while True:
        kind, frame = await next_frame(ws)
        if kind == "audio":
            chunks.append(frame)
            if stop_after_chunks and len(chunks) >= stop_after_chunks:
                return None
        elif frame["type"] == "token":
            tokens.append(frame)
        elif frame["type"] == "stream.end":
            return frame
        else:
            assert frame["type"] == "stream.start", frame


def transcribe(voice_url, pcm):
    """What faster-whisper hears in 24 kHz 16-bit mono PCM."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(24000)
        out.writeframes(pcm)
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"reply.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(voice_url + "/audio/transcriptions", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["text"]


def words(text):
    return re.findall(r"[a-z']+", text.lower())


def word_error_rate(reference, hypothesis):
    """Levenshtein distance over words, divided by the reference's length."""
    ref, hyp = words(reference), words(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / max(1, len(ref))


def voiced_server(data_dir, voice_server, *extra):
    return Server(data_dir, "--tts-url", voice_server, "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "60",
                  "--sim-reply-tokens", "60", *extra)


def test_a_voiced_reply_is_heard_back_as_its_text_and_paid_for(data_dir, voice_server):
    (data_dir / "reply.txt").write_text(REPLY)
    (data_dir / "prices.json").write_text(json.dumps({"models": {"fake-model": {"input_per_1k": 1000, "output_per_1k": 2000}}}))
    model, port = start_fake_openai("--reply-file", str(data_dir / "reply.txt"))
    server = Server(data_dir, "--tts-url", voice_server, "--provider", "openai", "--provider-url", f"http://127.0.0.1:{port}/v1",
                    "--provider-model", "fake-model", "--prices", str(data_dir / "prices.json"))
    try:
        token = server.token("vera")
        status, clone = server.http("POST", "/v1/clones", token, {"name": "Ada", "voice": {"name": "joe", "speed": 1.0}})
        assert status == 201 and clone["voice"] == {"name": "joe", "speed": 1.0}, clone
        _, before = server.http("GET", "/v1/credits", token)

        async def run():
            async with websockets.connect(f"{server.ws}?token={token}") as ws:
                await next_frame(ws)
                await ws.send(json.dumps({"type": "chat.send", "id": "v1", "clone": clone["id"], "text": "Say something", "voice": True}))
                tokens, chunks = [], []
                end = await read_voiced(ws, tokens, chunks)
                return tokens, chunks, end

        tokens, chunks, end = asyncio.run(run())
        text = "".join(t["text"] for t in tokens)
        assert end["reason"] == "complete" and end["audio"]["reason"] == "complete", end
        assert [h["chunk"] for h, _ in chunks] == list(range(1, len(chunks) + 1)) == list(range(1, end["audio"]["chunks"] + 1))
        sentences = [h["sentence"] for h, _ in chunks]
        assert sentences == sorted(sentences) and sentences[-1] == end["audio"]["sentences"] >= 2, sentences
        assert end["audio"]["characters"] == len(re.sub(r"\s+", " ", text).strip()) - (end["audio"]["sentences"] - 1)
        pcm = b"".join(audio for _, audio in chunks)
        assert len(pcm) % 2 == 0 and len(pcm) > 24000 * 2, len(pcm)  # whole samples, more than a second
        heard = transcribe(voice_server, pcm)
        assert text == REPLY
        assert word_error_rate(text, heard) <= 0.10, (text, heard)

        # Charged: one ledger entry per sentence, feature voice, summing to what stream.end says;
        # the balance went down by the text's cost and the voice's, no more.
        _, after = server.http("GET", "/v1/credits", token)
        assert end["audio"]["cost"] > 0
        assert after["balance"] == end["balance"] == before["balance"] - end["cost"] - end["audio"]["cost"], (before, after, end)
        _, page = server.http("GET", "/v1/credits?limit=100", token)
        voice = [e for e in page["entries"] if e.get("feature") == "voice"]
        assert len(voice) == end["audio"]["sentences"], voice
        assert -sum(e["credits"] for e in voice) == end["audio"]["cost"]
    finally:
        server.stop()
        model.stdin.close()
        model.wait(timeout=10)


def test_a_resume_after_a_cut_mid_audio_loses_and_repeats_nothing(data_dir, voice_server):
    server = voiced_server(data_dir, voice_server)
    try:
        token = server.token("walt")
        clone = make_clone(server, token)

        async def run():
            tokens, chunks = [], []
            async with websockets.connect(f"{server.ws}?token={token}") as ws:
                await next_frame(ws)
                await ws.send(json.dumps({"type": "chat.send", "id": "v1", "clone": clone["id"], "text": "Tell me", "voice": True}))
                _, start = await next_frame(ws)
                assert start["type"] == "stream.start", start
                assert await read_voiced(ws, tokens, chunks, stop_after_chunks=2) is None
            # The socket is gone mid-audio; a new one asks for what came after what it has.
            async with websockets.connect(f"{server.ws}?token={token}") as ws:
                await next_frame(ws)
                await ws.send(json.dumps({"type": "stream.resume", "id": "r1", "stream": start["stream"],
                                          "after": tokens[-1]["seq"], "audio_after": chunks[-1][0]["chunk"]}))
                _, ack = await next_frame(ws)
                assert ack["type"] == "stream.start" and ack["ref"] == "r1", ack
                end = await read_voiced(ws, tokens, chunks)
            return tokens, chunks, end

        tokens, chunks, end = asyncio.run(run())
        assert end["reason"] == "complete" and end["audio"]["reason"] == "complete", end
        assert [t["seq"] for t in tokens] == list(range(1, 61))
        assert [h["chunk"] for h, _ in chunks] == list(range(1, end["audio"]["chunks"] + 1))
        assert end["audio"]["chunks"] > 2
    finally:
        server.stop()


def test_voice_is_refused_clearly_where_there_is_none(data_dir):
    server = Server(data_dir, "--sim-ttft-ms", "0")
    try:
        token = server.token("xena")
        clone = make_clone(server, token)
        status, body = server.http("PATCH", f"/v1/clones/{clone['id']}", token, {"voice": {"name": "joe", "speed": 9}})
        assert status == 400 and "voice.speed" in body["error"]["message"], body

        async def run():
            async with websockets.connect(f"{server.ws}?token={token}") as ws:
                await next_frame(ws)
                await ws.send(json.dumps({"type": "chat.send", "id": "v1", "clone": clone["id"], "text": "hi", "voice": True}))
                return await next_frame(ws)

        _, error = asyncio.run(run())
        assert error["type"] == "error" and error["code"] == "bad_request" and "speech" in error["message"], error
    finally:
        server.stop()


def speak(voice_url, text):
    """`text` said by the local voice, as a WAV file: a recorded question, made without a microphone."""
    request = urllib.request.Request(voice_url + "/audio/speech", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "tts-1", "input": text, "voice": "joe", "response_format": "wav"}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        wav = response.read()
    # The streamed WAV says "unknown length"; a recording has its sizes filled in.
    return wav[:4] + struct.pack("<I", len(wav) - 8) + wav[8:40] + struct.pack("<I", len(wav) - 44) + wav[44:]


def upload(server, token, audio, content_type):
    request = urllib.request.Request(server.base + "/v1/voice/transcriptions", data=audio, method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_recorded_question_becomes_the_users_message_and_is_answered(data_dir, voice_server):
    server = voiced_server(data_dir, voice_server, "--stt-url", voice_server)
    try:
        token = server.token("yuri")
        clone = make_clone(server, token)
        question = "What is the best way to learn to play the piano?"
        _, before = server.http("GET", "/v1/credits", token)

        status, heard = upload(server, token, speak(voice_server, question), "audio/wav")
        assert status == 200, heard
        validate_rest("transcription", heard)
        assert word_error_rate(question, heard["text"]) <= 0.10, heard
        assert 1 < heard["duration"] < 10 and heard["cost"] == math.ceil(math.ceil(heard["duration"]) * 600 / 60), heard
        _, after = server.http("GET", "/v1/credits", token)
        assert after["balance"] == heard["balance"] == before["balance"] - heard["cost"]
        assert any(e["id"] == f"stt:{heard['id']}" and e["feature"] == "voice" for e in after["entries"])

        async def ask():
            async with websockets.connect(f"{server.ws}?token={token}") as ws:
                await next_frame(ws)
                await ws.send(json.dumps({"type": "chat.send", "id": "c1", "clone": clone["id"], "text": heard["text"]}))
                tokens, chunks = [], []
                _, start = await next_frame(ws)
                return start, await read_voiced(ws, tokens, chunks)

        start, end = asyncio.run(ask())
        assert end["reason"] == "complete", end
        status, page = server.http("GET", f"/v1/conversations/{start['conversation']}/messages", token)
        assert [m["text"] for m in page["messages"] if m["role"] == "user"] == [heard["text"]]

        # Not audio, or no audio at all: a clear error, and nothing charged.
        status, error = upload(server, token, b"this is not audio at all" * 40, "audio/webm")
        assert status == 400 and "could not be transcribed" in error["error"]["message"], error
        status, error = upload(server, token, b"{}", "application/json")
        assert status == 415, error
        _, later = server.http("GET", "/v1/credits", token)
        assert later["balance"] == after["balance"] - end["cost"]
    finally:
        server.stop()


def test_voice_messages_are_refused_clearly_without_a_transcription_service(data_dir):
    server = Server(data_dir)
    try:
        status, error = upload(server, server.token("zed"), b"RIFF", "audio/wav")
        assert status == 501 and "transcription" in error["error"]["message"], error
    finally:
        server.stop()


def test_the_local_voice_runs_beside_parley_and_stops_with_it(data_dir):
    """`parley serve --local-voice`: the voice server is started (both models loaded) before
    Parley listens, answers voiced replies and voice messages, and is gone once Parley stops."""
    server = Server(data_dir, "--local-voice", "--sim-ttft-ms", "0", "--sim-tokens-per-sec", "0", "--sim-reply-tokens", "20")
    token = server.token("ann")
    clone = make_clone(server, token)

    async def run():
        async with websockets.connect(f"{server.ws}?token={token}") as ws:
            await next_frame(ws)
            await ws.send(json.dumps({"type": "chat.send", "id": "v1", "clone": clone["id"], "text": "Hi", "voice": True}))
            tokens, chunks = [], []
            return chunks, await read_voiced(ws, tokens, chunks)

    chunks, end = asyncio.run(run())
    assert end["audio"]["reason"] == "complete" and len(chunks) == end["audio"]["chunks"] > 0, end
    assert server.stop() == 0
    started = re.search(r"starting the local voice \(.*--port (\d+)\)", server.proc.stderr.read())
    assert started, "the start is announced with its command"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(started.group(1))), timeout=2).close()
