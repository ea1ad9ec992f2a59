"""Realtime websocket `/v1/realtime`: stream PCM in, get text deltas and audio chunks out while decoding.

Event names follow OpenAI's realtime protocol. Client -> server: `session.update`, `input_audio_buffer.append`
(base64 PCM16 mono, little-endian, at the session's `input_audio_sample_rate`, 24 kHz by default as OpenAI's
pcm16), `input_audio_buffer.commit`, `input_audio_buffer.clear`, `conversation.item.create` (input_text /
input_audio parts), `response.create`, `response.cancel`. Server -> client: `session.created/updated`,
`input_audio_buffer.committed/cleared/speech_started/speech_stopped`, `conversation.item.created`,
`response.created`, `response.text.delta` (text-only answers) or `response.audio_transcript.delta` +
`response.audio.delta` (base64 PCM16 at 24 kHz), their `.done` events, `response.done`, and `error` (the
connection stays open after a bad event). With `turn_detection: {"type": "server_vad"}` the energy VAD
(kimia.server.vad) commits the turn and starts the answer by itself when the speaker stops.

Answers go through the same batcher as the HTTP routes, so realtime turns batch with other requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from kimia.server.batcher import Audio, Delta, Done, Job
from kimia.server.schemas import APIError
from kimia.server.vad import EnergyVAD

log = logging.getLogger(__name__)

OUT_RATE = 24000


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RealtimeSession:
    """One websocket connection: settings, input buffer, conversation items, the running response."""

    def __init__(self, ws: WebSocket, server: Any):
        self.ws, self.server, self.settings = ws, server, server.settings
        self.id = _id("sess")
        self.config: dict[str, Any] = {
            "modalities": ["text", "audio"], "input_audio_format": "pcm16", "output_audio_format": "pcm16",
            "input_audio_sample_rate": 24000, "output_audio_sample_rate": OUT_RATE, "turn_detection": None,
            "max_response_output_tokens": "inf", "temperature": None, "model": self.settings.model_name}
        self.buffer = bytearray()
        self.items: list[dict[str, Any]] = []  # {"id", "role", "kind", "content"}
        self.vad: EnergyVAD | None = None
        self.vad_base = 0  # buffer sample index where the VAD's sample 0 lies
        self.response: asyncio.Task | None = None
        self.job: Job | None = None
        self._send_lock = asyncio.Lock()

    # ------------------------------------------------------------------ plumbing
    async def send(self, type: str, **fields: Any) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps({"type": type, "event_id": _id("event"), **fields}))

    async def error(self, message: str, code: str | None = None, event_id: str | None = None,
                    type: str = "invalid_request_error") -> None:
        await self.send("error", error={"type": type, "code": code, "message": message, "param": None,
                                        "event_id": event_id})

    def _session(self) -> dict[str, Any]:
        return {"id": self.id, "object": "realtime.session", **self.config}

    @property
    def rate(self) -> int:
        return int(self.config["input_audio_sample_rate"])

    # ------------------------------------------------------------------ events
    async def handle(self, ev: dict[str, Any]) -> None:
        kind, eid = ev.get("type"), ev.get("event_id")
        handler = {
            "session.update": self.session_update, "input_audio_buffer.append": self.append,
            "input_audio_buffer.commit": self.commit, "input_audio_buffer.clear": self.clear,
            "conversation.item.create": self.item_create, "response.create": self.response_create,
            "response.cancel": self.response_cancel,
        }.get(kind)
        if handler is None:
            await self.error(f"unknown event type {kind!r}", "unknown_event", eid)
            return
        try:
            await handler(ev)
        except APIError as e:
            await self.error(e.message, e.code, eid)

    async def session_update(self, ev: dict[str, Any]) -> None:
        s = ev.get("session")
        if not isinstance(s, dict):
            raise APIError(400, "session.update needs a 'session' object", code="invalid_value")
        new = dict(self.config)
        for k, v in s.items():
            if k == "modalities":
                if not isinstance(v, list) or not v or any(m not in ("text", "audio") for m in v):
                    raise APIError(400, f"modalities must be a non-empty list of 'text'/'audio', got {v!r}")
                if "audio" in v and getattr(self.server.model, "detokenizer", None) is None:
                    raise APIError(400, "audio output is unavailable (no detokenizer loaded)")
            elif k in ("input_audio_format", "output_audio_format") and v != "pcm16":
                raise APIError(400, f"{k} {v!r} is not supported (pcm16 only)", code="invalid_value")
            elif k == "input_audio_sample_rate" and (not isinstance(v, int) or not 8000 <= v <= 48000):
                raise APIError(400, f"input_audio_sample_rate must be an int in [8000, 48000], got {v!r}")
            elif k == "turn_detection" and v is not None and (not isinstance(v, dict) or v.get("type") != "server_vad"):
                raise APIError(400, "turn_detection must be null or {'type': 'server_vad', ...}")
            elif k == "max_response_output_tokens" and v != "inf" and (not isinstance(v, int) or v < 1):
                raise APIError(400, "max_response_output_tokens must be a positive int or 'inf'")
            new[k] = v
        self.config = new
        td = self.config["turn_detection"]
        self.vad = None if td is None else EnergyVAD(
            self.rate, threshold_db=float(td.get("threshold_db", self.settings.vad_threshold_db)),
            silence_ms=int(td.get("silence_duration_ms", self.settings.vad_silence_ms)),
            prefix_ms=int(td.get("prefix_padding_ms", self.settings.vad_prefix_ms)))
        self.vad_base = len(self.buffer) // 2
        await self.send("session.updated", session=self._session())

    async def append(self, ev: dict[str, Any]) -> None:
        data = ev.get("audio")
        if not isinstance(data, str):
            raise APIError(400, "input_audio_buffer.append needs 'audio' (base64 PCM16)", code="invalid_value")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "audio is not valid base64", code="invalid_base64") from None
        if len(raw) % 2:
            raise APIError(400, "PCM16 audio must have an even number of bytes", code="invalid_audio")
        limit = int(self.settings.max_audio_seconds * self.rate) * 2
        if len(self.buffer) + len(raw) > limit:
            raise APIError(400, f"input audio buffer would exceed {self.settings.max_audio_seconds:g} s",
                           code="input_audio_buffer_too_long")
        self.buffer.extend(raw)
        if self.vad is not None:
            pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
            for v in self.vad.feed(pcm):
                at = self.vad_base + v.sample
                if v.kind == "start":
                    await self.send("input_audio_buffer.speech_started", audio_start_ms=at * 1000 // self.rate,
                                    item_id=None)
                else:
                    await self.send("input_audio_buffer.speech_stopped", audio_end_ms=at * 1000 // self.rate,
                                    item_id=None)
                    begin = max(0, self.vad_base + (self.vad.speech_start or 0) - self.vad.prefix)
                    keep = bytes(self.buffer[2 * at:])
                    del self.buffer[2 * at:]
                    del self.buffer[: 2 * begin]
                    await self.commit({})
                    self.buffer.extend(keep)
                    self.vad.reset()
                    self.vad_base = len(self.buffer) // 2  # the kept tail is not re-analysed
                    await self.response_create({})
                    break

    async def commit(self, ev: dict[str, Any]) -> None:
        if len(self.buffer) < 2 * self.rate // 10:
            raise APIError(400, f"input audio buffer holds {len(self.buffer) // 2} samples; at least 100 ms are "
                           "needed to commit", code="input_audio_buffer_commit_empty")
        from kimia.audio import load_audio

        pcm = np.frombuffer(bytes(self.buffer), dtype="<i2").astype(np.float32) / 32768.0
        self.buffer.clear()
        try:
            wave = await asyncio.to_thread(load_audio, pcm, self.rate, max_seconds=self.settings.max_audio_seconds,
                                           name="input_audio_buffer")
        except Exception as e:
            raise APIError(400, str(e), code="invalid_audio") from None
        item = self._add({"role": "user", "kind": "audio", "content": wave.numpy()})
        await self.send("input_audio_buffer.committed", item_id=item["id"], previous_item_id=None)
        await self._item_created(item)

    async def clear(self, ev: dict[str, Any]) -> None:
        self.buffer.clear()
        if self.vad is not None:
            self.vad.reset()
            self.vad_base = 0
        await self.send("input_audio_buffer.cleared")

    def _add(self, item: dict[str, Any]) -> dict[str, Any]:
        item["id"] = _id("item")
        self.items.append(item)
        del self.items[: max(0, len(self.items) - self.settings.realtime_max_items)]
        return item

    async def _item_created(self, item: dict[str, Any]) -> None:
        part = ({"type": "input_audio", "transcript": None} if item["kind"] == "audio"
                else {"type": "input_text" if item["role"] == "user" else "text", "text": item["content"]})
        await self.send("conversation.item.created", previous_item_id=None, item={
            "id": item["id"], "object": "realtime.item", "type": "message", "role": item["role"],
            "status": "completed", "content": [part]})

    async def item_create(self, ev: dict[str, Any]) -> None:
        item = ev.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise APIError(400, "conversation.item.create needs an item of type 'message'")
        role = item.get("role")
        if role not in ("user", "assistant", "system"):
            raise APIError(400, f"unknown role {role!r}")
        for part in item.get("content") or []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "text"):
                new = self._add({"role": "assistant" if role == "assistant" else "user", "kind": "text",
                                 "content": str(part.get("text", ""))})
            elif kind == "input_audio":
                try:
                    raw = base64.b64decode(part.get("audio", ""), validate=True)
                except (binascii.Error, ValueError, TypeError):
                    raise APIError(400, "input_audio.audio is not valid base64", code="invalid_base64") from None
                self.buffer.extend(raw[: len(raw) // 2 * 2])
                await self.commit({})
                continue
            else:
                raise APIError(400, f"unsupported content part type {kind!r}")
            await self._item_created(new)

    async def response_cancel(self, ev: dict[str, Any]) -> None:
        if self.job is not None:
            self.job.cancelled.set()
        if self.response is not None:
            self.response.cancel()

    async def response_create(self, ev: dict[str, Any]) -> None:
        if self.response is not None and not self.response.done():
            raise APIError(400, "a response is already in progress", code="conversation_already_has_active_response")
        if not self.items:
            raise APIError(400, "the conversation is empty: commit audio or create an item first",
                           code="conversation_empty")
        opts = ev.get("response") if isinstance(ev.get("response"), dict) else {}
        modalities = opts.get("modalities", self.config["modalities"])
        limit = opts.get("max_response_output_tokens", self.config["max_response_output_tokens"])
        self.response = asyncio.create_task(self._respond(list(modalities), limit))

    async def _respond(self, modalities: list[str], limit: Any) -> None:
        speak = "audio" in modalities
        rid, item_id = _id("resp"), _id("item")
        msgs = [{"role": it["role"], "message_type": it["kind"],
                 "content": (it["content"], 16000) if it["kind"] == "audio" else it["content"]} for it in self.items]
        steps = self.server.max_tokens(None if limit == "inf" else int(limit))
        temp = self.config.get("temperature")
        job = self.job = Job(msgs, "both" if speak else "text", {} if temp is None else {"text_temperature": temp},
                             steps)
        await self.send("response.created", response={"id": rid, "object": "realtime.response",
                                                      "status": "in_progress", "output": []})
        await self.send("response.output_item.added", response_id=rid, output_index=0, item={
            "id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": "in_progress",
            "content": []})
        where = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        text_ev = "response.audio_transcript" if speak else "response.text"
        t0, status, done = time.monotonic(), "completed", None
        try:
            async for e in self.server.events(job):
                if isinstance(e, Delta):
                    await self.send(f"{text_ev}.delta", delta=e.text, **where)
                elif isinstance(e, Audio):
                    pcm16 = (np.clip(e.pcm, -1, 1) * 32767).round().astype("<i2").tobytes()
                    await self.send("response.audio.delta", delta=base64.b64encode(pcm16).decode(), **where)
                elif isinstance(e, Done):
                    done = e
        except APIError as e:
            status = "failed"
            await self.error(e.message, e.code, type=e.type)
        except asyncio.CancelledError:
            status = "cancelled"
        text = done.text if done else ""
        if done is not None:
            if speak:
                await self.send("response.audio.done", **where)
            await self.send(f"{text_ev}.done", **where, **({"transcript": text} if speak else {"text": text}))
            self._add({"role": "assistant", "kind": "text", "content": text})
        content = [{"type": "audio" if speak else "text", **({"transcript": text} if speak else {"text": text})}]
        await self.send("response.output_item.done", response_id=rid, output_index=0, item={
            "id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
            "content": content})
        usage = None if done is None else {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens,
                                           "total_tokens": done.prompt_tokens + done.completion_tokens}
        await self.send("response.done", response={"id": rid, "object": "realtime.response", "status": status,
                                                   "output": [{"id": item_id, "type": "message", "role": "assistant",
                                                               "content": content}], "usage": usage})
        self.server.metrics.observe("kimia_request_latency_seconds", time.monotonic() - t0, route="realtime")


def _ws_key(ws: WebSocket) -> tuple[str | None, str | None]:
    """(Authorization header value, accepted subprotocol) from header, subprotocol or ?api_key=."""
    if ws.headers.get("authorization"):
        return ws.headers["authorization"], None
    for proto in ws.scope.get("subprotocols", []):
        if proto.startswith("openai-insecure-api-key."):
            return "Bearer " + proto.split(".", 1)[1], proto
    if ws.query_params.get("api_key"):
        return "Bearer " + ws.query_params["api_key"], None
    return None, None


def add_realtime_route(app: FastAPI, server: Any) -> None:
    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        auth, proto = _ws_key(ws)
        await ws.accept(subprotocol=proto or ("realtime" if "realtime" in ws.scope.get("subprotocols", []) else None))
        session = RealtimeSession(ws, server)
        try:
            server.check_auth(auth)
            model = ws.query_params.get("model")
            if model is not None:
                server.check_model(model)
        except APIError as e:
            await session.error(e.message, e.code)
            server.metrics.inc("kimia_requests_total", route="/v1/realtime", status=str(e.status))
            await ws.close(code=1008)
            return
        server.metrics.inc("kimia_requests_total", route="/v1/realtime", status="101")
        await session.send("session.created", session=session._session())
        try:
            while True:
                msg = await ws.receive_text()
                if len(msg) > server.settings.max_upload_bytes * 4 // 3 + 4096:
                    await session.error("event too large", "event_too_large")
                    continue
                try:
                    ev = json.loads(msg)
                    if not isinstance(ev, dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    await session.error(f"could not parse the event as a JSON object: {e}", "invalid_json")
                    continue
                await session.handle(ev)
        except WebSocketDisconnect:
            pass
        finally:
            if session.job is not None:
                session.job.cancelled.set()
            if session.response is not None and not session.response.done():
                session.response.cancel()
