"""GLM-4-Voice semantic tokenizer against the official-implementation fixtures, plus loader and batching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kimia.checkpoints.common import load_safetensors
from kimia.encoders.semantic import (
    SemanticTokenizerConfig,
    block_causal_mask,
    load_semantic_tokenizer,
    nearest_code,
)
from kimia.errors import CheckpointError, ConfigError
from tests.reference import assert_close, fixture_params, require

KIND = "semantic_tokenizer"


def _wavs(fx) -> dict[str, torch.Tensor]:
    return fx.input_wavs()


def _segments(wav: torch.Tensor) -> list[torch.Tensor]:
    return [wav[s : s + 480000] for s in range(0, wav.shape[0], 480000)]


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_matches_reference(fx):
    fx = require(fx, KIND)
    exp = fx.tensors()
    tok = load_semantic_tokenizer(fx.path)
    wavs = _wavs(fx)
    names = sorted({k.split(".")[0] for k in exp})
    assert names and set(names) <= set(wavs), f"fixture names {names} vs inputs {sorted(wavs)}"
    for name in names:
        segs = _segments(wavs[name])
        mel, mask = tok.features(segs)
        if f"{name}.input_features" in exp:
            assert_close(mel, exp[f"{name}.input_features"], fx.tol("input_features"), f"{name} input_features")
            assert_close(mask.long(), exp[f"{name}.attention_mask"], fx.tol("attention_mask"), f"{name} mask")
        out = tok.encoder(mel, mask)
        assert_close(out.pooled, exp[f"{name}.pooled_pre_vq"], fx.tol("pooled_pre_vq"), f"{name} pooled_pre_vq")
        assert_close(out.mask.to(torch.uint8), exp[f"{name}.pooled_mask"], fx.tol("pooled_mask"), f"{name} mask")
        ids = tok.tokenize(wavs[name])
        assert_close(ids, exp[f"{name}.token_ids"], fx.tol("token_ids"), f"{name} token_ids")
        if (fx.path / "token_ids.json").is_file():
            assert ids[0].tolist() == fx.json("token_ids.json")[name]
        # N = sum over segments of ceil(L / 1280)
        assert ids.shape[1] == sum((s.shape[0] - 1) // 1280 + 1 for s in segs)


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_batched_files_equal_one_by_one(fx):
    fx = require(fx, KIND)
    tok = load_semantic_tokenizer(fx.path)
    wavs = list(_wavs(fx).values())
    # plus a short file and a tiny one (one token). Lengths stay >= 200 samples below a multiple of 1280:
    # closer than that, the reference's STFT reflect-pads real samples alone but zeros inside a longer batch.
    inputs = wavs + [wavs[0][: 1280 * 7 - 500], wavs[-1][:1000]]
    singles = [tok.tokenize(w) for w in inputs]
    tok.batch_size = 2  # forces segments of different files into shared and split batches
    paths = [str(p) for p in fx.input_paths()]
    batched = tok.tokenize(paths + inputs[len(paths) :])  # the fixture files by path this time
    assert len(batched) == len(inputs)
    for a, b in zip(singles, batched):
        assert torch.equal(a, b)
    assert singles[-1].shape == (1, 1)


def _copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in ("config.json", "preprocessor_config.json"):
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    sd = dict(load_safetensors(src / "model.safetensors"))
    edit(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_loader_is_strict(fx, tmp_path):
    fx = require(fx, KIND)
    keys = load_safetensors(fx.path / "model.safetensors").keys()
    assert {"ema_count", "ema_weight", "embed_positions2.weight"} <= set(keys)  # ignored, not missing
    bad = _copy(fx.path, tmp_path / "missing", lambda sd: sd.pop("layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.0\.self_attn\.k_proj\.weight"):
        load_semantic_tokenizer(bad)
    bad = _copy(fx.path, tmp_path / "renamed", lambda sd: sd.__setitem__("codebook.embedding", sd.pop("codebook.weight")))
    with pytest.raises(CheckpointError, match=r"codebook\.embedding"):
        load_semantic_tokenizer(bad)
    bad = _copy(fx.path, tmp_path / "shape", lambda sd: sd.__setitem__("conv1.bias", sd["conv1.bias"][:-1].clone()))
    with pytest.raises(CheckpointError, match=r"conv1\.bias"):
        load_semantic_tokenizer(bad)
    (tmp_path / "cfg").mkdir()
    cfg = json.loads((fx.path / "config.json").read_text())
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**cfg, "quantize_encoder_only": False}))
    with pytest.raises(ConfigError, match="quantize_encoder_only"):
        load_semantic_tokenizer(tmp_path / "cfg")


def test_block_causal_mask_and_vq_against_naive():
    key = torch.tensor([[1] * 9 + [0] * 2, [1] * 11]).bool()
    m = block_causal_mask(key, block=4)
    for b in range(2):
        for i in range(11):
            for j in range(11):
                want = (j <= i or j // 4 == i // 4) and bool(key[b, j])
                assert bool(m[b, 0, i, j]) == want
    x, cb = torch.randn(3, 5, 8), torch.randn(50, 8)
    naive = ((x[..., None, :] - cb) ** 2).sum(-1).argmin(-1)
    assert torch.equal(nearest_code(x, cb), naive)


def test_presets():
    glm = SemanticTokenizerConfig.from_name("glm-4-voice")
    assert (glm.d_model, glm.n_heads, glm.quantize_position, glm.quantize_vocab_size) == (1280, 20, 16, 16384)
    assert glm.samples_per_token == 1280
    with pytest.raises(ConfigError):
        SemanticTokenizerConfig.from_name("nope")
    with pytest.raises(ConfigError):
        SemanticTokenizerConfig(pooling_position=3, quantize_position=2)
