"""Request queue feeding the engine in batches (one worker thread, no lock around whole requests).

Handlers `submit` a `Job` (messages for the API layer, output type, sampling, step budget) with a `sink`
callback; the worker thread takes the oldest waiting job plus every compatible job that arrives within
`batch_wait_ms` (same output type, sampling and step budget: the engine shares one `GenerationConfig` per
batch) up to `batch_size`, builds their prompts, and decodes them together through `Engine.stream`. Events go
back through each job's sink as they are produced: `Started` (the prompt was accepted), `Delta` (text),
`Audio` (24 kHz PCM, decoded per row by a detokenizer stream that shares the model's DiT and vocoder),
`Done`, or `Failed`. Jobs with a seed run alone so their answers equal `KimiAudio.generate(seed=...)`.

The queue of waiting jobs is bounded (`max_queue`): beyond it `submit` raises `QueueFull` (HTTP 429).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kimia.server.metrics import BATCH_BUCKETS, Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue of waiting requests is full."""


# ------------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Started:
    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Audio:
    pcm: np.ndarray  # float32 [S] at 24 kHz


@dataclass(frozen=True)
class Done:
    text: str
    wav: np.ndarray | None  # float32 [S] at 24 kHz (None in text mode)
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass
class Job:
    """One request for the engine. `max_new_tokens` -1 = the model's context budget."""

    messages: list[dict]
    output_type: str = "text"
    sampling: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = -1
    seed: int | None = None
    sink: Callable[[Any], None] = lambda ev: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)

    def key(self) -> tuple:
        solo = id(self) if self.seed is not None else None
        return (self.output_type, tuple(sorted(self.sampling.items())), self.max_new_tokens, solo)

    def emit(self, ev: Any) -> None:
        try:
            self.sink(ev)
        except Exception:  # a sink whose event loop is gone must not stop the worker
            log.debug("dropping %s for a closed request", type(ev).__name__)


class _Row:
    """Decoding state of one job inside a batch: incremental text and per-row audio stream."""

    def __init__(self, job: Job, model: Any, prompt_tokens: int, metrics: Metrics):
        from kimia.api import _AudioStream, _TextStream

        self.job, self.metrics, self.prompt_tokens = job, metrics, prompt_tokens
        self.text = _TextStream(model.tokenizer)
        self.audio = None
        self.done = False
        self.first_text = self.first_audio = True
        detok = model.detokenizer
        if job.output_type == "both" and detok is not None:
            from kimia.detokenizer.stream import StreamingDetokenizer

            seed = job.seed if job.seed is not None else random.getrandbits(63)
            gen = torch.Generator().manual_seed(seed)
            self.audio = _AudioStream(StreamingDetokenizer(detok.dit, detok.vocoder, detok.config, generator=gen))

    def _text(self, delta: str) -> None:
        if delta and not self.job.cancelled.is_set():
            if self.first_text:
                self.first_text = False
                self.metrics.observe("kimia_time_to_first_token_seconds", time.monotonic() - self.job.arrived)
            self.job.emit(Delta(delta))

    def _audio(self, pcm: torch.Tensor | None) -> None:
        if pcm is None or not pcm.numel() or self.job.cancelled.is_set():
            return
        if self.first_audio:
            self.first_audio = False
            self.metrics.observe("kimia_time_to_first_audio_seconds", time.monotonic() - self.job.arrived)
        self.job.emit(Audio(pcm.float().cpu().numpy().reshape(-1)))

    def on_text(self, ids: list[int]) -> None:
        self._text(self.text.add(ids))

    def on_audio(self, ids: list[int]) -> None:
        if self.audio is not None and not self.job.cancelled.is_set():
            for pcm in self.audio.add(ids):
                self._audio(pcm)

    def finish(self, result: Any) -> None:
        self._text(self.text.finish())
        wav = None
        if self.audio is not None and not self.job.cancelled.is_set():
            self._audio(self.audio.finish())
            wav = self.audio.wav().reshape(-1).numpy()
        self.done = True
        self.metrics.inc("kimia_generated_tokens_total", result.steps)
        reason = "length" if result.stop_reason in ("budget", "max_cache_len") else "stop"
        self.job.emit(Done(self.text.text, wav, reason, self.prompt_tokens, result.steps))


class Batcher:
    """Bounded request queue + one worker thread that decodes compatible jobs as one engine batch."""

    def __init__(self, model: Any, *, batch_size: int = 8, batch_wait_ms: float = 5.0, max_queue: int = 64,
                 metrics: Metrics | None = None):
        self.model = model
        self.batch_size, self.batch_wait, self.max_queue = batch_size, batch_wait_ms / 1000.0, max_queue
        self.metrics = metrics or Metrics()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.busy = False

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._work, name="kimia-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            pending, self._pending = list(self._pending), deque()
        for job in pending:
            job.emit(Failed(RuntimeError("server shutting down")))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue `job`; raises QueueFull when `max_queue` jobs are already waiting."""
        with self._cond:
            if self._stop:
                raise QueueFull("server shutting down")
            if len(self._pending) >= self.max_queue:
                self.metrics.inc("kimia_rejected_total")
                raise QueueFull(f"{len(self._pending)} requests are already waiting (max_queue {self.max_queue})")
            self._pending.append(job)
            self.metrics.set("kimia_queue_depth", len(self._pending))
            self._cond.notify_all()

    # ------------------------------------------------------------------ worker
    def _take(self) -> list[Job]:
        with self._cond:
            while not self._pending and not self._stop:
                self._cond.wait(0.25)
            if self._stop:
                return []
            first = self._pending.popleft()
            batch, key = [first], first.key()
            deadline = time.monotonic() + self.batch_wait
            while len(batch) < self.batch_size and first.seed is None:
                for job in list(self._pending):
                    if len(batch) < self.batch_size and job.key() == key:
                        self._pending.remove(job)
                        batch.append(job)
                left = deadline - time.monotonic()
                if len(batch) >= self.batch_size or left <= 0 or self._stop:
                    break
                self._cond.wait(left)
            self.metrics.set("kimia_queue_depth", len(self._pending))
            return batch

    def _work(self) -> None:
        while not self._stop:
            batch = self._take()
            if not batch:
                continue
            self.busy = True
            try:
                self.run(batch)
            except BaseException as e:  # never let the worker die: fail the batch's jobs instead
                log.exception("batch failed")
                for job in batch:
                    job.emit(Failed(e))
            finally:
                self.busy = False

    @torch.inference_mode()
    def run(self, batch: list[Job]) -> None:
        """Decode `batch` (compatible jobs) together, emitting each job's events."""
        from kimia.engine import AudioTokens, Finished, GenerationConfig, TextDelta

        model, first = self.model, batch[0]
        cfg = GenerationConfig.from_official(output_type=first.output_type, max_new_tokens=first.max_new_tokens,
                                             **first.sampling)
        cfg.max_context_both = int(model.budgets.max_context_both)
        cfg.max_context_text = int(model.budgets.max_context_text)
        prompts, rows = [], []
        for job in batch:
            if job.cancelled.is_set():
                continue
            try:
                prompt = model.prompt_builder.build(job.messages, output_type=job.output_type)
                cfg.steps_for(len(prompt))  # BudgetError for this job only
            except Exception as e:
                job.emit(Failed(e))
                continue
            prompts.append(prompt)
            rows.append(_Row(job, model, len(prompt), self.metrics))
            job.emit(Started(len(prompt)))
        if not rows:
            return
        self.metrics.observe("kimia_batch_size", len(rows), BATCH_BUCKETS)
        self.metrics.inc("kimia_batches_total")
        gen = torch.Generator(model.device).manual_seed(first.seed) if first.seed is not None else None
        stream = model.engine.stream(prompts, cfg, gen, audio_chunk=1)
        try:
            for ev in stream:
                row = rows[ev.row]
                if isinstance(ev, TextDelta):
                    row.on_text(ev.ids)
                elif isinstance(ev, AudioTokens):
                    row.on_audio(ev.ids)
                elif isinstance(ev, Finished):
                    row.finish(ev.result)
                if all(r.done or r.job.cancelled.is_set() for r in rows):
                    break
        except Exception as e:
            log.exception("engine failed on a batch of %d", len(rows))
            for r in rows:
                if not r.done:
                    r.job.emit(Failed(e))
        finally:
            stream.close()
