"""Realtime websocket turns (manual commit and server VAD) against a live server, and the energy VAD on
signals whose speech boundaries are known by construction. Oracle for answers: `KimiAudio.generate`."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from websockets.sync.client import connect

from kimia.api import KimiAudio
from kimia.audio import load_audio
from kimia.server.app import create_app
from kimia.server.live import LiveServer
from kimia.server.settings import ServerSettings
from kimia.server.vad import EnergyVAD
from tests.tiny_model import write_tiny_model

KEY = "rt-key"
STEPS = 14


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return KimiAudio(write_tiny_model(tmp_path_factory.mktemp("rt") / "tiny"), device="cpu")


@pytest.fixture(scope="module")
def live(model):
    settings = ServerSettings(api_key=KEY, default_max_tokens=STEPS, max_audio_seconds=5, warmup=False)
    with LiveServer(create_app(model, settings)) as srv:
        yield srv


def ws(live, key=KEY):
    url = live.url.replace("http", "ws") + "/v1/realtime"
    return connect(url, additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=30, close_timeout=5)


def pcm16(wave: np.ndarray) -> bytes:
    return (np.clip(wave, -1, 1) * 32767).round().astype("<i2").tobytes()


def send(c, type, **fields):
    c.send(json.dumps({"type": type, **fields}))


def until(c, type, limit=400):
    """Events up to and including the first of `type` (bounded)."""
    seen = []
    for _ in range(limit):
        ev = json.loads(c.recv(timeout=120))
        seen.append(ev)
        if ev["type"] == type:
            return seen
    raise AssertionError(f"no {type} in {limit} events")


def expected(model, wave16: np.ndarray, output_type: str):
    return model.generate([{"role": "user", "message_type": "audio", "content": (wave16, 16000)}],
                          output_type=output_type, max_new_tokens=STEPS)


def test_manual_turn_text_and_audio(model, live):
    rate = 24000
    wave = (0.1 * np.random.default_rng(1).standard_normal(rate)).astype(np.float32)
    raw = pcm16(wave)
    wave16 = load_audio(np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0, rate).numpy()
    _, text = expected(model, wave16, "text")
    with ws(live) as c:
        assert json.loads(c.recv(timeout=30))["type"] == "session.created"
        send(c, "session.update", session={"modalities": ["text"]})
        assert until(c, "session.updated")[-1]["session"]["modalities"] == ["text"]
        for k in range(0, len(raw), 9600):  # 200 ms pieces
            send(c, "input_audio_buffer.append", audio=base64.b64encode(raw[k:k + 9600]).decode())
        send(c, "input_audio_buffer.commit")
        assert until(c, "input_audio_buffer.committed")[-1]["item_id"]
        send(c, "response.create")
        events = until(c, "response.done")
        deltas = [e["delta"] for e in events if e["type"] == "response.text.delta"]
        assert "".join(deltas) == text and deltas
        assert events[-1]["response"]["status"] == "completed"
        assert next(e for e in events if e["type"] == "response.text.done")["text"] == text

        # second turn of the same session answers with speech; the session keeps the first turn's items
        send(c, "input_audio_buffer.append", audio=base64.b64encode(raw).decode())
        send(c, "input_audio_buffer.commit")
        send(c, "response.create", response={"modalities": ["text", "audio"]})
        events = until(c, "response.done")
        audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.audio.delta")
        transcript = "".join(e["delta"] for e in events if e["type"] == "response.audio_transcript.delta")
        assert len(audio) > 0 and transcript == next(
            e for e in events if e["type"] == "response.audio_transcript.done")["transcript"]
        assert events[-1]["response"]["status"] == "completed"


def test_server_vad_commits_and_answers(live):
    rate = 16000
    rng = np.random.default_rng(2)
    speech = (0.2 * rng.standard_normal(rate)).astype(np.float32)
    wave = np.concatenate([np.zeros(rate // 2, np.float32), speech, np.zeros(rate, np.float32)])
    with ws(live) as c:
        until(c, "session.created")
        send(c, "session.update", session={"modalities": ["text"], "input_audio_sample_rate": rate,
                                           "turn_detection": {"type": "server_vad", "silence_duration_ms": 400}})
        until(c, "session.updated")
        raw = pcm16(wave)
        for k in range(0, len(raw), 3200):  # 100 ms pieces
            send(c, "input_audio_buffer.append", audio=base64.b64encode(raw[k:k + 3200]).decode())
        events = until(c, "response.done")
        kinds = [e["type"] for e in events]
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_stopped") \
            < kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
        started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")["audio_start_ms"]
        stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")["audio_end_ms"]
        assert abs(started - 500) <= 40 and abs(stopped - 1500) <= 40


def test_bad_events_keep_the_session_alive(live):
    with ws(live) as c:
        until(c, "session.created")
        for bad, code in ((b"{not json", "invalid_json"), (json.dumps({"type": "nope"}), "unknown_event"),
                          (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}), "invalid_base64"),
                          (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
                          (json.dumps({"type": "response.create"}), "conversation_empty"),
                          (json.dumps({"type": "session.update", "session": {"input_audio_format": "g711"}}),
                           "invalid_value")):
            c.send(bad if isinstance(bad, str) else bad.decode())
            ev = until(c, "error")[-1]
            assert ev["error"]["code"] == code and ev["error"]["message"]
        send(c, "input_audio_buffer.append", audio=base64.b64encode(pcm16(np.zeros(2400, np.float32))).decode())
        send(c, "input_audio_buffer.clear")
        until(c, "input_audio_buffer.cleared")


def test_realtime_rejects_a_wrong_key(live):
    with ws(live, key="wrong") as c:
        ev = json.loads(c.recv(timeout=30))
        assert ev["type"] == "error" and ev["error"]["code"] == "invalid_api_key"


def test_energy_vad_finds_known_boundaries():
    rate = 16000
    t = np.arange(rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    wave = np.concatenate([np.zeros(rate // 4), tone, np.zeros(rate), tone[: rate // 2], np.zeros(rate)]).astype(np.float32)
    vad = EnergyVAD(rate, silence_ms=300, start_frames=3)
    events = []
    for k in range(0, len(wave), 1234):  # odd piece size: frames straddle feeds
        events += vad.feed(wave[k:k + 1234])
    want = [("start", 0.25), ("stop", 1.25), ("start", 2.25), ("stop", 2.75)]
    assert [e.kind for e in events] == [k for k, _ in want]
    for e, (_, at) in zip(events, want):  # boundaries within one 20 ms frame
        assert abs(e.sample / rate - at) <= 0.02, (e, at)
    vad.reset()
    assert vad.feed(np.zeros(rate, np.float32)) == [] and not vad.in_speech
