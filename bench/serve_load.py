"""Bounded loopback load test of `kimia serve`: C concurrent clients send N chat requests in total.

Starts the server in-process on 127.0.0.1 (a free port) over a model folder (default: a tiny random model
written to a temporary folder), fires the requests from C client threads, and prints throughput, p50/p95
latency, the engine's batch sizes (from /metrics) and 429 counts. Afterwards it checks the server is still
healthy and that a fresh request answers exactly as `KimiAudio.generate`. Prints figures, asserts no timings.

    python -m bench.serve_load --clients 16 --requests 64 --max-tokens 12 [--model DIR] [--audio]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf



def clip(seed: int) -> bytes:
    wave = (0.1 * np.random.default_rng(seed).standard_normal(16000)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: a tiny random model)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--audio", action="store_true", help="ask for text + speech answers")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from kimia.api import KimiAudio
    from kimia.audio import load_audio
    from kimia.server.app import create_app
    from kimia.server.live import LiveServer
    from kimia.server.metrics import parse_metrics
    from kimia.server.settings import ServerSettings

    tmp = tempfile.TemporaryDirectory()
    folder = args.model
    if folder is None:
        from tests.tiny_model import write_tiny_model

        folder = write_tiny_model(Path(tmp.name) / "tiny")
    model = KimiAudio(folder, device=args.device)
    settings = ServerSettings(batch_size=args.batch_size, max_queue=args.max_queue, batch_wait_ms=5)
    clips = [clip(i) for i in range(8)]
    modalities = ["text", "audio"] if args.audio else ["text"]
    lat: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    counter = iter(range(args.requests))

    def client(url: str) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"model": settings.model_name, "max_tokens": args.max_tokens, "modalities": modalities,
                        "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
                            "data": base64.b64encode(clips[i % len(clips)]).decode(), "format": "wav"}}]}]}
                t = time.perf_counter()
                r = c.post("/v1/chat/completions", json=body)
                dt = time.perf_counter() - t
                with lock:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        lat.append(dt)

    with LiveServer(create_app(model, settings)) as srv:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(srv.url,)) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(3600)
        wall = time.perf_counter() - t0
        m = parse_metrics(httpx.get(srv.url + "/metrics").text)
        health = httpx.get(srv.url + "/health").json()
        msgs = [{"role": "user", "message_type": "audio", "content": (load_audio(clips[0]).numpy(), 16000)}]
        _, expected = model.generate(msgs, output_type="text", max_new_tokens=args.max_tokens)
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=600, json={
            "model": settings.model_name, "max_tokens": args.max_tokens, "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(clips[0]).decode()}}]}]})
        correct = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected

    ok = codes.get(200, 0)
    q = sorted(lat)
    p = (lambda f: q[min(len(q) - 1, int(round(f * (len(q) - 1))))] if q else float("nan"))
    batches = m.get("kimia_batch_size_count", 0)
    print(f"clients {args.clients}  requests {args.requests}  max_tokens {args.max_tokens}  modalities {modalities}")
    print(f"status codes {dict(sorted(codes.items()))}")
    print(f"wall {wall:.2f} s  throughput {ok / wall:.2f} req/s  ({ok * args.max_tokens / wall:.1f} steps/s)")
    print(f"latency p50 {p(0.5):.3f} s  p95 {p(0.95):.3f} s  mean {statistics.fmean(q) if q else float('nan'):.3f} s")
    print(f"engine batches {batches:g}  mean batch size {m.get('kimia_batch_size_sum', 0) / max(batches, 1):.2f}")
    print(f"after the load: health {health['status']}, fresh answer equals KimiAudio.generate: {correct}")
    tmp.cleanup()
    return 0 if health["status"] == "ok" and correct else 1


if __name__ == "__main__":
    raise SystemExit(main())
