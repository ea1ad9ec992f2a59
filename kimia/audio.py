"""Audio input/output and the Whisper log-mel front end.

Everything that touches raw waveforms goes through this module, so the rest of kimia can assume a clean
input: 1-D float32 mono at 16 kHz, finite, within length limits. Bad input (missing or corrupt files,
unsupported formats, empty/too short/too long audio, NaN samples, arrays without a sample rate) is turned
into one typed `AudioError` that names the source and the problem, never a soundfile/soxr exception.

The log-mel spectrogram follows openai-whisper's definition exactly (periodic Hann STFT, n_fft 400, hop
160, Slaney mel filters, log10 floor, dynamic range clamp of 8 per example, (x + 4) / 4), which is what
both Kimi-Audio's continuous Whisper path and the GLM-4-Voice semantic tokenizer (through HF's
WhisperFeatureExtractor) consume. The filters are computed here instead of shipped as a data file.

This is a leaf module: it imports only numpy, torch, soundfile, soxr and kimia.errors.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
from importlib import resources
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F

from kimia.errors import AudioError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # input rate of both audio encoders
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds per Whisper segment
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per segment
OUTPUT_SAMPLE_RATE = 24000  # rate of the detokenizer/vocoder output

MAX_CHANNELS = 8  # a 2-D array axis at most this long is taken as the channel axis
READABLE_FORMATS = ("wav", "flac", "ogg", "mp3")
_OTHER_SOUNDFILE_SUFFIXES = {"aif", "aiff", "aifc", "au", "snd", "caf", "w64", "rf64", "oga", "opus", "wave"}
_WRITE_SUBTYPES = {"wav": ("WAV", "FLOAT", "PCM_16"), "flac": ("FLAC", None, "PCM_16"),
                   "ogg": ("OGG", None, "VORBIS"), "mp3": ("MP3", None, "MPEG_LAYER_III")}

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, io.IOBase, np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------------------------- loading
def load_audio(
    source: AudioSource,
    sr: int | None = None,
    *,
    target_sr: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    min_seconds: float = 0.02,
    name: str | None = None,
) -> torch.Tensor:
    """Load `source` as a validated mono float32 waveform at `target_sr`, shape [S].

    `source` is a file path, the raw bytes of a file (bytes/bytearray/BytesIO), or an array/tensor of
    samples (then `sr` is required; the file header gives the rate otherwise and `sr` is ignored).
    Arrays may be 1-D or 2-D with channels on either axis; integer PCM is scaled to [-1, 1]; channels
    are averaged; other rates are resampled with soxr (very high quality). Raises `AudioError`.
    """
    if isinstance(source, (str, os.PathLike)):
        label = name or str(source)
        data, file_sr = _read_path(Path(source), label, max_seconds)
    elif isinstance(source, (bytes, bytearray, memoryview, io.IOBase)):
        label = name or "<bytes>"
        raw = source.read() if isinstance(source, io.IOBase) else bytes(source)
        if not isinstance(raw, (bytes, bytearray)):
            raise AudioError(label, f"the stream returned {type(raw).__name__}, not bytes (open it in binary mode)")
        data, file_sr = _read_bytes(bytes(raw), label, max_seconds)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        label = name or "<array>"
        file_sr = _check_rate(sr, label, "sample rate `sr`")
        data = _array_to_mono(source, label)
    else:
        raise AudioError(name or "<input>", f"unsupported audio source type {type(source).__name__} "
                         "(expected a path, file bytes, a numpy array or a torch tensor)")
    target_sr = _check_rate(target_sr, label, "target_sr")
    _validate(data, file_sr, label, min_seconds=min_seconds, max_seconds=max_seconds)
    if file_sr != target_sr:
        try:
            data = soxr.resample(data, file_sr, target_sr, quality="VHQ")
        except Exception as e:  # soxr raises plain ValueError/RuntimeError
            raise AudioError(label, f"cannot resample from {file_sr} Hz to {target_sr} Hz: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def _check_rate(sr, label: str, what: str) -> int:
    if sr is None:
        raise AudioError(label, f"{what} is required for array input (samples per second, e.g. 16000)")
    if isinstance(sr, bool) or not isinstance(sr, (int, float, np.integer, np.floating)):
        raise AudioError(label, f"{what} must be a positive integer, got {type(sr).__name__} {sr!r}")
    if not math.isfinite(float(sr)) or float(sr) != int(sr) or int(sr) <= 0:
        raise AudioError(label, f"{what} must be a positive integer, got {sr!r}")
    return int(sr)


def _read_path(path: Path, label: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    if not path.exists():
        raise AudioError(label, "file not found")
    if path.is_dir():
        raise AudioError(label, "is a directory, not an audio file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AudioError(label, f"cannot read file: {e.strerror or e}") from e
    return _read_bytes(raw, label, max_seconds, suffix=path.suffix.lower().lstrip("."))


def _read_bytes(raw: bytes, label: str, max_seconds: float | None, suffix: str = "") -> tuple[np.ndarray, int]:
    if len(raw) == 0:
        raise AudioError(label, "audio is empty (0 bytes)")
    sniffed = _sniff_unsupported(raw)
    if sniffed:
        raise AudioError(label, f"unsupported audio format ({sniffed}); supported: {', '.join(READABLE_FORMATS)}")
    _check_wav_truncation(raw, label)
    try:
        with sf.SoundFile(io.BytesIO(raw)) as f:
            rate = f.samplerate
            if max_seconds is not None and f.frames > 0 and f.frames / rate > max_seconds * 1.01 + 1:
                # Refuse before decoding a very long file; the exact check runs after decoding.
                raise AudioError(label, _too_long(f.frames / rate, max_seconds))
            data = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as e:  # soundfile.LibsndfileError, RuntimeError, ValueError, EOFError ...
        msg = str(e).split(": ", 1)[-1] if "Error opening" in str(e) else str(e)
        known = suffix in READABLE_FORMATS or suffix in _OTHER_SOUNDFILE_SUFFIXES or suffix == ""
        if not known:
            raise AudioError(label, f"unsupported audio format '.{suffix}' (decoder says: {msg.strip()}); "
                             f"supported: {', '.join(READABLE_FORMATS)}") from e
        raise AudioError(label, f"cannot decode audio: corrupt, truncated or not an audio file "
                         f"(decoder says: {msg.strip()})") from e
    return data.mean(axis=1) if data.shape[1] > 1 else data[:, 0], int(rate)


def _sniff_unsupported(raw: bytes) -> str | None:
    """Name a common container libsndfile cannot decode, from its magic bytes (None if not recognised)."""
    if raw[4:8] == b"ftyp":
        return "MP4/M4A/AAC container"
    if raw[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM container"
    if raw[:6] == b"#!AMR\n" or raw[:9] == b"#!AMR-WB\n":
        return "AMR"
    if raw[:4] == b"\x30\x26\xb2\x75":
        return "ASF/WMA container"
    if len(raw) > 1 and raw[0] == 0xFF and (raw[1] & 0xF6) == 0xF0:
        return "raw AAC (ADTS)"
    return None


def _check_wav_truncation(raw: bytes, label: str) -> None:
    """libsndfile silently reads a cut-off WAV; compare the declared data size with the bytes present."""
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(raw):
        cid, size = raw[pos:pos + 4], struct.unpack("<I", raw[pos + 4:pos + 8])[0]
        if cid == b"data":
            present = len(raw) - pos - 8
            if size not in (0, 0xFFFFFFFF, 0x7FFFFFFF) and present < size:
                raise AudioError(label, f"truncated WAV file: the header declares {size} bytes of audio data "
                                 f"but only {present} are present")
            return
        pos += 8 + size + (size & 1)


def _array_to_mono(arr: np.ndarray | torch.Tensor, label: str) -> np.ndarray:
    is_tensor = isinstance(arr, torch.Tensor)
    if is_tensor:
        arr = arr.detach().to("cpu")
        if arr.dtype == torch.bfloat16:
            arr = arr.float()
        try:
            arr = arr.numpy()
        except (TypeError, RuntimeError) as e:
            raise AudioError(label, f"unsupported sample dtype {arr.dtype}") from e
    dt = arr.dtype
    if dt == np.int16:
        x = arr.astype(np.float32) / 32768.0
    elif dt == np.int32:
        x = (arr.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif dt == np.uint8:
        x = (arr.astype(np.float32) - 128.0) / 128.0
    elif dt in (np.float16, np.float32, np.float64):
        x = arr.astype(np.float32)
    else:
        raise AudioError(label, f"unsupported sample dtype {dt} (expected float16/32/64, int16, int32 or uint8)")
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise AudioError(label, f"audio array must be 1-D or 2-D (frames and channels), got shape {tuple(x.shape)}")
    a, b = x.shape
    if b <= MAX_CHANNELS and (a > b or not is_tensor):
        ch_axis = 1  # soundfile's [frames, channels]
    elif a <= MAX_CHANNELS:
        ch_axis = 0  # torch convention [channels, frames]
    else:
        raise AudioError(label, f"2-D audio of shape {(a, b)} has no channel axis "
                         f"(expected [frames, channels] or [channels, frames] with at most {MAX_CHANNELS} channels)")
    return x.mean(axis=ch_axis) if x.shape[ch_axis] > 1 else np.take(x, 0, axis=ch_axis)


def _too_long(seconds: float, limit: float) -> str:
    return f"audio is {seconds:.1f} s long, more than the {limit:g} s limit"


def _validate(data: np.ndarray, sr: int, label: str, *, min_seconds: float, max_seconds: float | None) -> None:
    n = data.shape[0]
    if n == 0:
        raise AudioError(label, "audio is empty (0 samples)")
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int((~finite).sum()) - n_nan
        kinds = ", ".join(p for p in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if p)
        raise AudioError(label, f"audio contains non-finite samples ({kinds} of {n})")
    seconds = n / sr
    if seconds < min_seconds:
        raise AudioError(label, f"audio is {seconds:.4g} s long ({n} samples at {sr} Hz), "
                         f"shorter than the {min_seconds:g} s minimum")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(label, _too_long(seconds, max_seconds))


def example_path(name: str = "question.flac") -> Path:
    """Path of a bundled example clip (see kimia/assets/examples/README.md)."""
    folder = resources.files("kimia").joinpath("assets", "examples")
    path = Path(str(folder.joinpath(name)))
    if not path.is_file():
        available = sorted(p.name for p in Path(str(folder)).iterdir() if p.suffix.lower().lstrip(".") in READABLE_FORMATS)
        raise AudioError(name, f"no bundled example clip of that name; available: {', '.join(available) or 'none'}")
    return path


# ----------------------------------------------------------------------------------------------- saving
def save_audio(path: str | os.PathLike, wav: np.ndarray | torch.Tensor, sr: int, *, pcm16: bool = False) -> Path:
    """Write `wav` ([S] mono, or [S, C] / tensor [C, S]) to `path`; the format comes from the extension.

    wav is written as float32 unless `pcm16`; flac as 16-bit PCM (FLAC has no float); ogg (Vorbis) and mp3
    are lossy. PCM output is clipped to [-1, 1]. Returns the path.
    """
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext not in _WRITE_SUBTYPES:
        raise AudioError(str(path), f"cannot write format '.{ext}'; supported: {', '.join(_WRITE_SUBTYPES)}")
    sr = _check_rate(sr, str(path), "sr")
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().to("cpu", torch.float32).numpy()
        if wav.ndim == 2 and wav.shape[0] <= MAX_CHANNELS < wav.shape[1]:
            wav = wav.T
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim not in (1, 2) or x.size == 0:
        raise AudioError(str(path), f"cannot write audio of shape {tuple(x.shape)} (expected [S] or [S, C], non-empty)")
    if not np.isfinite(x).all():
        raise AudioError(str(path), "cannot write audio with NaN/Inf samples")
    fmt, float_subtype, pcm_subtype = _WRITE_SUBTYPES[ext]
    subtype = float_subtype if (float_subtype and not pcm16) else pcm_subtype
    if subtype != "FLOAT":
        x = np.clip(x, -1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sf.write(str(path), x, sr, format=fmt, subtype=subtype)
    except Exception as e:
        raise AudioError(str(path), f"cannot write audio: {e}") from e
    return path


# ---------------------------------------------------------------------------------------------- features
def pad_or_trim(audio: torch.Tensor | np.ndarray, length: int = N_SAMPLES, *, axis: int = -1):
    """Zero-pad on the right or cut `audio` along `axis` to exactly `length` samples."""
    n = audio.shape[axis]
    if isinstance(audio, torch.Tensor):
        if n > length:
            return audio.narrow(axis, 0, length)
        if n < length:
            pad = [0, 0] * (audio.dim() - 1 - (axis % audio.dim())) + [0, length - n]
            return F.pad(audio, pad)
        return audio
    if n > length:
        return np.take(audio, np.arange(length), axis=axis)
    if n < length:
        widths = [(0, 0)] * audio.ndim
        widths[axis] = (0, length - n)
        return np.pad(audio, widths)
    return audio


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3.0)
    logstep = math.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    logstep = math.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * (200.0 / 3.0))


def _mel_filters_np(n_mels: int, sr: int, n_fft: int) -> np.ndarray:
    n_bins = n_fft // 2 + 1
    fft_freqs = np.linspace(0.0, sr / 2.0, n_bins)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2.0), n_mels + 2))  # n_mels + 2 band edges
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney normalisation: each triangle has unit area in Hz, so bands carry equal energy.
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights


_MEL_CACHE: dict[tuple[int, int, int, str], torch.Tensor] = {}


def mel_filters(n_mels: int, sr: int = SAMPLE_RATE, n_fft: int = N_FFT, device=None) -> torch.Tensor:
    """Slaney-scale, Slaney-normalised triangular mel filterbank, float32 [n_mels, n_fft // 2 + 1]."""
    if n_mels <= 0 or n_fft <= 0 or sr <= 0:
        raise ValueError(f"mel_filters needs positive n_mels, sr and n_fft (got {n_mels}, {sr}, {n_fft})")
    device = torch.device(device or "cpu")
    key = (int(n_mels), int(sr), int(n_fft), str(device))
    if key not in _MEL_CACHE:
        with torch.inference_mode(False):  # cached for every later caller, training ones included
            _MEL_CACHE[key] = torch.from_numpy(_mel_filters_np(n_mels, sr, n_fft).astype(np.float32)).to(device)
    return _MEL_CACHE[key]


def log_mel_spectrogram(
    audio: torch.Tensor | np.ndarray, n_mels: int = 128, *, padding: int = 0, device=None
) -> torch.Tensor:
    """Whisper log-mel features of 16 kHz audio: [S] -> [n_mels, F] or [B, S] -> [B, n_mels, F].

    `padding` zeros are appended first; F = (S + padding) // 160. The dynamic range clamp (max - 8) uses
    the maximum of each example separately. Computed in float32 on `device` (default: the input's).
    """
    x = torch.as_tensor(audio)
    if device is not None:
        x = x.to(device)
    x = x.to(torch.float32)
    if x.dim() not in (1, 2):
        raise AudioError("<array>", f"log-mel input must be [S] or [B, S], got shape {tuple(x.shape)}")
    if padding < 0:
        raise AudioError("<array>", f"padding must be >= 0, got {padding}")
    if padding:
        x = F.pad(x, (0, int(padding)))
    if x.shape[-1] <= N_FFT // 2:
        raise AudioError("<array>", f"audio has {x.shape[-1]} samples; the log-mel front end needs more than {N_FFT // 2}")
    window = torch.hann_window(N_FFT, device=x.device, dtype=torch.float32)
    spec = torch.stft(x, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spec[..., :-1].abs() ** 2
    mel = mel_filters(n_mels, device=x.device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0
