"""Request queue feeding the engine in batches (one worker thread, no lock around whole requests).

Handlers `submit` a `Job` (messages for the API layer, output type, sampling, step budget) with a `sink`
callback; the worker thread takes the oldest waiting job plus every compatible job that arrives within
`batch_wait_ms` (same output type, sampling and step budget: the engine shares one `GenerationConfig` per
batch) up to `batch_size` and decodes them together. Events go
back through each job's sink as they are produced: `Started` (the prompt was accepted), `Delta` (text),
`Audio` (24 kHz PCM), `Done`, or `Failed`. Decoding is `KimiAudio.generate_batch_stream` (the one streaming
implementation: prompts of the batch built with one call per audio encoder, per-row text decoding and
detokenizer streams); a cancelled job leaves the engine batch at the next step. Jobs with a seed run alone
so their answers equal `KimiAudio.generate(seed=...)`.

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
    """Per-job bookkeeping of a batch: metrics and the translation of API stream events to job events."""

    def __init__(self, job: Job, metrics: Metrics):
        self.job, self.metrics = job, metrics
        self.done = False
        self.first_text = self.first_audio = True

    def live(self) -> bool:
        return not self.done and not self.job.cancelled.is_set()

    def on(self, ev: Any) -> None:
        from kimia.api import AudioPiece, StreamEnd, StreamError, StreamStart, TextPiece

        job = self.job
        if isinstance(ev, StreamStart):
            job.emit(Started(ev.prompt_tokens))
        elif isinstance(ev, StreamError):
            self.done = True
            job.emit(Failed(ev.error))
        elif isinstance(ev, TextPiece):
            if self.live():
                if self.first_text:
                    self.first_text = False
                    self.metrics.observe("kimia_time_to_first_token_seconds", time.monotonic() - job.arrived)
                job.emit(Delta(ev.delta))
        elif isinstance(ev, AudioPiece):
            if self.live():
                if self.first_audio:
                    self.first_audio = False
                    self.metrics.observe("kimia_time_to_first_audio_seconds", time.monotonic() - job.arrived)
                job.emit(Audio(ev.pcm.float().cpu().numpy().reshape(-1)))
        elif isinstance(ev, StreamEnd):
            self.done = True
            self.metrics.inc("kimia_generated_tokens_total", ev.steps)
            if ev.stop_reason == "cancelled" or job.cancelled.is_set():
                return
            wav = None if ev.wav is None else ev.wav.reshape(-1).float().cpu().numpy()
            reason = "length" if ev.stop_reason in ("budget", "max_cache_len") else "stop"
            job.emit(Done(ev.text, wav, reason, ev.prompt_tokens, ev.steps))


class Batcher:
    """Bounded request queue + one worker thread that decodes compatible jobs as one engine batch."""

    def __init__(self, model: Any, *, batch_size: int = 8, batch_wait_ms: float = 5.0, max_queue: int = 64,
                 metrics: Metrics | None = None):
        self.model = model
        budget = getattr(getattr(model, "budgets", None), "max_batch", None)
        if budget is not None and batch_size > budget:
            log.info("batch_size %d lowered to the model's Budgets.max_batch %d", batch_size, budget)
            batch_size = budget
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

    def run(self, batch: list[Job]) -> None:
        """Decode `batch` (compatible jobs) together through `KimiAudio.generate_batch_stream`, emitting each
        job's events. A job whose prompt fails (bad audio, budget) fails alone."""
        jobs = [j for j in batch if not j.cancelled.is_set()]
        if not jobs:
            return
        first = jobs[0]
        rows = [_Row(job, self.metrics) for job in jobs]
        # every answer gets its own detokenizer noise; only a seeded (solo) job is reproducible
        seeds = [j.seed if j.seed is not None else random.getrandbits(63) for j in jobs]
        stream = self.model.generate_batch_stream(
            [j.messages for j in jobs], first.output_type, seed=first.seed, audio_seeds=seeds,
            max_new_tokens=first.max_new_tokens, errors="yield", cancelled=lambda r: jobs[r].cancelled.is_set(),
            **first.sampling)
        waiting, started = len(jobs), 0
        try:
            for ev in stream:
                row = rows[ev.row]
                row.on(ev)
                if waiting:  # the start/error events of every job come before any decoding
                    waiting -= 1
                    started += not row.done
                    if not waiting and started:
                        self.metrics.observe("kimia_batch_size", started, BATCH_BUCKETS)
                        self.metrics.inc("kimia_batches_total")
                if not waiting and not any(r.live() for r in rows):
                    break
        except Exception as e:
            log.exception("engine failed on a batch of %d", len(rows))
            for r in rows:
                if not r.done:
                    r.done = True
                    r.job.emit(Failed(e))
        finally:
            stream.close()
