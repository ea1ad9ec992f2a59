"""FastAPI application: OpenAI-compatible routes over `KimiAudio`, realtime websocket, metrics, web page.

Routes: `POST /v1/audio/transcriptions` (multipart), `POST /v1/chat/completions` (JSON; `input_audio` parts;
`modalities` text/audio; `stream` as server-sent events), `GET /v1/models`, `GET /health`, `GET /metrics`,
`WS /v1/realtime` (kimia.server.realtime) and the page at `/`. Every failure answers an OpenAI-style error
body with a 4xx (5xx only for server faults); nothing a client sends can stop the batcher thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from kimia.errors import KimiaError
from kimia.server.batcher import Audio, Batcher, Delta, Done, Failed, Job, QueueFull, Started
from kimia.server.metrics import Metrics
from kimia.server.schemas import APIError, ChatRequest, ModelCard, ModelList, error_body
from kimia.server.settings import ServerSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
OUT_RATE = 24000
ZH_ASR_INSTRUCTION = "请将音频内容转换为文字。"


# ------------------------------------------------------------------------------------------------ helpers
def wav_bytes(pcm: np.ndarray, rate: int = OUT_RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(pcm, -1, 1), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def pcm16_bytes(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1, 1) * 32767).round().astype("<i2").tobytes()


def to_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, KimiaError):
        code = {"AudioError": "invalid_audio", "BudgetError": "context_length_exceeded",
                "PromptError": "invalid_prompt", "ConfigError": "invalid_value"}.get(type(e).__name__)
        return APIError(400, str(e), code=code)
    log.error("internal error: %r", e)
    return APIError(500, f"internal server error ({type(e).__name__})", type="server_error")


def decode_b64(data: str, param: str) -> bytes:
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: not valid base64", code="invalid_base64", param=param) from None


class Server:
    """State shared by the routes: model, settings, batcher, metrics."""

    def __init__(self, model: Any, settings: ServerSettings):
        self.model, self.settings = model, settings
        self.metrics = Metrics()
        self.batcher = Batcher(model, batch_size=settings.batch_size, batch_wait_ms=settings.batch_wait_ms,
                               max_queue=settings.max_queue, metrics=self.metrics)
        self.created = int(time.time())

    # ---------------------------------------------------------------- checks
    def check_auth(self, authorization: str | None) -> None:
        key = self.settings.api_key
        if not key:
            return
        if not authorization:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != key:
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def check_model(self, name: str | None, param: str = "model") -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.settings.model_name!r}", code="model_not_found", param=param)

    def check_request(self, request: Request, content_type: str, limit: int) -> None:
        """Authorization, content type and declared body size of a /v1 request, each a 4xx when wrong."""
        self.check_auth(request.headers.get("authorization"))
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith(content_type):
            raise APIError(415, f"expected {content_type}, got {ctype or 'no content type'!r}",
                           code="unsupported_media_type")
        self.check_length(request, limit)

    def check_length(self, request: Request, limit: int) -> None:
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > limit:
            raise APIError(413, f"request body of {int(n)} bytes exceeds the limit of {limit} bytes",
                           code="request_too_large")

    def max_tokens(self, asked: int | None) -> int:
        lim = self.settings.max_tokens_limit
        if asked is not None and lim is not None and asked > lim:
            raise APIError(400, f"max_tokens {asked} exceeds this server's limit of {lim}", code="invalid_value",
                           param="max_tokens")
        n = asked if asked is not None else self.settings.default_max_tokens
        return -1 if n is None else int(n)

    async def load_audio(self, raw: bytes, name: str, param: str) -> tuple[np.ndarray, int]:
        from kimia.audio import load_audio

        if len(raw) > self.settings.max_upload_bytes:
            raise APIError(413, f"{param}: {len(raw)} bytes of audio exceed the limit of "
                           f"{self.settings.max_upload_bytes} bytes", code="file_too_large", param=param)
        try:
            wave = await run_in_threadpool(load_audio, raw, max_seconds=self.settings.max_audio_seconds, name=name)
        except KimiaError as e:
            raise APIError(400, str(e), code="invalid_audio", param=param) from None
        return wave.numpy(), 16000

    # ---------------------------------------------------------------- running jobs
    async def events(self, job: Job) -> AsyncIterator[Any]:
        """Submit `job` and yield its events; raises APIError for a full queue, failure or timeout.
        The first event yielded is `Started` (so callers can still answer a 4xx before streaming)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        job.sink = lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", type="rate_limit_exceeded",
                           code="queue_full") from None
        deadline = job.arrived + self.settings.request_timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise APIError(504, f"request timed out after {self.settings.request_timeout_s:g} s",
                                   type="timeout", code="timeout")
                try:
                    ev = await asyncio.wait_for(q.get(), left)
                except asyncio.TimeoutError:
                    continue
                if isinstance(ev, Failed):
                    raise to_api_error(ev.error)
                yield ev
                if isinstance(ev, Done):
                    return
        finally:
            job.cancelled.set()  # no effect once done; stops decoding for a client that went away

    async def complete(self, job: Job) -> Done:
        async for ev in self.events(job):
            if isinstance(ev, Done):
                return ev
        raise APIError(500, "generation ended without an answer", type="server_error")

    def warmup(self) -> None:
        """One short generation through the batcher path (text, and speech when a detokenizer is loaded)."""
        wave = (0.05 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
        msgs = [{"role": "user", "message_type": "audio", "content": (wave, 16000)}]
        out = "both" if getattr(self.model, "detokenizer", None) is not None else "text"
        t = time.monotonic()
        self.batcher.run([Job(msgs, output_type=out, max_new_tokens=8)])
        log.info("warm-up done in %.2f s", time.monotonic() - t)


def _chat_messages(server: Server, req: ChatRequest) -> list[tuple[str, str, Any]]:
    """(role, kind, payload) per content piece; audio payloads are still bytes (decoded by the caller)."""
    out = []
    for i, m in enumerate(req.messages):
        role = "assistant" if m.role == "assistant" else "user"  # Kimi-Audio has no system turn
        parts = [m.content] if isinstance(m.content, str) else (m.content or [])
        for j, p in enumerate(parts):
            param = f"messages[{i}].content" + ("" if isinstance(m.content, str) else f"[{j}]")
            if isinstance(p, str):
                if p:
                    out.append((role, "text", p))
            elif p.type in ("text", "input_text"):
                if p.text is None:
                    raise APIError(400, f"{param}: a text part needs 'text'", param=param)
                out.append((role, "text", p.text))
            else:
                if p.input_audio is None:
                    raise APIError(400, f"{param}: an input_audio part needs 'input_audio'", param=param)
                out.append((role, "audio", (decode_b64(p.input_audio.data, param + ".input_audio.data"),
                                             f"{param}.input_audio")))
        if not parts and m.role == "assistant" and m.audio is None:
            raise APIError(400, f"messages[{i}]: empty assistant message", param=f"messages[{i}]")
    if not out:
        raise APIError(400, "messages carry no text or audio", param="messages")
    return out


def create_app(model_or_path: Any, settings: ServerSettings | None = None, **model_kwargs: Any) -> FastAPI:
    """The FastAPI app over a `KimiAudio` (or a model folder path, loaded with `model_kwargs`)."""
    settings = settings or ServerSettings()
    if isinstance(model_or_path, (str, os.PathLike)):
        from kimia.api import KimiAudio

        model = KimiAudio(model_or_path, **model_kwargs)
    else:
        model = model_or_path
    server = Server(model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.warmup:
            await run_in_threadpool(server.warmup)
        server.batcher.start()
        try:
            yield
        finally:
            server.batcher.stop()

    app = FastAPI(title="kimia", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return JSONResponse(error_body(f"invalid request: {e.errors()[:3]}"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        err = to_api_error(e)
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        server.metrics.inc("kimia_requests_total", route=getattr(route, "path", "unmatched"),
                           status=str(response.status_code))
        return response

    # ------------------------------------------------------------------ plain routes
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        ok = server.batcher.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": settings.model_name,
                             "queue_depth": server.batcher.depth, "busy": server.batcher.busy},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request.headers.get("authorization"))
        return ModelList(data=[ModelCard(id=settings.model_name, created=server.created)]).model_dump()

    # ------------------------------------------------------------------ transcriptions
    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        t0 = time.monotonic()
        server.check_request(request, "multipart/form-data", settings.max_upload_bytes + 64 * 1024)
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as e:
            raise APIError(400, f"malformed multipart body: {e}", code="invalid_body") from None
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise APIError(400, "missing 'file' (the audio upload)", param="file")
        server.check_model(form.get("model"))
        fmt = form.get("response_format") or "json"
        if fmt not in ("json", "text", "verbose_json"):
            raise APIError(400, f"response_format {fmt!r} is not supported (json, text, verbose_json)",
                           param="response_format", code="invalid_value")
        sampling = {}
        if form.get("temperature") not in (None, ""):
            try:
                sampling["text_temperature"] = float(form.get("temperature"))
            except ValueError:
                raise APIError(400, "temperature must be a number", param="temperature") from None
        raw = await file.read(settings.max_upload_bytes + 1)
        wave, sr = await server.load_audio(raw, file.filename or "upload", "file")
        language = str(form.get("language") or "")
        instruction = ZH_ASR_INSTRUCTION if language.startswith("zh") else _asr_instruction()
        msgs = [{"role": "user", "message_type": "text", "content": instruction},
                {"role": "user", "message_type": "audio", "content": (wave, sr)}]
        done = await server.complete(Job(msgs, "text", sampling, server.max_tokens(None)))
        server.metrics.observe("kimia_request_latency_seconds", time.monotonic() - t0, route="transcriptions")
        text = done.text.strip()
        if fmt == "text":
            return PlainTextResponse(text)
        if fmt == "verbose_json":
            return {"task": "transcribe", "language": language or "unknown", "duration": len(wave) / sr,
                    "text": text, "segments": []}
        return {"text": text}

    # ------------------------------------------------------------------ chat completions
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.monotonic()
        server.check_request(request, "application/json", settings.max_upload_bytes * 4 // 3 + 1024 * 1024)
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"could not parse the JSON body: {e}", code="invalid_json") from None
        try:
            req = ChatRequest.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise APIError(400, f"{loc}: {err['msg']}", param=loc, code="invalid_value") from None
        server.check_model(req.model)
        speak = "audio" in req.modalities
        if speak and getattr(server.model, "detokenizer", None) is None:
            raise APIError(400, "this server was started without a detokenizer: audio output is unavailable",
                           param="modalities", code="invalid_value")
        fmt = (req.audio.format if req.audio else "wav")
        msgs = []
        for role, kind, payload in _chat_messages(server, req):
            if kind == "audio":
                raw_audio, param = payload
                wave, sr = await server.load_audio(raw_audio, param, param)
                msgs.append({"role": role, "message_type": "audio", "content": (wave, sr)})
            else:
                msgs.append({"role": role, "message_type": "text", "content": payload})
        job = Job(msgs, "both" if speak else "text", req.sampling(),
                  server.max_tokens(req.max_completion_tokens or req.max_tokens), req.seed)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        events = server.events(job)
        first = await anext(events)  # Started, or an APIError before any byte is sent
        assert isinstance(first, Started)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_sse(server, events, cid, created, req.model, usage, t0),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        done = None
        async for ev in events:
            if isinstance(ev, Done):
                done = ev
        server.metrics.observe("kimia_request_latency_seconds", time.monotonic() - t0, route="chat")
        message: dict[str, Any] = {"role": "assistant", "content": done.text}
        if speak:
            pcm = done.wav if done.wav is not None else np.zeros(0, np.float32)
            data_out = wav_bytes(pcm) if fmt == "wav" else pcm16_bytes(pcm)
            message = {"role": "assistant", "content": None, "audio": {
                "id": f"audio_{uuid.uuid4().hex[:24]}", "data": base64.b64encode(data_out).decode(),
                "expires_at": created + 3600, "transcript": done.text}}
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": message, "finish_reason": done.finish_reason}],
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                          "total_tokens": done.prompt_tokens + done.completion_tokens}}

    from kimia.server.realtime import add_realtime_route

    add_realtime_route(app, server)
    return app


def _asr_instruction() -> str:
    from kimia.api import ASR_INSTRUCTION

    return ASR_INSTRUCTION


async def _sse(server: Server, events: AsyncIterator[Any], cid: str, created: int, model: str, usage: bool,
               t0: float) -> AsyncIterator[bytes]:
    """Chat-completion chunks: text as `delta.content`, audio as `delta.audio.data` (base64 PCM16, 24 kHz)."""
    audio_id = f"audio_{uuid.uuid4().hex[:24]}"

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n".encode()

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for ev in events:
            if isinstance(ev, Delta):
                yield chunk({"content": ev.text})
            elif isinstance(ev, Audio):
                yield chunk({"audio": {"id": audio_id, "data": base64.b64encode(pcm16_bytes(ev.pcm)).decode()}})
            elif isinstance(ev, Done):
                yield chunk({}, ev.finish_reason)
                if usage:
                    u = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                         "total_tokens": ev.prompt_tokens + ev.completion_tokens}
                    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": u}
                    yield f"data: {json.dumps(body)}\n\n".encode()
        server.metrics.observe("kimia_request_latency_seconds", time.monotonic() - t0, route="chat_stream")
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n".encode()
    yield b"data: [DONE]\n\n"
