"""The HTTP server against a live uvicorn on 127.0.0.1 with a tiny random model, through the official
`openai` client. Oracle: `KimiAudio.generate` on the same model instance (greedy; seeded for audio)."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from kimia.api import ASR_INSTRUCTION, KimiAudio
from kimia.audio import load_audio
from kimia.server.app import create_app
from kimia.server.live import LiveServer
from kimia.server.metrics import parse_metrics
from kimia.server.settings import ServerSettings
from tests.tiny_model import write_tiny_model

KEY = "test-key"
MODEL = "kimi-audio"
STEPS = 10


def clip(seed: int = 0, seconds: float = 1.0, rate: int = 16000) -> bytes:
    wave = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def audio_part(raw: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(raw), "format": "wav"}}


def audio_msg(raw: bytes) -> dict:
    return {"role": "user", "message_type": "audio", "content": (load_audio(raw).numpy(), 16000)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return KimiAudio(write_tiny_model(tmp_path_factory.mktemp("srv") / "tiny"), device="cpu")


@pytest.fixture(scope="module")
def live(model):
    settings = ServerSettings(api_key=KEY, model_name=MODEL, default_max_tokens=STEPS, max_audio_seconds=5,
                              max_upload_bytes=400_000, batch_size=8, batch_wait_ms=80, warmup=True)
    with LiveServer(create_app(model, settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def batch_counts(url: str) -> tuple[float, float]:
    m = parse_metrics(httpx.get(url + "/metrics").text)
    return m.get("kimia_batch_size_count", 0.0), m.get('kimia_batch_size_bucket{le="1"}', 0.0)


# ------------------------------------------------------------------------------------------- happy paths
def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = httpx.get(live.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "kimia" in page.text and httpx.get(live.url + "/static/app.js").status_code == 200


def test_transcription_matches_the_api(model, client):
    raw = clip(1)
    msgs = [{"role": "user", "message_type": "text", "content": ASR_INSTRUCTION}, audio_msg(raw)]
    _, expected = model.generate(msgs, output_type="text", max_new_tokens=STEPS)
    r = client.audio.transcriptions.create(model=MODEL, file=("q.wav", raw))
    assert r.text == expected.strip()
    v = client.audio.transcriptions.create(model=MODEL, file=("q.wav", raw), response_format="verbose_json")
    assert v.text == expected.strip() and abs(v.duration - 1.0) < 1e-3
    t = client.audio.transcriptions.create(model=MODEL, file=("q.wav", raw), response_format="text")
    assert t.strip() == expected.strip()


def test_chat_with_audio_out(model, client):
    raw = clip(2)
    wav, text = model.generate([audio_msg(raw)], output_type="both", max_new_tokens=14, seed=5)
    r = client.chat.completions.create(
        model=MODEL, modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}, max_tokens=14, seed=5,
        messages=[{"role": "user", "content": [audio_part(raw)]}])
    audio = r.choices[0].message.audio
    assert audio.transcript == text
    pcm, rate = sf.read(io.BytesIO(base64.b64decode(audio.data)), dtype="float32")
    assert rate == 24000 and pcm.ndim == 1
    expected = np.clip(wav.reshape(-1).numpy(), -1, 1)
    assert pcm.shape == expected.shape and expected.size > 0
    np.testing.assert_allclose(pcm, expected, atol=1.5 / 32767)
    assert r.usage.completion_tokens == 14 and r.choices[0].finish_reason == "length"


def test_chat_text_with_text_and_audio_parts(model, client):
    raw = clip(3)
    _, text = model.generate([{"role": "user", "message_type": "text", "content": "Answer briefly."}, audio_msg(raw)],
                             output_type="text", max_new_tokens=STEPS)
    r = client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Answer briefly."}, audio_part(raw)]}])
    assert r.choices[0].message.content == text


def test_streaming_sse_text_and_audio(model, client):
    raw = clip(4)
    wav, text = model.generate([audio_msg(raw)], output_type="both", max_new_tokens=14, seed=9)
    stream = client.chat.completions.create(
        model=MODEL, stream=True, modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"},
        max_tokens=14, seed=9, messages=[{"role": "user", "content": [audio_part(raw)]}],
        stream_options={"include_usage": True})
    deltas, pcm, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        if d.content:
            deltas.append(d.content)
        if getattr(d, "audio", None):
            pcm.append(np.frombuffer(base64.b64decode(d.audio["data"] if isinstance(d.audio, dict)
                                                      else d.audio.data), dtype="<i2"))
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(deltas) == text and len(deltas) > 1
    got = np.concatenate(pcm).astype(np.float32) / 32767
    expected = np.clip(wav.reshape(-1).numpy(), -1, 1)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1.5 / 32767)
    assert finish == "length" and usage.completion_tokens == 14


# ------------------------------------------------------------------------------------------- concurrency
def _concurrent(fn, n: int) -> list:
    barrier, out = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_simultaneous_requests_decode_as_one_batch(model, live, client):
    clips = [clip(10 + i) for i in range(4)]
    expected = [model.generate([audio_msg(c)], output_type="text", max_new_tokens=STEPS)[1] for c in clips]
    count0, singles0 = batch_counts(live.url)
    answers = _concurrent(lambda i: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [audio_part(clips[i])]}]).choices[0].message.content, 4)
    assert answers == expected  # batched greedy answers equal the single runs
    count1, singles1 = batch_counts(live.url)
    batches, single_batches = count1 - count0, singles1 - singles0
    assert batches < 4 and batches - single_batches >= 1, (batches, single_batches)


def test_queue_limit_returns_429(model):
    settings = ServerSettings(model_name=MODEL, max_queue=1, batch_size=1, batch_wait_ms=0, warmup=False)
    raw = clip(20)
    body = {"model": MODEL, "max_tokens": 40, "messages": [{"role": "user", "content": [audio_part(raw)]}]}
    with LiveServer(create_app(model, settings)) as srv:
        res = _concurrent(lambda i: httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120), 6)
        codes = sorted(r.status_code for r in res)
        assert 200 in codes and 429 in codes, codes
        busy = next(r for r in res if r.status_code == 429).json()["error"]
        assert busy["type"] == "rate_limit_exceeded" and busy["message"]
        assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120).status_code == 200


# ------------------------------------------------------------------------------------------- bad input
def _post_chat(url, body=None, *, content=None, headers=None, key=KEY):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    if content is not None:
        return httpx.post(url + "/v1/chat/completions", content=content, headers=h, timeout=60)
    return httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=60)


def _post_asr(url, raw, *, model=MODEL, key=KEY):
    return httpx.post(url + "/v1/audio/transcriptions", files={"file": ("a.wav", raw, "audio/wav")},
                      data={"model": model}, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _chat_body(part=None, **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": [part or audio_part(clip(0))]}], **kw}


BAD = {
    "malformed_json": (lambda u: _post_chat(u, content=b'{"model": "kimi-audio", "messages": [',
                                            headers={"Content-Type": "application/json"}), 400, "invalid_json"),
    "json_not_object_schema": (lambda u: _post_chat(u, {"model": MODEL, "messages": "hello"}), 400, None),
    "wrong_content_type_chat": (lambda u: _post_chat(u, content=b"hello", headers={"Content-Type": "text/plain"}),
                                415, "unsupported_media_type"),
    "wrong_content_type_asr": (lambda u: httpx.post(u + "/v1/audio/transcriptions", json={"model": MODEL},
                                                    headers={"Authorization": f"Bearer {KEY}"}), 415, None),
    "corrupt_audio_chat": (lambda u: _post_chat(u, _chat_body({"type": "input_audio", "input_audio": {
        "data": b64(b"RIFF" + bytes(range(256)) * 8), "format": "wav"}})), 400, "invalid_audio"),
    "corrupt_audio_upload": (lambda u: _post_asr(u, b"\x00\x01garbage" * 100), 400, "invalid_audio"),
    "oversized_upload": (lambda u: _post_asr(u, clip(0, seconds=16)), 413, None),
    "too_long_audio": (lambda u: _post_asr(u, clip(0, seconds=6)), 400, "invalid_audio"),
    "missing_api_key": (lambda u: _post_chat(u, _chat_body(), key=None), 401, "invalid_api_key"),
    "invalid_api_key": (lambda u: _post_chat(u, _chat_body(), key="wrong"), 401, "invalid_api_key"),
    "unknown_model_chat": (lambda u: _post_chat(u, {**_chat_body(), "model": "gpt-9"}), 404, "model_not_found"),
    "unknown_model_asr": (lambda u: _post_asr(u, clip(0), model="whisper-9"), 404, "model_not_found"),
    "bad_base64": (lambda u: _post_chat(u, _chat_body({"type": "input_audio", "input_audio": {
        "data": "%%%not-base64%%%", "format": "wav"}})), 400, "invalid_base64"),
    "missing_file": (lambda u: httpx.post(u + "/v1/audio/transcriptions", data={"model": MODEL}, files={
        "other": ("x", b"1")}, headers={"Authorization": f"Bearer {KEY}"}), 400, None),
    "max_tokens_zero": (lambda u: _post_chat(u, _chat_body(max_tokens=0)), 400, None),
    "unknown_route": (lambda u: httpx.get(u + "/v1/nothing-here"), 404, None),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_openai_error(live, case):
    call, status, code = BAD[case]
    r = call(live.url)
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and "type" in err and "param" in err
    if code is not None:
        assert err["code"] == code, err


def test_openai_client_raises_typed_errors(live):
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_still_healthy_and_correct_after_bad_input(model, live, client):
    for case in ("malformed_json", "corrupt_audio_upload", "bad_base64"):
        BAD[case][0](live.url)
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    raw = clip(30)
    _, expected = model.generate([audio_msg(raw)], output_type="text", max_new_tokens=STEPS)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [audio_part(raw)]}])
    assert r.choices[0].message.content == expected
    m = parse_metrics(httpx.get(live.url + "/metrics").text)
    assert any(k.startswith("kimia_requests_total") and 'status="400"' in k for k in m)
    assert m["kimia_time_to_first_audio_seconds_count"] >= 2
