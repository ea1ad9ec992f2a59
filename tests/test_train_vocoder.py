"""Vocoder recipe: the shared 24 kHz mel and the discriminators/losses against the `bigvgan` package (test-only
oracle, random weights), then a few GAN steps: the mel loss falls, a resumed run continues identically, and the
exported folder loads with `load_vocoder` and synthesises T * 480 samples."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from kimia.detokenizer.bigvgan import BigVGAN, BigVGANConfig, fold_weight_norm_state_dict, load_vocoder, save_vocoder
from kimia.detokenizer.mel import MelConfig, mel_frames, mel_spectrogram
from kimia.train.config import load_config
from kimia.train.discriminators import (DiscriminatorConfig, Discriminators, discriminator_loss,
                                        feature_matching_loss, generator_adv_loss)
from kimia.train.vocoder import VocoderRecipe, VocoderTrainConfig, train_vocoder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "vocoder_tiny.yaml"



def tiny_cfg(tmp_path: Path, *overrides: str) -> VocoderTrainConfig:
    return load_config(VocoderTrainConfig, TINY, [f"train.out_dir={tmp_path / 'run'}", "train.save_every=0",
                                                  "train.log_every=0", *overrides])


@pytest.mark.parametrize("cfg", [MelConfig(), MelConfig(n_fft=1024, hop_size=256, win_size=1024, num_mels=100)])
def test_mel_matches_bigvgan_meldataset(cfg):
    from bigvgan.meldataset import mel_spectrogram as ref

    g = torch.Generator().manual_seed(1)
    wav = (0.3 * torch.randn(2, cfg.hop_size * 25, generator=g)).clamp(-1, 1)
    ours = mel_spectrogram(wav, cfg)
    theirs = ref(wav, cfg.n_fft, cfg.num_mels, cfg.sample_rate, cfg.hop_size, cfg.win_size, cfg.fmin, cfg.fmax)
    assert ours.shape == theirs.shape == (2, cfg.num_mels, 25)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    assert mel_frames(wav[0], cfg).shape == (25, cfg.num_mels)


def _import_bigvgan_discriminators(monkeypatch):
    """bigvgan.discriminators imports torchaudio for its CQT/band discriminators, which we neither use nor
    can install for this torch; give it an empty torchaudio.transforms when torchaudio is absent."""
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        fake, transforms = types.ModuleType("torchaudio"), types.ModuleType("torchaudio.transforms")
        transforms.Spectrogram = transforms.Resample = None
        fake.transforms = transforms
        monkeypatch.setitem(sys.modules, "torchaudio", fake)
        monkeypatch.setitem(sys.modules, "torchaudio.transforms", transforms)
    from bigvgan import discriminators

    return discriminators


def test_discriminators_and_losses_match_bigvgan(monkeypatch):
    bd = _import_bigvgan_discriminators(monkeypatch)
    from bigvgan import loss as bl
    from bigvgan.env import AttrDict

    cfg = DiscriminatorConfig.from_name("tiny")
    h = AttrDict(dict(discriminator_channel_mult=cfg.channel_mult, mrd_channel_mult=cfg.mrd_channel_mult,
                      use_spectral_norm=False, mpd_reshapes=cfg.mpd_periods, resolutions=cfg.mrd_resolutions))
    torch.manual_seed(3)
    ref_mpd, ref_mrd = bd.MultiPeriodDiscriminator(h), bd.MultiResolutionDiscriminator(h)
    for m in (ref_mpd, ref_mrd):  # perturb the weight-norm magnitudes so folding is exercised
        for n, p in m.named_parameters():
            if n.endswith("weight_g"):
                p.data.mul_(1 + 0.5 * torch.rand_like(p))
    ours = Discriminators(DiscriminatorConfig.from_name("tiny"))
    plain = Discriminators(DiscriminatorConfig(**{**cfg.to_dict(), "weight_norm": False}))
    plain.mpd.load_state_dict(fold_weight_norm_state_dict(ref_mpd.state_dict()))
    plain.mrd.load_state_dict(fold_weight_norm_state_dict(ref_mrd.state_dict()))
    g = torch.Generator().manual_seed(2)
    y, y_hat = 0.3 * torch.randn(2, 1, 4001, generator=g), 0.3 * torch.randn(2, 1, 4001, generator=g)
    real, fake, f_real, f_fake = plain(y, y_hat)
    r1, g1, fr1, fg1 = ref_mpd(y, y_hat)
    r2, g2, fr2, fg2 = ref_mrd(y, y_hat)
    for a, b in zip(real, r1 + r2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(fake, g1 + g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(discriminator_loss(real, fake), bl.discriminator_loss(r1 + r2, g1 + g2)[0])
    torch.testing.assert_close(generator_adv_loss(fake), bl.generator_loss(g1 + g2)[0])
    torch.testing.assert_close(feature_matching_loss(f_real, f_fake), bl.feature_loss(fr1 + fr2, fg1 + fg2))
    # the weight-normalised (trainable) build has the same parameter layout under parametrizations
    assert {n.replace(".parametrizations.weight.original0", ".weight_g")
            .replace(".parametrizations.weight.original1", ".weight_v") for n, _ in ours.mpd.named_parameters()} \
        == {n for n, _ in ref_mpd.named_parameters()}


def test_vocoder_trains_resumes_and_exports(tmp_path):
    cfg = tiny_cfg(tmp_path / "a", "train.steps=4")
    trainer, hist = train_vocoder(cfg)
    mel_l1 = [r["mel_l1"] for r in hist]
    assert mel_l1[-1] < 0.6 * mel_l1[0], mel_l1
    assert all("loss/disc" in r and "loss/gen" in r for r in hist)

    # resume: 2 steps, a new Trainer from the checkpoint, 2 more == 4 straight
    cfg_b = tiny_cfg(tmp_path / "b", "train.steps=4", "train.max_steps_this_run=2")
    _, h1 = train_vocoder(cfg_b)
    assert len(h1) == 2 and not (Path(cfg_b.train.out_dir) / "export").exists()
    cfg_b.train.max_steps_this_run = 0
    _, h2 = train_vocoder(cfg_b)
    assert [r["loss/gen"] for r in h1 + h2] == [r["loss/gen"] for r in hist]
    assert [r["loss/disc"] for r in h1 + h2] == [r["loss/disc"] for r in hist]

    voc = load_vocoder(Path(cfg.train.out_dir) / "export")
    mel = mel_spectrogram(trainer.data[0][: 480 * 10])
    wav = voc(mel)
    assert wav.shape == (1, 1, 4800) and torch.isfinite(wav).all()
    # the export is the trained generator with weight norm folded
    ref = trainer.raw_model.generator.eval()
    with torch.no_grad():
        torch.testing.assert_close(wav, ref(mel), atol=1e-5, rtol=1e-4)
    # continuing from the exported folder: weight norm re-parametrised, same synthesis, trainable
    again = VocoderRecipe(tiny_cfg(tmp_path / "c", f"model.generator={Path(cfg.train.out_dir) / 'export'}"))
    gen = again.build_model(torch.device("cpu")).generator.eval()
    assert all(p.requires_grad for p in gen.parameters())
    assert any("parametrizations" in n for n, _ in gen.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(gen(mel), wav, atol=1e-5, rtol=1e-4)


def test_recipe_routes_parameters_to_phases(tmp_path):
    recipe = VocoderRecipe(tiny_cfg(tmp_path))
    model = recipe.build_model(torch.device("cpu"))
    gen = {n for n, _ in recipe.phase_parameters(model, "gen")}
    disc = {n for n, _ in recipe.phase_parameters(model, "disc")}
    assert gen and disc and not gen & disc
    assert gen | disc == {n for n, _ in model.named_parameters()}


def test_reconstruction_only_training_skips_the_discriminators(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=6", "loss.adversarial=false")
    recipe = VocoderRecipe(cfg)
    assert recipe.phases == ("gen",)
    calls = []
    trainer, hist = train_vocoder(cfg)
    model = trainer.raw_model
    h = model.discriminators.register_forward_hook(lambda *a: calls.append(1))
    batch = trainer.recipe.collate([trainer.data[0], trainer.data[1]])
    out = model(batch.mel, batch.wav, "gen")
    h.remove()
    assert not calls and set(out) == {"loss", "mel_l1", "stft"}
    assert hist[-1]["mel_l1"] < hist[0]["mel_l1"]
    assert (Path(cfg.train.out_dir) / "export" / "model.safetensors").is_file()


def test_continuing_from_an_fp16_folder_trains_fp32_weights(tmp_path):
    """A shipped vocoder folder stores fp16; the generator trained on from it has fp32 master weights."""
    torch.manual_seed(0)
    plain = BigVGAN(BigVGANConfig.from_name("tiny")).half()
    folder = save_vocoder(plain, tmp_path / "voc16")
    gen = VocoderRecipe(tiny_cfg(tmp_path, f"model.generator={folder}")).build_model(torch.device("cpu")).generator
    params = list(gen.parameters())
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    mel = torch.randn(1, 80, 6)
    with torch.no_grad():
        torch.testing.assert_close(gen.eval()(mel), plain.float()(mel), atol=1e-5, rtol=1e-4)
