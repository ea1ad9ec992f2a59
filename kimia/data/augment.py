"""Channel augmentation of synthetic training speech: band limit, background noise, room reverb.

The corpus' speech comes from clean synthesis, but the model is judged on real recordings (telephone prompts
with a band limit near 7 kHz, room tone, some reverberation). Each training item gets a *channel* drawn once
from its own seeded `random.Random` (`plan_channel`, a JSON-able dict stored in the item spec) and applied to
every input speech clip of the item (`apply_channel`), so one conversation sounds like one recording session.
Evaluation items stay clean: held-out synthetic WER measures the model, not the augmentation.

Rendering is deterministic: the noise and the reverb tail come from a numpy generator seeded by the recipe.
"""

from __future__ import annotations

import random

import numpy as np
import soxr

CLEAN_SHARE = 0.35  # items left exactly as synthesised
LOWPASS_P, NOISE_P, REVERB_P = 0.45, 0.5, 0.35


def plan_channel(rng: random.Random) -> dict | None:
    """None (clean) or {"seed", "lowpass_hz"?, "noise_snr_db"?, "noise_color"?, "rt60"?, "wet"?, "gain_db"}."""
    if rng.random() < CLEAN_SHARE:
        return None
    ch: dict = {"seed": rng.randrange(2**31), "gain_db": round(rng.uniform(-10.0, 0.0), 1)}
    if rng.random() < LOWPASS_P:
        ch["lowpass_hz"] = round(rng.uniform(3400.0, 7600.0))
    if rng.random() < NOISE_P:
        ch["noise_snr_db"] = round(rng.uniform(8.0, 30.0), 1)
        ch["noise_color"] = rng.choice(("white", "pink", "brown"))
    if rng.random() < REVERB_P:
        ch["rt60"] = round(rng.uniform(0.15, 0.7), 2)
        ch["wet"] = round(rng.uniform(0.15, 0.5), 2)
    return ch


def _colored_noise(g: np.random.Generator, n: int, color: str) -> np.ndarray:
    x = g.standard_normal(n)
    if color == "white":
        return x
    spec = np.fft.rfft(x)
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0
    spec /= np.sqrt(f) if color == "pink" else f  # 1/f power (pink) or 1/f^2 (brown)
    return np.fft.irfft(spec, n)


def _room_response(g: np.random.Generator, sr: int, rt60: float) -> np.ndarray:
    """Exponentially decaying noise (60 dB down after rt60 seconds): a diffuse room tail."""
    n = max(1, int(rt60 * sr))
    t = np.arange(n) / sr
    h = g.standard_normal(n) * np.exp(-6.9078 * t / rt60)
    h[: int(0.002 * sr)] = 0.0  # the direct sound is the dry path
    return h / (np.sqrt(np.sum(h**2)) + 1e-12)


def apply_channel(audio: np.ndarray, sr: int, ch: dict | None) -> np.ndarray:
    """The clip as heard through channel `ch` (float32, same length, peak <= 0.99)."""
    if not ch:
        return np.asarray(audio, np.float32)
    x = np.asarray(audio, np.float64)
    n = x.size
    g = np.random.default_rng(ch["seed"])
    if ch.get("rt60"):
        h = _room_response(g, sr, ch["rt60"])
        m = 1 << int(np.ceil(np.log2(n + h.size)))
        wet = np.fft.irfft(np.fft.rfft(x, m) * np.fft.rfft(h, m), m)[:n]
        wet *= np.sqrt(np.sum(x**2) / (np.sum(wet**2) + 1e-12))
        x = (1.0 - ch["wet"]) * x + ch["wet"] * wet
    if ch.get("lowpass_hz") and 2 * ch["lowpass_hz"] < sr:
        low = 2 * int(ch["lowpass_hz"])  # soxr's anti-alias filter is the low-pass
        x = soxr.resample(soxr.resample(x, sr, low), low, sr)[:n]
        x = np.pad(x, (0, n - x.size))
    if ch.get("noise_snr_db") is not None:
        nz = _colored_noise(g, n, ch.get("noise_color", "white"))
        p_s = float(np.mean(x**2)) + 1e-12
        x = x + nz * np.sqrt(p_s / ((float(np.mean(nz**2)) + 1e-12) * 10 ** (ch["noise_snr_db"] / 10)))
    peak = float(np.abs(x).max())
    if peak > 0:
        x = x * min(10 ** (ch.get("gain_db", 0.0) / 20), 0.99 / peak)
    return x.astype(np.float32)


__all__ = ["apply_channel", "plan_channel"]
