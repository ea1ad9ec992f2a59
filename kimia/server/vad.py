"""Energy voice-activity detection for server-side turn detection on the realtime websocket.

A deliberately simple detector (no model to ship): 20 ms frames, frame energy in dBFS against a fixed
threshold; speech starts after `start_frames` consecutive loud frames and stops after `silence_ms` of quiet.
It is fed PCM incrementally and reports sample offsets, so the websocket can cut the buffer at the turn end
and keep `prefix_ms` of audio before the detected start (OpenAI's `prefix_padding_ms`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VADEvent:
    """`kind` "start" or "stop" at sample offset `sample` (since the detector's creation/reset)."""

    kind: str
    sample: int


class EnergyVAD:
    """Incremental energy VAD over mono float PCM at `sample_rate`."""

    def __init__(self, sample_rate: int, threshold_db: float = -45.0, silence_ms: int = 500,
                 prefix_ms: int = 300, frame_ms: int = 20, start_frames: int = 3):
        if sample_rate <= 0 or frame_ms <= 0 or silence_ms <= 0 or start_frames <= 0 or prefix_ms < 0:
            raise ValueError("EnergyVAD: sample_rate, frame_ms, silence_ms, start_frames must be positive")
        self.sample_rate = sample_rate
        self.threshold_db = threshold_db
        self.frame = max(1, sample_rate * frame_ms // 1000)
        self.silence_frames = max(1, silence_ms // frame_ms)
        self.start_frames = start_frames
        self.prefix = sample_rate * prefix_ms // 1000
        self.reset()

    def reset(self) -> None:
        self._rest = np.zeros(0, dtype=np.float32)
        self._offset = 0  # samples consumed into whole frames
        self.in_speech = False
        self._loud = 0
        self._quiet = 0
        self.speech_start: int | None = None

    @staticmethod
    def frame_db(frame: np.ndarray) -> float:
        rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64)))) if frame.size else 0.0
        return 20.0 * np.log10(max(rms, 1e-10))

    def feed(self, pcm: np.ndarray) -> list[VADEvent]:
        """Consume float PCM [S]; return the start/stop events it completes (in order)."""
        data = np.concatenate([self._rest, np.asarray(pcm, dtype=np.float32).reshape(-1)])
        n = data.size // self.frame
        events: list[VADEvent] = []
        for i in range(n):
            loud = self.frame_db(data[i * self.frame:(i + 1) * self.frame]) > self.threshold_db
            end = self._offset + (i + 1) * self.frame
            if not self.in_speech:
                self._loud = self._loud + 1 if loud else 0
                if self._loud >= self.start_frames:
                    self.in_speech, self._quiet = True, 0
                    self.speech_start = end - self._loud * self.frame
                    events.append(VADEvent("start", self.speech_start))
            else:
                self._quiet = 0 if loud else self._quiet + 1
                if self._quiet >= self.silence_frames:
                    self.in_speech, self._loud = False, 0
                    events.append(VADEvent("stop", end - self._quiet * self.frame))
        self._offset += n * self.frame
        self._rest = data[n * self.frame:]
        return events
