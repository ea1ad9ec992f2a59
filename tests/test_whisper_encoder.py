"""Continuous Whisper encoder: transformers oracle on random weights, official fixtures, CT2 packaged weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kimia.checkpoints.common import load_safetensors
from kimia.encoders.whisper import (
    ContinuousFeatureExtractor,
    WhisperEncoder,
    WhisperEncoderConfig,
    load_whisper_encoder,
    stack_frames,
)
from kimia.errors import AudioError, CheckpointError, ConfigError
from tests.reference import assert_close, fixture_params, require




def _hf_encoder(n_mels: int, d: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64, pos: int = 50):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFEncoder

    cfg = WhisperConfig(
        num_mel_bins=n_mels, d_model=d, encoder_layers=layers, encoder_attention_heads=heads,
        encoder_ffn_dim=ffn, max_source_positions=pos, decoder_layers=1, vocab_size=64,
    )
    torch.manual_seed(123)
    hf = HFEncoder(cfg).eval()
    with torch.no_grad():  # non-trivial values everywhere (HF zero-inits biases, LN at identity)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf, cfg


def _ours_from_hf(hf, cfg) -> WhisperEncoder:
    ours = WhisperEncoder(WhisperEncoderConfig.from_hf_config(cfg.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours


@pytest.mark.parametrize("n_mels", [80, 128])
def test_matches_transformers_random_weights(n_mels):
    hf, cfg = _hf_encoder(n_mels)
    ours = _ours_from_hf(hf, cfg)
    mel = torch.randn(2, n_mels, 2 * cfg.max_source_positions)
    with torch.no_grad():
        ref = hf(mel).last_hidden_state
        out = ours(mel)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_presets_and_bad_input():
    assert WhisperEncoderConfig.from_name("large-v3") == WhisperEncoderConfig(128, 1280, 32, 20, 5120, 1500)
    with pytest.raises(ConfigError):
        WhisperEncoderConfig.from_name("huge")
    with torch.device("meta"):
        enc = WhisperEncoder(WhisperEncoderConfig.from_name("tiny"))
    with pytest.raises(ConfigError, match="expects mel"):
        enc(torch.zeros(1, 128, 2999, device="meta"))
    ext = ContinuousFeatureExtractor(enc)
    with pytest.raises(AudioError, match="empty"):
        ext(torch.zeros(0))
    with pytest.raises(AudioError, match="NaN"):
        ext(torch.tensor([0.0, float("nan")]))


def test_stack_frames():
    x = torch.arange(2 * 8 * 3).reshape(2, 8, 3)
    y = stack_frames(x)
    assert y.shape == (2, 2, 12)
    assert torch.equal(y[1, 1], torch.cat([x[1, 4], x[1, 5], x[1, 6], x[1, 7]]))


def _fixture_wavs(fx) -> dict[str, torch.Tensor]:
    return fx.input_wavs()


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("whisper_features"))
def test_encoder_matches_fixture_on_fixture_logmel(fx):
    """Encoder alone on the reference's own log-mel (independent of the front end)."""
    fx = require(fx, "whisper_features")
    exp = fx.tensors()
    enc = load_whisper_encoder(fx.path / "whisper-large-v3")
    for name in {k.split(".")[0] for k in exp if k.endswith(".encoder_out_seg0")}:
        with torch.no_grad():
            out = enc(exp[f"{name}.logmel_seg0"][None])[0]
        assert_close(out, exp[f"{name}.encoder_out_seg0"], fx.tol("encoder_out_seg0"), f"{name} encoder_out_seg0")


def _hf_folder_copy(src: Path, dst: Path, rename: tuple[str, str] | None = None, drop: str | None = None) -> Path:
    from safetensors.torch import save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    sd = load_safetensors(src / "model.safetensors")
    if drop:
        del sd[drop]
    if rename:
        sd[rename[1]] = sd.pop(rename[0])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("fx", fixture_params("whisper_features"))
def test_broken_checkpoint_names_the_key(fx, tmp_path):
    fx = require(fx, "whisper_features")
    src = fx.path / "whisper-large-v3"
    bad = _hf_folder_copy(src, tmp_path / "missing", drop="encoder.layers.1.fc2.bias")
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.1\.fc2\.bias"):
        load_whisper_encoder(bad)
    bad = _hf_folder_copy(src, tmp_path / "renamed", rename=("encoder.layer_norm.weight", "encoder.layer_norm.gain"))
    with pytest.raises(CheckpointError, match=r"layer_norm\.gain"):
        load_whisper_encoder(bad)
    # the ForConditionalGeneration layout (model.encoder.*) loads too
    cfg = json.loads((src / "config.json").read_text())
    sd = {f"model.{k}": v for k, v in load_safetensors(src / "model.safetensors").items()}
    from safetensors.torch import save_file

    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(tmp_path / "cg" / "model.safetensors"))
    a, b = load_whisper_encoder(src), load_whisper_encoder(tmp_path / "cg")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("whisper_features"))
def test_features_match_fixture(fx):
    """Full path: waveform -> 30 s segments -> log-mel -> encoder -> kept frames -> [1, N, 4d]."""
    fx = require(fx, "whisper_features")
    exp = fx.tensors()
    ext = ContinuousFeatureExtractor(load_whisper_encoder(fx.path / "whisper-large-v3"), batch_size=2)
    wavs = _fixture_wavs(fx)
    names = sorted({k.split(".")[0] for k in exp if k.endswith(".features")})
    assert names and set(names) <= set(wavs)
    for name in names:
        assert_close(ext.log_mel(wavs[name][:480000]), exp[f"{name}.logmel_seg0"], fx.tol("logmel"), f"{name} logmel")
    # all files in one call: segments of different files share batches
    f50 = ext.encode_50hz([wavs[n] for n in names])
    feats = ext([wavs[n] for n in names])
    for name, a, b in zip(names, f50, feats):
        assert_close(a, exp[f"{name}.features_50hz"], fx.tol("features"), f"{name} features_50hz")
        assert_close(b, exp[f"{name}.features"], fx.tol("features"), f"{name} features")
        assert_close(ext(wavs[name]), b, fx.tol("features"), f"{name} alone vs batched")


@pytest.fixture(scope="module")
def base_encoder_and_mel():
    from kimia import audio as kaudio

    enc = load_whisper_encoder("base", dtype=torch.float32)
    wav = kaudio.load_audio(kaudio.example_path())  # real speech
    mel = kaudio.log_mel_spectrogram(kaudio.pad_or_trim(wav, kaudio.N_SAMPLES), n_mels=enc.cfg.n_mels)[None]
    with torch.no_grad():
        out = enc(mel)
    return enc, mel, out


@pytest.mark.slow
def test_packaged_base_matches_transformers(base_encoder_and_mel):
    """Real Whisper base weights (CTranslate2 package) -> our encoder == transformers' WhisperEncoder."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFEncoder

    enc, mel, out = base_encoder_and_mel
    c = enc.cfg
    assert (c.n_mels, c.d_model, c.n_layers, c.n_heads, c.ffn_dim) == (80, 512, 6, 8, 2048)
    hf = HFEncoder(WhisperConfig(num_mel_bins=c.n_mels, d_model=c.d_model, encoder_layers=c.n_layers,
                                 encoder_attention_heads=c.n_heads, encoder_ffn_dim=c.ffn_dim,
                                 max_source_positions=c.max_source_positions)).eval()
    hf.load_state_dict(enc.state_dict(), strict=True)
    with torch.no_grad():
        ref = hf(mel).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_packaged_base_matches_ctranslate2_runtime(base_encoder_and_mel):
    """Independent oracle for the CT2 -> HF key mapping (fused qkv split, norms): CTranslate2's own encoder."""
    import ctranslate2
    import numpy as np

    from kimia.checkpoints.ct2 import find_packaged_whisper

    enc, mel, out = base_encoder_and_mel
    model = ctranslate2.models.Whisper(str(find_packaged_whisper("base")), device="cpu", compute_type="float32")
    ref = torch.from_numpy(np.array(model.encode(ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True)))
    # CT2 fuses ops differently; outputs reach |x| ~ 25, so a 2e-3 band is ~1e-4 relative
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------ "clip" padding
def _clip_pair(n_mels: int, n_pos: int):
    """An HF encoder built for exactly `n_pos` positions, and ours (1500 positions) sharing its weights in
    the first `n_pos` position rows: the oracle for encoding a clip at its own length."""
    hf, cfg = _hf_encoder(n_mels, pos=n_pos)
    ours = WhisperEncoder(WhisperEncoderConfig(n_mels=n_mels, d_model=32, n_layers=2, n_heads=4, ffn_dim=64)).eval()
    sd = dict(hf.state_dict())
    sd["embed_positions.weight"] = torch.cat([sd["embed_positions.weight"], torch.randn(1500 - n_pos, 32)])
    ours.load_state_dict(sd, strict=True)
    return hf, ours


def test_clip_padding_matches_transformers_encoder_and_feature_extractor():
    """A 0.9 s clip: our "clip" features equal HF's log-mel of the clip zero-padded to 12 x 1280 samples
    (WhisperFeatureExtractor, max_length) through an HF encoder of exactly 48 positions, frames stacked by 4."""
    from transformers import WhisperFeatureExtractor

    wave = torch.randn(14400, generator=torch.Generator().manual_seed(0)) * 0.1  # 12 tokens (ceil(14400 / 1280))
    hf, ours = _clip_pair(80, 48)
    fe = WhisperFeatureExtractor(feature_size=80)
    mel = fe([wave.numpy()], sampling_rate=16000, return_tensors="pt", padding="max_length",
             max_length=12 * 1280)["input_features"]
    assert mel.shape == (1, 80, 96)
    with torch.no_grad():
        ref = stack_frames(hf(mel).last_hidden_state)
    got = ContinuousFeatureExtractor(ours, padding="clip")(wave)
    assert got.shape == (1, 12, 128)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # the official padding gives other values (the padded 30 s is attended to): the mode matters
    seg = ContinuousFeatureExtractor(ours)(wave)
    assert seg.shape == got.shape and not torch.allclose(seg, got, atol=1e-3)


def test_clip_padding_batches_like_single_clips_and_full_segments_like_the_official_mode():
    torch.manual_seed(0)
    enc = WhisperEncoder(WhisperEncoderConfig(n_mels=80, d_model=32, n_layers=2, n_heads=4, ffn_dim=64)).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(1)
    waves = [torch.randn(n, generator=g) * 0.1 for n in (5000, 14400, 5000, 40000)]
    clip = ContinuousFeatureExtractor(enc, padding="clip", batch_size=8)
    together = clip(waves)
    for w, t in zip(waves, together):  # shared batches (equal lengths only) never change a clip's features
        torch.testing.assert_close(t, clip(w), atol=1e-6, rtol=1e-5)
        assert t.shape[1] == (w.shape[0] - 1) // 1280 + 1
    # 45 s: the first 30 s segment is not padded in either mode, so its features are the official ones
    long = torch.randn(720000, generator=g) * 0.1
    a, b = clip(long), ContinuousFeatureExtractor(enc)(long)
    assert a.shape == b.shape == (1, 563, 128)
    torch.testing.assert_close(a[:, :375], b[:, :375], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 375:], b[:, 375:], atol=1e-3)  # the short last segment differs
    with pytest.raises(ConfigError, match="padding"):
        ContinuousFeatureExtractor(enc, padding="none")
    with pytest.raises(ConfigError, match="expects mel"):
        enc(torch.zeros(1, 80, 3002))


def test_a_shared_feature_cache_keeps_the_two_paddings_apart(tmp_path):
    """Training caches features per audio file: a run in the other padding mode must not be served them."""
    import soundfile as sf

    from kimia.train.data import AudioCache

    torch.manual_seed(0)
    enc = WhisperEncoder(WhisperEncoderConfig(n_mels=80, d_model=32, n_layers=2, n_heads=4, ffn_dim=64)).eval()
    wav = tmp_path / "a.wav"
    sf.write(wav, (torch.randn(20000, generator=torch.Generator().manual_seed(1)) * 0.1).numpy(), 16000)
    got = {pad: AudioCache(token_offset=0, features=ContinuousFeatureExtractor(enc, padding=pad),
                           cache_dir=tmp_path / "cache").get(wav)["features"] for pad in ("segment", "clip")}
    for pad, feats in got.items():
        direct = ContinuousFeatureExtractor(enc, padding=pad)(wav)[0]
        torch.testing.assert_close(feats, direct, atol=1e-6, rtol=1e-5)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
