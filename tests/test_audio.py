"""Audio loading, validation, resampling and saving (kimia.audio)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from kimia.audio import (
    N_SAMPLES,
    SAMPLE_RATE,
    example_path,
    load_audio,
    pad_or_trim,
    save_audio,
)
from kimia.errors import AudioError


def sine(freq: float, sr: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: torch.Tensor | np.ndarray, sr: int) -> float:
    x = np.asarray(x, dtype=np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


# --------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt,subtype,lossy", [("wav", "FLOAT", False), ("wav", "PCM_16", False),
                                               ("flac", "PCM_16", False), ("ogg", "VORBIS", True),
                                               ("mp3", "MPEG_LAYER_III", True)])
def test_file_round_trip(tmp_path, fmt, subtype, lossy):
    x = sine(440, SAMPLE_RATE)
    path = tmp_path / f"a.{fmt}"
    sf.write(str(path), x, SAMPLE_RATE, subtype=subtype)
    for src in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), io.BytesIO(path.read_bytes())):
        y = load_audio(src)
        assert y.dtype == torch.float32 and y.dim() == 1
        if lossy:
            assert abs(y.shape[0] - x.shape[0]) <= 0.05 * SAMPLE_RATE
            assert abs(peak_hz(y, SAMPLE_RATE) - 440) < 3
            assert 0.4 < float(y.abs().max()) < 0.6  # amplitude survives the codec
        else:
            tol = 0 if subtype == "FLOAT" else 1 / 32768
            assert y.shape[0] == x.shape[0]
            assert np.abs(y.numpy() - x).max() <= tol


@pytest.mark.parametrize("ext", ["wav", "flac"])
@pytest.mark.parametrize("pcm16", [False, True])
def test_save_audio_round_trip(tmp_path, ext, pcm16):
    x = torch.from_numpy(sine(300, 24000, 0.5))
    path = save_audio(tmp_path / "sub" / f"out.{ext}", x, 24000, pcm16=pcm16)
    info = sf.info(str(path))
    assert info.samplerate == 24000 and info.frames == x.shape[0] and info.channels == 1
    assert info.subtype == ("FLOAT" if ext == "wav" and not pcm16 else "PCM_16")
    y = load_audio(path, target_sr=24000)
    assert torch.allclose(y, x, atol=0 if info.subtype == "FLOAT" else 1 / 32768)


def test_save_audio_errors(tmp_path):
    with pytest.raises(AudioError, match="cannot write format '.xyz'"):
        save_audio(tmp_path / "a.xyz", np.zeros(100, np.float32), 16000)
    with pytest.raises(AudioError, match="NaN"):
        save_audio(tmp_path / "a.wav", np.full(100, np.nan, np.float32), 16000)


# ------------------------------------------------------------------------------------------ arrays
@pytest.mark.parametrize("dtype,scale", [(np.int16, 32767), (np.int32, 2**31 - 1)])
def test_int_pcm_is_scaled(dtype, scale):
    x = sine(440, SAMPLE_RATE)
    pcm = np.round(x * scale).astype(dtype)
    for src in (pcm, torch.from_numpy(pcm)):
        y = load_audio(src, SAMPLE_RATE)
        assert np.abs(y.numpy() - x).max() < 1e-4


def test_uint8_and_float_arrays():
    x = sine(440, SAMPLE_RATE)
    u8 = np.round(x * 127 + 128).astype(np.uint8)
    assert np.abs(load_audio(u8, SAMPLE_RATE).numpy() - x).max() < 1 / 64
    for src in (x.astype(np.float64), x.astype(np.float16), torch.from_numpy(x), torch.from_numpy(x).bfloat16()):
        y = load_audio(src, SAMPLE_RATE)
        assert y.dtype == torch.float32 and np.abs(y.numpy() - x).max() < 1e-2
    assert torch.equal(load_audio(x, SAMPLE_RATE), torch.from_numpy(x))  # float32 kept exactly


def test_stereo_both_layouts_average_channels(tmp_path):
    left, right = sine(440, SAMPLE_RATE), sine(440, SAMPLE_RATE, amp=0.1)
    mean = (left + right) / 2
    frames_channels = np.stack([left, right], axis=1)  # soundfile layout [frames, channels]
    for src in (frames_channels, torch.from_numpy(frames_channels), torch.from_numpy(frames_channels.T.copy())):
        y = load_audio(src, SAMPLE_RATE)
        assert y.shape == (SAMPLE_RATE,)
        assert np.allclose(y.numpy(), mean, atol=1e-6)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), frames_channels, SAMPLE_RATE, subtype="FLOAT")
    assert np.allclose(load_audio(path).numpy(), mean, atol=1e-6)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampling_keeps_length_and_frequency(tmp_path, sr):
    x = sine(1000, sr, seconds=1.0)
    y = load_audio(x, sr)
    assert abs(y.shape[0] - SAMPLE_RATE) <= 1
    assert abs(peak_hz(y, SAMPLE_RATE) - 1000) <= 1.0
    assert abs(float(y.abs().max()) - 0.5) < 0.02  # amplitude preserved
    path = tmp_path / f"x{sr}.flac"
    sf.write(str(path), x, sr)
    y2 = load_audio(path)
    assert abs(y2.shape[0] - SAMPLE_RATE) <= 1 and abs(peak_hz(y2, SAMPLE_RATE) - 1000) <= 1.0


def test_target_sr_upsamples():
    y = load_audio(sine(440, SAMPLE_RATE), SAMPLE_RATE, target_sr=24000)
    assert y.shape == (24000,) and abs(peak_hz(y, 24000) - 440) <= 1.0


def test_pad_or_trim():
    x = torch.arange(10.0)
    assert torch.equal(pad_or_trim(x, 4), x[:4])
    assert torch.equal(pad_or_trim(x, 12), torch.cat([x, torch.zeros(2)]))
    assert pad_or_trim(torch.zeros(2, 5), 8).shape == (2, 8)
    assert pad_or_trim(np.ones(5), 7).tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert pad_or_trim(torch.zeros(3)).shape == (N_SAMPLES,)


def test_bundled_example():
    path = example_path()
    assert path.is_file() and path.suffix == ".flac"
    info = sf.info(str(path))
    assert info.samplerate == SAMPLE_RATE and info.channels == 1
    assert path.stat().st_size < 100_000
    y = load_audio(path)
    assert 1.0 < y.shape[0] / SAMPLE_RATE < 5.0
    with pytest.raises(AudioError, match="no bundled example"):
        example_path("nope.flac")


# ------------------------------------------------------------------------------------------ errors
def _raises(src, match: str, source: str, **kw) -> AudioError:
    with pytest.raises(AudioError, match=match) as info:
        load_audio(src, **kw)
    assert info.value.source == source, f"error names {info.value.source!r}, expected {source!r}"
    assert str(info.value).startswith(source)
    return info.value


def test_missing_file(tmp_path):
    p = tmp_path / "nope.wav"
    _raises(p, "file not found", str(p))
    _raises(tmp_path, "is a directory", str(tmp_path))


def test_corrupt_bytes():
    g = np.random.default_rng(0)
    _raises(g.integers(0, 256, 4000, dtype=np.uint8).tobytes(), "cannot decode audio", "<bytes>")
    _raises(b"\x00" * 100, "cannot decode audio", "clip-7", name="clip-7")


def test_truncated_files(tmp_path):
    x = sine(440, SAMPLE_RATE)
    wav, flac = tmp_path / "a.wav", tmp_path / "a.flac"
    sf.write(str(wav), x, SAMPLE_RATE, subtype="PCM_16")
    sf.write(str(flac), x, SAMPLE_RATE)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(wav.read_bytes()[:10_000])
    _raises(cut, "truncated WAV file: the header declares 32000 bytes of audio data but only", str(cut))
    cut_flac = tmp_path / "cut.flac"
    cut_flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    _raises(cut_flac, "cannot decode audio: corrupt, truncated", str(cut_flac))
    head_only = tmp_path / "head.wav"
    head_only.write_bytes(wav.read_bytes()[:20])
    _raises(head_only, "cannot decode audio", str(head_only))


def test_text_file_renamed_wav(tmp_path):
    p = tmp_path / "notes.wav"
    p.write_text("this is not audio\n" * 20)
    _raises(p, "cannot decode audio: corrupt, truncated or not an audio file", str(p))


def test_unsupported_format(tmp_path):
    m4a = tmp_path / "voice.m4a"  # an MP4 container start ('ftyp' box), which libsndfile cannot decode
    m4a.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42isom" + b"\x00" * 200)
    _raises(m4a, r"unsupported audio format \(MP4/M4A/AAC container\)", str(m4a))
    _raises(m4a.read_bytes(), "unsupported audio format", "<bytes>")
    weird = tmp_path / "voice.xyz"
    weird.write_bytes(b"\x01\x02" * 300)
    _raises(weird, r"unsupported audio format '\.xyz'", str(weird))


def test_empty_audio(tmp_path):
    _raises(np.zeros(0, np.float32), r"audio is empty \(0 samples\)", "<array>", sr=SAMPLE_RATE)
    _raises(b"", r"audio is empty \(0 bytes\)", "<bytes>")
    p = tmp_path / "empty.wav"
    sf.write(str(p), np.zeros(0, np.float32), SAMPLE_RATE)
    _raises(p, "audio is empty", str(p))


def test_too_short():
    _raises(np.zeros(100, np.float32), r"shorter than the 0.02 s minimum", "<array>", sr=SAMPLE_RATE)
    _raises(np.zeros(8000, np.float32), r"audio is 0.5 s long .* shorter than the 1 s minimum", "<array>",
            sr=SAMPLE_RATE, min_seconds=1.0)


def test_nan_and_inf():
    x = sine(440, SAMPLE_RATE)
    x_nan, x_inf = x.copy(), x.copy()
    x_nan[[3, 70]] = np.nan
    x_inf[5] = -np.inf
    _raises(x_nan, r"non-finite samples \(2 NaN of 16000\)", "<array>", sr=SAMPLE_RATE)
    _raises(torch.from_numpy(x_inf), r"non-finite samples \(1 Inf of 16000\)", "<array>", sr=SAMPLE_RATE)


def test_too_long(tmp_path):
    x = np.zeros(int(93.2 * 8000), np.float32)
    _raises(x, "audio is 93.2 s long, more than the 60 s limit", "<array>", sr=8000, max_seconds=60)
    p = tmp_path / "long.flac"
    sf.write(str(p), x, 8000)
    _raises(p, "audio is 93.2 s long, more than the 60 s limit", str(p), max_seconds=60)
    assert load_audio(p, max_seconds=100).shape[0] == int(93.2 * SAMPLE_RATE)


def test_array_without_or_with_bad_sr():
    x = sine(440, SAMPLE_RATE)
    _raises(x, "sample rate `sr` is required for array input", "<array>")
    _raises(x, "must be a positive integer, got -5", "<array>", sr=-5)
    _raises(x, "must be a positive integer, got 16000.5", "<array>", sr=16000.5)
    _raises(x, "must be a positive integer", "<array>", sr="16k")


def test_bad_dtype_and_shape():
    _raises(np.ones(1000, dtype=np.complex64), "unsupported sample dtype complex64", "<array>", sr=SAMPLE_RATE)
    _raises(torch.ones(1000, dtype=torch.bool), "unsupported sample dtype", "<array>", sr=SAMPLE_RATE)
    _raises(np.zeros((2, 3, 1000), np.float32), r"must be 1-D or 2-D .* shape \(2, 3, 1000\)", "<array>",
            sr=SAMPLE_RATE)
    _raises(np.zeros((100, 200), np.float32), "has no channel axis", "<array>", sr=SAMPLE_RATE)
    _raises(["not", "audio"], "unsupported audio source type list", "<input>")
