"""BigVGAN-v2 vocoder: golden fixtures of the official code, the `bigvgan` package as oracle on random
weights, weight-norm folding, strict loading and the native save/load round trip."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from kimia.detokenizer.alias_free import AA_KERNEL, AA_RATIO, kaiser_sinc_lowpass
from kimia.detokenizer.bigvgan import (
    PRESETS,
    BigVGAN,
    BigVGANConfig,
    fold_weight_norm_state_dict,
    load_vocoder,
    save_vocoder,
)
from kimia.errors import AudioError, CheckpointError, ConfigError
from tests.reference import assert_close, fixture_params, require

# fp32 against another fp32 implementation of the same maths (fixtures README: "vocoder 1e-5").
ORACLE_TOL = {"atol": 1e-5, "rtol": 1e-4}


def _perturb_(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (log-snake params are zeros, biases small) so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("alpha", "beta")):
                p.add_(0.3 * noise)
            elif name.endswith("bias"):
                p.add_(0.02 * noise)
            elif name.endswith(("weight_g", "original0")):
                p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=g))


# ------------------------------------------------------------------------------------------ fixtures
@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("vocoder"))
def test_reference_vocoder_mel_to_wav(fx):
    fx = require(fx, "vocoder")
    model = load_vocoder(fx.path)
    t = fx.tensors()
    mel, expected = t["mel"], t["wav"]
    with torch.no_grad():
        wav = model(mel)
    assert_close(wav, expected, fx.tol("wav"), f"{fx} wav")
    assert wav.shape[-1] == mel.shape[-1] * model.config.hop_size
    # Frame-major convenience gives the same samples as [B, T*hop].
    assert_close(model.decode_mel(mel[0].T), expected[:, 0], fx.tol("wav"), f"{fx} decode_mel")


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("vocoder"))
def test_reference_filters_match_our_design(fx):
    """Anti-aliasing filters stored by the official code equal the kaiser-sinc we compute ourselves."""
    fx = require(fx, "vocoder")
    sd = torch.load(fx.path / "model.pt", weights_only=True)["generator"]
    ours = kaiser_sinc_lowpass(0.5 / AA_RATIO, 0.6 / AA_RATIO, AA_KERNEL)
    filters = {k: v for k, v in sd.items() if k.endswith(".filter")}
    assert filters, "no filter buffers in the fixture checkpoint"
    for k, v in filters.items():
        assert_close(ours, v, {"atol": 1e-7, "rtol": 0.0}, k)


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("detokenizer"))
def test_detokenizer_fixture_vocoder_loads_and_runs(fx):
    fx = require(fx, "detokenizer")
    model = load_vocoder(fx.path / "vocoder")
    hop = model.config.hop_size
    mel = fx.tensors()["stream0.mel"][:16]  # [T, 80]: a mel the DiT actually produced (kept short)
    with torch.no_grad():
        wav = model(mel.T[None])
    assert wav.shape == (1, 1, mel.shape[0] * hop)
    assert torch.isfinite(wav).all() and wav.abs().max() <= 1.0
    assert wav.std() > 0
    assert model.decode_mel(mel).shape == (1, mel.shape[0] * hop)


# ------------------------------------------------------------------------------------------ oracle
def _oracle_config(cfg: BigVGANConfig) -> dict:
    return {**cfg.to_dict(), "num_gpus": 0}


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # tiny: resblock 1, snakebeta, log-scale, clamp at the end, no final bias
        dict(resblock="2", activation="snake", snake_logscale=False, use_tanh_at_final=True, use_bias_at_final=True),
    ],
    ids=["tiny-amp1-snakebeta", "amp2-snake-tanh"],
)
def test_parity_with_bigvgan_package(overrides):
    from bigvgan.bigvgan import BigVGAN as OracleBigVGAN  # test-only oracle
    from bigvgan.env import AttrDict

    cfg = dataclasses.replace(BigVGANConfig.from_name("tiny"), **overrides)
    torch.manual_seed(1)
    oracle = OracleBigVGAN(AttrDict(_oracle_config(cfg)), use_cuda_kernel=False).eval()
    _perturb_(oracle, seed=2)
    sd = oracle.state_dict()
    assert any(k.endswith("weight_g") for k in sd)

    with torch.device("meta"):
        ours = BigVGAN(cfg)
    from kimia.checkpoints.common import load_state_dict_strict

    load_state_dict_strict(ours, fold_weight_norm_state_dict(sd), source="oracle")
    ours.eval()
    mel = torch.randn(2, cfg.num_mels, 13, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = oracle(mel)
        actual = ours(mel)
    assert actual.shape == (2, 1, 13 * cfg.hop_size)
    assert_close(actual, expected, ORACLE_TOL, "bigvgan package parity")


# ------------------------------------------------------------------------------------------ weight norm
def test_fold_weight_norm_equals_parametrized_module():
    cfg = BigVGANConfig.from_name("tiny")
    torch.manual_seed(4)
    trainable = BigVGAN(cfg, weight_norm=True).eval()
    _perturb_(trainable, seed=5)
    sd = trainable.state_dict()
    assert any(k.endswith("parametrizations.weight.original0") for k in sd)
    mel = torch.randn(1, cfg.num_mels, 9, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = trainable(mel)
        plain = BigVGAN(cfg).eval()
        plain.load_state_dict(fold_weight_norm_state_dict(sd), strict=True)
        assert_close(plain(mel), expected, ORACLE_TOL, "state-dict fold")
        trainable.fold_weight_norm()
        assert not any("parametrizations" in k for k in trainable.state_dict())
        assert_close(trainable(mel), expected, ORACLE_TOL, "in-place fold")


def test_release_dims_parameter_count_with_weight_norm():
    """KIMI_AUDIO.md 6.4: the release dims give 241 114 722 generator params (legacy weight norm, final bias)."""
    cfg = dataclasses.replace(BigVGANConfig.from_name("kimi-audio"), use_bias_at_final=True)
    with torch.device("meta"):
        model = BigVGAN(cfg)
    # Legacy weight norm (dim=0) adds one magnitude per leading-axis slice of every weighted conv.
    magnitudes = sum(conv.weight.shape[0] for conv in model.weighted_convs())
    assert model.num_parameters() + magnitudes == 241_114_722


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("vocoder"))
def test_renamed_key_fails_naming_it(fx, tmp_path):
    fx = require(fx, "vocoder")
    sd = dict(torch.load(fx.path / "model.pt", weights_only=True)["generator"])
    old = next(k for k in sd if k.endswith(".act.alpha"))
    new = old.replace(".act.alpha", ".act.alfa")
    sd[new] = sd.pop(old)
    shutil.copy(fx.path / "config.json", tmp_path / "config.json")
    torch.save({"generator": sd}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as err:
        load_vocoder(tmp_path)
    assert old in str(err.value) and new in str(err.value)


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("vocoder"))
def test_native_round_trip(fx, tmp_path):
    fx = require(fx, "vocoder")
    official = load_vocoder(fx.path / "model.pt")
    save_vocoder(official, tmp_path / "native")
    native = load_vocoder(tmp_path / "native")
    assert native.config == official.config
    assert json.loads((tmp_path / "native" / "config.json").read_text())["segment_size"] == fx.json("config.json")["segment_size"]
    mel = fx.tensors()["mel"]
    with torch.no_grad():
        assert torch.equal(native(mel), official(mel))
    # An already-folded state dict in the release's pickle layout loads too.
    (tmp_path / "folded").mkdir()
    shutil.copy(fx.path / "config.json", tmp_path / "folded" / "config.json")
    torch.save({"generator": official.state_dict()}, tmp_path / "folded" / "model.pt")
    with torch.no_grad():
        assert torch.equal(load_vocoder(tmp_path / "folded")(mel), official(mel))
    with pytest.raises(CheckpointError):
        load_vocoder(tmp_path / "missing")


def test_dtype_and_bad_inputs(tmp_path):
    torch.manual_seed(7)
    save_vocoder(BigVGAN(BigVGANConfig.from_name("tiny")), tmp_path)
    model = load_vocoder(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.decode_mel(torch.randn(5, 80)).shape == (1, 5 * 480)
    with pytest.raises(AudioError):
        model(torch.randn(1, 79, 5, dtype=torch.bfloat16))
    with pytest.raises(AudioError):
        model(torch.randn(80, 5, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------ config
def test_config_json_keeps_unknown_keys_and_validates(tmp_path):
    data = {**BigVGANConfig.from_name("tiny").to_dict(), "n_fft": 1920, "fmax": None}
    (tmp_path / "c.json").write_text(json.dumps(data))
    cfg = BigVGANConfig.from_json(tmp_path / "c.json")
    assert cfg.extra == {"n_fft": 1920, "fmax": None}
    assert cfg.to_dict() == data
    for name in PRESETS:
        c = BigVGANConfig.from_name(name)
        assert c.hop_size == 480 and c.num_mels == 80
    with pytest.raises(ConfigError):
        BigVGANConfig.from_name("huge")
    with pytest.raises(ConfigError):
        BigVGANConfig.from_dict({**data, "upsample_rates": [8, 6, 9]})  # product != hop
    with pytest.raises(ConfigError):
        BigVGANConfig.from_dict({**data, "resblock": "3"})
    with pytest.raises(ConfigError):
        BigVGANConfig.from_json(tmp_path / "nope.json")
    # Legacy configs without the final-layer switches get the original defaults (tanh, bias).
    legacy = {k: v for k, v in data.items() if k not in ("use_tanh_at_final", "use_bias_at_final")}
    assert BigVGANConfig.from_dict(legacy).use_tanh_at_final and BigVGANConfig.from_dict(legacy).use_bias_at_final
