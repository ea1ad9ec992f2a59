"""Whisper log-mel front end: filters and features against the official fixtures and HF's extractor.

Oracles: `whisper_features` fixtures (the reference's own filterbank and log-mel of real speech), and
transformers' `mel_filter_bank` / `WhisperFeatureExtractor` (test-only) on random audio and on speech.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from kimia.audio import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    pad_or_trim,
)
from kimia.errors import AudioError
from tests.reference import assert_close, fixture_params, require

HF_TOL = {"atol": 1e-4, "rtol": 0.0}
GLM_MULTIPLE = 1 * 2 * 4 * 160  # pad_to_multiple_of of the GLM-4-Voice tokenizer's feature extractor


def _fixture_wavs(fx) -> list[Path]:
    """The wav inputs named in the manifest, resolved relative to the fixture folder."""
    names = [s.strip() for s in fx.manifest["inputs"].split(",") if s.strip()]
    paths = [(fx.path / n).resolve() for n in names]
    assert paths and all(p.is_file() for p in paths), f"fixture inputs not found: {paths}"
    return paths


@pytest.fixture(scope="module")
def espeak_clip(tmp_path_factory) -> torch.Tensor:
    """A real synthetic utterance made by espeak-ng (22050 Hz), loaded and resampled to 16 kHz."""
    exe = shutil.which("espeak-ng")
    assert exe, "espeak-ng is required for this test (apt-get install espeak-ng)"
    out = tmp_path_factory.mktemp("espeak") / "clip.wav"
    subprocess.run([exe, "-v", "en-us", "-s", "160", "-w", str(out), "The quick brown fox jumps over the lazy dog."],
                   check=True, capture_output=True, timeout=60)
    return load_audio(out)


def _hf_features(audio: list[np.ndarray], n_mels: int, **kw) -> torch.Tensor:
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    return fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", **kw)["input_features"]


# ------------------------------------------------------------------------------------------- filters
@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    expected = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                               max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
                               mel_scale="slaney")
    got = mel_filters(n_mels)
    assert got.dtype == torch.float32 and tuple(got.shape) == (n_mels, 201)
    assert_close(got, torch.from_numpy(expected.T.copy()).float(), {"atol": 1e-7, "rtol": 1e-5}, f"mel_{n_mels}")


def test_mel_filters_cached_per_device():
    assert mel_filters(80) is mel_filters(80)
    assert mel_filters(80) is not mel_filters(128)


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("whisper_features"))
def test_mel_filters_match_reference(fx):
    fx = require(fx, "whisper_features")
    filters = fx.tensors("mel_filters.safetensors")
    for key, expected in filters.items():
        n_mels = int(key.split("_")[-1])
        assert_close(mel_filters(n_mels), expected, {"atol": 1e-7, "rtol": 1e-5}, f"{fx}: {key}")


# ------------------------------------------------------------------------------------------- features
@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("whisper_features"))
def test_logmel_matches_reference(fx):
    fx = require(fx, "whisper_features")
    expected = fx.tensors()
    n_mels = int(fx.manifest.get("whisper_config", {}).get("num_mel_bins", 128))
    for wav in _fixture_wavs(fx):
        key = f"{wav.stem}.logmel_seg0"
        assert key in expected, f"{fx}: no {key}"
        audio = load_audio(wav)
        got = log_mel_spectrogram(pad_or_trim(audio[:N_SAMPLES]), n_mels)
        assert_close(got, expected[key], fx.tol("logmel"), f"{fx}: {key}")


@pytest.mark.parametrize("n_mels", [80, 128])
def test_logmel_30s_matches_hf_random_and_speech(n_mels, espeak_clip):
    fx_wavs = [p for f in fixture_params("whisper_features") if f.values[0] for p in _fixture_wavs(f.values[0])]
    g = torch.Generator().manual_seed(1)
    clips = [0.3 * torch.randn(37_123, generator=g), espeak_clip] + [load_audio(p) for p in fx_wavs]
    for i, clip in enumerate(clips):
        clip = clip[:N_SAMPLES]
        expected = _hf_features([clip.numpy()], n_mels, padding="max_length")[0]
        got = log_mel_spectrogram(pad_or_trim(clip), n_mels)
        assert got.shape == (n_mels, N_FRAMES)
        assert_close(got, expected, HF_TOL, f"clip {i}, {n_mels} mels, 30 s padding")


@pytest.mark.parametrize("n_mels", [80, 128])
def test_logmel_longest_batch_matches_hf(n_mels, espeak_clip):
    """padding='longest' with pad_to_multiple_of=1280, batched with per-example dynamic range."""
    g = torch.Generator().manual_seed(2)
    clips = [espeak_clip, 0.05 * torch.randn(20_011, generator=g), espeak_clip[:9_999] * 0.01]
    expected = _hf_features([c.numpy() for c in clips], n_mels, padding="longest", pad_to_multiple_of=GLM_MULTIPLE)
    longest = max(c.shape[0] for c in clips)
    total = -(-longest // GLM_MULTIPLE) * GLM_MULTIPLE
    batch = torch.stack([pad_or_trim(c, total) for c in clips])
    got = log_mel_spectrogram(batch, n_mels)
    assert got.shape == (len(clips), n_mels, total // 160)
    assert_close(got, expected, HF_TOL, f"{n_mels} mels, longest batch")
    # The `padding` argument gives the same thing for one clip.
    single = log_mel_spectrogram(clips[0], n_mels, padding=total - clips[0].shape[0])
    assert_close(single, expected[0], HF_TOL, "single clip through padding=")


def test_logmel_shapes_and_errors():
    x = torch.randn(1600)
    assert log_mel_spectrogram(x, 80).shape == (80, 10)
    assert log_mel_spectrogram(x.numpy(), 80, padding=160).shape == (80, 11)
    assert log_mel_spectrogram(x.double()[None], 80).dtype == torch.float32
    with pytest.raises(AudioError, match="needs more than 200"):
        log_mel_spectrogram(torch.randn(100))
    with pytest.raises(AudioError, match="must be"):
        log_mel_spectrogram(torch.randn(1, 1, 1000))


def test_cached_mel_constants_survive_an_inference_mode_first_caller():
    """The filterbanks and windows are cached per device: made first under torch.inference_mode (an eval
    tool), they must still serve a later differentiable call (vocoder training's mel loss)."""
    from kimia import audio as whisper_audio
    from kimia.detokenizer import mel as mel24

    mel24._WINDOWS.clear()
    mel24._FILTERS.clear()
    whisper_audio._MEL_CACHE.clear()
    wav = torch.randn(1, 4800)
    with torch.inference_mode():
        mel24.mel_spectrogram(wav)
        whisper_audio.mel_filters(80)
    x = wav.clone().requires_grad_(True)
    mel24.mel_spectrogram(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    f = whisper_audio.mel_filters(80)
    w = torch.ones(f.shape[0], requires_grad=True)
    (w @ f).sum().backward()
    assert not f.is_inference()
