"""Sound events for the classification and captioning tasks: packaged sounds, generated signals, mixtures.

Sources: Debian's `sound-theme-freedesktop` (.oga desktop events) and `sound-icons` (short instrument and
effect samples), plus signals generated here (tones, beep trains, chirps, chords, white/brown noise,
silence) and mixtures of synthetic speech with noise or music. A clip is described by a JSON-able *recipe*
(`plan_sound`) that fixes the source and every augmentation (gain, leading pad, speed factor, background
noise), and rendered by `render_sound` with a generator seeded from the recipe, so the same recipe always
gives the same samples. Each recipe carries its class `label` and a one-sentence `caption`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from kimia.errors import AudioError

logger = logging.getLogger(__name__)

SR = 16000
FREEDESKTOP = Path("/usr/share/sounds/freedesktop/stereo")
SOUND_ICONS = Path("/usr/share/sounds/sound-icons")

# file stem -> (label, caption); stems not listed are generic notification chimes
_FREEDESKTOP_LABELS = {
    "bell": ("bell", "A bell rings."),
    "alarm-clock-elapsed": ("alarm clock", "An alarm clock goes off."),
    "camera-shutter": ("camera shutter", "A camera shutter clicks."),
    "screen-capture": ("camera shutter", "A camera shutter clicks."),
    "phone-incoming-call": ("phone ringing", "A phone is ringing."),
    "phone-outgoing-busy": ("busy signal", "A telephone busy signal beeps."),
    "phone-outgoing-calling": ("ringback tone", "A telephone ringback tone repeats."),
    "trash-empty": ("paper crumpling", "Paper is crumpled and thrown away."),
    "audio-test-signal": ("test tone", "An audio test signal plays."),
}
_ICON_LABELS = {
    "cembalo": ("harpsichord", "A harpsichord plays a few notes."),
    "klavichord": ("harpsichord", "A harpsichord plays a few notes."),
    "piano": ("piano", "A piano plays."), "electric-piano": ("piano", "An electric piano plays."),
    "guitar": ("guitar", "A guitar is strummed."), "trumpet": ("trumpet", "A trumpet plays."),
    "violoncello": ("cello", "A cello plays a note."), "xylofon": ("xylophone", "A xylophone is struck."),
    "percussion": ("drum", "A drum is hit."), "cymbaly": ("cymbal", "A cymbal crashes."),
    "canary": ("bird song", "A bird is singing."), "glass-water": ("glass", "A glass clinks."),
    "chord": ("chord", "A musical chord plays."),
}
GENERATED = ("tone", "beeps", "chirp", "chord", "white noise", "brown noise", "silence")
MIXTURES = ("speech with noise", "speech with music")


@lru_cache(maxsize=1)
def packaged_sounds() -> tuple[tuple[str, str, str], ...]:
    """(path, label, caption) of every installed packaged sound file, sorted by path."""
    out = []
    if FREEDESKTOP.is_dir():
        for f in sorted(FREEDESKTOP.glob("*.oga")):
            if f.stem.startswith("audio-channel"):
                continue  # spoken words ("front left"): speech, not a sound event
            label, cap = _FREEDESKTOP_LABELS.get(f.stem, ("notification chime", "A short notification chime plays."))
            out.append((str(f), label, cap))
    if SOUND_ICONS.is_dir():
        for f in sorted(SOUND_ICONS.glob("*.wav")):
            stem = f.stem.rstrip("0123456789-").removesuffix("-long")
            if stem in _ICON_LABELS:
                out.append((str(f), *_ICON_LABELS[stem]))
    return tuple(out)


def labels() -> list[str]:
    """Every label a recipe can carry with the installed packages."""
    return sorted({lab for _, lab, _ in packaged_sounds()} | set(GENERATED) | set(MIXTURES))


def _pitch_word(f: float) -> str:
    return "low" if f < 400 else ("high" if f > 1200 else "medium")


def plan_sound(rng: random.Random, with_speech: bool = True) -> dict:
    """A recipe: {"kind", "label", "caption", "duration", params..., "gain_db", "pad_s", "snr_db"}."""
    kinds = ["packaged", "generated", "generated"] + (["mixture"] if with_speech else [])
    kind = rng.choice(kinds) if packaged_sounds() else rng.choice(["generated"] + (["mixture"] if with_speech else []))
    r: dict = {"kind": kind, "gain_db": round(rng.uniform(-12, 0), 1), "pad_s": round(rng.uniform(0, 0.4), 2),
               "snr_db": round(rng.uniform(20, 40), 1) if rng.random() < 0.5 else None,
               "seed": rng.randrange(2**31)}
    if kind == "packaged":
        path, label, cap = rng.choice(packaged_sounds())
        r.update(path=path, label=label, caption=cap, speed=round(rng.uniform(0.9, 1.1), 3))
        return r
    if kind == "mixture":
        label = rng.choice(MIXTURES)
        r.update(label=label, snr_db=round(rng.uniform(0, 12), 1), duration=None)
        return r
    label = rng.choice(GENERATED)
    dur = round(rng.uniform(1.0, 3.0), 2)
    r.update(label=label, duration=dur)
    if label == "tone":
        f = round(rng.uniform(200, 2000))
        r.update(freq=f, caption=f"A steady {_pitch_word(f)} pitched tone.")
    elif label == "beeps":
        n = rng.randint(2, 6)
        f = round(rng.uniform(500, 2000))
        r.update(freq=f, count=n, duration=round(0.3 * n + 0.2, 2),
                 caption=f"{['Two', 'Three', 'Four', 'Five', 'Six'][n - 2]} short beeps.")
    elif label == "chirp":
        up = rng.random() < 0.5
        lo, hi = round(rng.uniform(150, 500)), round(rng.uniform(1500, 4000))
        r.update(f0=lo if up else hi, f1=hi if up else lo,
                 caption=f"A tone sweeping {'upward' if up else 'downward'} in pitch.")
    elif label == "chord":
        root = round(rng.uniform(150, 500))
        minor = rng.random() < 0.5
        r.update(freq=root, minor=minor, caption=f"A sustained {'minor' if minor else 'major'} chord.")
    elif label == "white noise":
        r.update(caption="Steady hissing white noise.")
    elif label == "brown noise":
        r.update(caption="A low rumbling noise.")
    else:
        r.update(snr_db=None, caption="Silence.")
    return r


def recipe_id(recipe: dict) -> str:
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _load(path: str) -> np.ndarray:
    try:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(path, f"cannot read packaged sound: {e}") from e
    return soxr.resample(audio.mean(axis=1), sr, SR).astype(np.float32)


def _noise(g: np.random.Generator, n: int, brown: bool = False) -> np.ndarray:
    x = g.standard_normal(n).astype(np.float32)
    if brown:
        x = np.cumsum(x)
        x -= np.linspace(x[0], x[-1], n, dtype=np.float32)  # remove drift
    return x / (np.abs(x).max() + 1e-9)


def _generated(r: dict, g: np.random.Generator) -> np.ndarray:
    n = int(r["duration"] * SR)
    t = np.arange(n, dtype=np.float64) / SR
    lab = r["label"]
    if lab == "tone":
        x = np.sin(2 * np.pi * r["freq"] * t)
    elif lab == "beeps":
        on = (t % 0.3) < 0.15
        x = np.sin(2 * np.pi * r["freq"] * t) * on * (t < 0.3 * r["count"])
    elif lab == "chirp":
        f = r["f0"] * (r["f1"] / r["f0"]) ** (t / t[-1])
        x = np.sin(2 * np.pi * np.cumsum(f) / SR)
    elif lab == "chord":
        ratios = (1.0, 1.189 if r["minor"] else 1.26, 1.498)
        x = sum(np.sin(2 * np.pi * r["freq"] * k * t) for k in ratios) / 3
    elif lab in ("white noise", "brown noise"):
        x = _noise(g, n, brown=lab == "brown noise")
    else:
        x = np.zeros(n)
    fade = min(n // 2, int(0.01 * SR))  # 10 ms ramps avoid clicks
    if fade:
        ramp = np.linspace(0, 1, fade)
        x[:fade] *= ramp
        x[n - fade:] *= ramp[::-1]
    return (0.5 * x).astype(np.float32)


def render_sound(recipe: dict, speech: np.ndarray | None = None) -> np.ndarray:
    """Render a recipe to float32 mono 16 kHz. Mixtures need `speech` (16 kHz) to lay over the background."""
    g = np.random.default_rng(recipe["seed"])
    kind = recipe["kind"]
    if kind == "packaged":
        x = _load(recipe["path"])
        if recipe.get("speed", 1.0) != 1.0:  # resampling changes speed and pitch together, like tape
            x = soxr.resample(x, SR, SR / recipe["speed"]).astype(np.float32)
    elif kind == "generated":
        x = _generated(recipe, g)
    elif kind == "mixture":
        if speech is None or speech.size == 0:
            raise AudioError("sound mixture", "a speech mixture needs the speech clip")
        n = speech.size
        if recipe["label"] == "speech with noise":
            bg = _noise(g, n, brown=g.random() < 0.5)
        else:
            bg = _generated({"label": "chord", "duration": n / SR, "freq": float(g.uniform(150, 400)),
                             "minor": bool(g.random() < 0.5)}, g)[:n]
            bg = np.pad(bg, (0, n - bg.size))
        p_s, p_b = float(np.mean(speech**2)) + 1e-12, float(np.mean(bg**2)) + 1e-12
        x = speech + bg * np.sqrt(p_s / (p_b * 10 ** (recipe["snr_db"] / 10)))
    else:
        raise AudioError("sound recipe", f"unknown kind {kind!r}")
    x = np.asarray(x, np.float32)
    if kind != "mixture" and recipe.get("snr_db") is not None and np.any(x):
        nz = _noise(g, x.size)
        nz /= np.sqrt(np.mean(nz**2)) + 1e-9  # unit power, then scaled to the requested SNR
        x = x + nz * np.sqrt(float(np.mean(x**2)) / 10 ** (recipe["snr_db"] / 10))
    peak = float(np.abs(x).max())
    if peak > 0:
        x = x / peak * 0.9 * 10 ** (recipe["gain_db"] / 20)
    x = np.concatenate([np.zeros(int(recipe["pad_s"] * SR), np.float32), x.astype(np.float32)])
    return x


__all__ = ["GENERATED", "MIXTURES", "labels", "packaged_sounds", "plan_sound", "recipe_id", "render_sound"]
