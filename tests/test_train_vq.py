"""Semantic VQ tokenizer recipe: CTC text labels, the inference front end, EMA codebook properties, Whisper
initialisation (80-mel), a few training steps on a tiny manifest of synthetic clips (loss falls, resume is
exact) and the exported folder loading with `load_semantic_tokenizer` and producing the trained model's ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from kimia.encoders.semantic import SemanticTokenizer, load_semantic_tokenizer, nearest_code
from kimia.encoders.whisper import WhisperEncoder, WhisperEncoderConfig, load_whisper_encoder
from kimia.encoders.layers import init_encoder_weights
from kimia.errors import ConfigError
from kimia.train.config import load_config
from kimia.train.vq import (CHARS, SemanticVQModel, SyntheticToneASR, VQRecipe, VQSpec, VQTrainConfig, decode_ctc,
                            encode_text, encoder_config, semantic_features, train_vq)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "vq_tiny.yaml"



def tiny_cfg(tmp_path: Path, *overrides: str) -> VQTrainConfig:
    return load_config(VQTrainConfig, TINY, [f"train.out_dir={tmp_path / 'run'}", "train.save_every=0",
                                             "train.log_every=0", *overrides])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """<root>/audio/*.wav (16 kHz tone-alphabet clips) + <root>/manifests/asr.jsonl with relative paths, as
    `kimia data synth` lays a corpus out (plus a record without text, which must be skipped)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    (root / "manifests").mkdir()
    src = SyntheticToneASR(12, seed=5)
    lines = []
    for i in range(len(src)):
        wav, text = src[i]
        sf.write(root / "audio" / f"{i}.wav", wav.numpy(), 16000, subtype="FLOAT")
        lines.append(json.dumps({"index": i, "audio_path": f"audio/{i}.wav", "text": text.upper() + "!"}))
    lines.append(json.dumps({"index": 99, "audio_path": "audio/0.wav", "text": None}))
    (root / "manifests" / "asr.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifests" / "asr.jsonl"


def test_text_labels_and_ctc_decoding():
    ids = encode_text("  Héllo,  WORLD's 42-x ")
    assert "".join(CHARS[i - 1] for i in ids) == "hello world's 42 x"
    assert all(0 < i <= len(CHARS) for i in ids)
    assert decode_ctc([0, 9, 9, 0, 9, 1, 1, 0]) == "hh "


def test_features_are_the_inference_front_end():
    cfg, _ = encoder_config(VQRecipe(VQTrainConfig()).cfg.model)
    model = SemanticVQModel(cfg, VQSpec(), 1, 4)
    tok = SemanticTokenizer(model.encoder)
    waves = [SyntheticToneASR(2)[i][0] for i in range(2)]
    mel, mask = semantic_features(waves, cfg)
    ref_mel, ref_mask = tok.features(waves)
    assert torch.equal(mel, ref_mel) and torch.equal(mask, ref_mask)


def test_ema_step_without_memory_is_a_kmeans_step_and_restarts_take_batch_vectors():
    cfg, _ = encoder_config(VQRecipe(VQTrainConfig()).cfg.model)
    cfg.quantize_vocab_size = 8
    model = SemanticVQModel(cfg, VQSpec(ema_decay=0.0, eps=1e-12, restart_interval=1, restart_threshold=0.5), 1, 4)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, cfg.d_model, generator=g)
    model.init_codebook(z)
    assert float(model.ema_count.sum()) == 8
    old = model.encoder.codebook.weight.clone()
    ids = nearest_code(z, old) % 4  # codes 4..7 unused
    model.ema_update(z, ids)
    cb = model.encoder.codebook.weight
    used = ids.unique()
    for k in used:
        torch.testing.assert_close(cb[k], z[ids == k].mean(0), atol=1e-4, rtol=1e-4)
    dead = [k for k in range(8) if k not in used.tolist()]
    assert len(dead) >= 4
    for k in dead:  # restarted with a vector of the batch
        assert (z - cb[k]).abs().amax(1).min() < 1e-6
        assert float(model.ema_count[k]) == 1.0


def test_whisper_initialisation_with_80_mels(tmp_path):
    """model.init whisper:<folder>: conv/positions/first k layers copied from an HF-layout Whisper encoder."""
    wcfg = WhisperEncoderConfig(n_mels=80, d_model=64, n_layers=3, n_heads=4, ffn_dim=128)
    enc = WhisperEncoder(wcfg)
    init_encoder_weights(enc, torch.Generator().manual_seed(1))
    from safetensors.torch import save_file

    save_file({f"model.encoder.{k}": v.contiguous() for k, v in enc.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "num_mel_bins": 80, "d_model": 64, "encoder_layers": 3, "encoder_attention_heads": 4,
        "encoder_ffn_dim": 128, "max_source_positions": 1500}))
    cfg = tiny_cfg(tmp_path, f"model.init=whisper:{tmp_path}", "model.layers=2")
    recipe = VQRecipe(cfg)
    assert recipe.enc_cfg.num_mel_bins == 80 and recipe.enc_cfg.quantize_position == 2
    model = recipe.build_model(torch.device("cpu"))
    ref = load_whisper_encoder(tmp_path).state_dict()
    for k, v in model.encoder.state_dict().items():
        if k != "codebook.weight":
            assert torch.equal(v, ref[k]), k
    assert not model.encoder.codebook.weight.requires_grad
    batch = recipe.collate([SyntheticToneASR(2)[i] for i in range(2)])
    assert batch.mel.shape[1] == 80
    out = model(batch.mel, batch.mask, batch.labels, batch.label_lengths)
    assert torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match="model.layers"):
        VQRecipe(tiny_cfg(tmp_path, f"model.init=whisper:{tmp_path}", "model.layers=4"))


def test_vq_trains_resumes_and_exports(tmp_path, corpus):
    over = [f"data.manifests=[{corpus}]", "data.synthetic=0", "train.steps=12"]
    cfg = tiny_cfg(tmp_path / "a", *over)
    trainer, hist = train_vq(cfg)
    assert len(trainer.data) == 12  # the record without text was skipped
    ctc = [r["ctc"] for r in hist]
    assert sum(ctc[-3:]) < 0.85 * sum(ctc[:3]), ctc

    cfg_b = tiny_cfg(tmp_path / "b", *over, "train.steps=12", "train.max_steps_this_run=5")
    _, h1 = train_vq(cfg_b)
    cfg_b.train.max_steps_this_run = 0
    t2, h2 = train_vq(cfg_b)
    assert [r["loss"] for r in h1 + h2] == [r["loss"] for r in hist]
    assert torch.equal(t2.raw_model.encoder.codebook.weight, trainer.raw_model.encoder.codebook.weight)

    tok = load_semantic_tokenizer(Path(cfg.train.out_dir) / "export")
    assert tok.encoder.cfg.quantize_vocab_size == 64
    wav, _ = trainer.data[3]
    ids = tok(wav)
    assert ids.shape == (1, -(-wav.shape[0] // 1280)) and 0 <= int(ids.min()) and int(ids.max()) < 64
    model = trainer.raw_model.eval()
    with torch.no_grad():
        batch = trainer.recipe.collate([trainer.data[3]])
        expect = model.encoder(batch.mel, batch.mask)
    assert torch.equal(ids[0], expect.ids[0][expect.mask[0]])


def test_runs_through_the_train_cli(tmp_path, monkeypatch):
    """`kimia train vq --config ... overrides` once the entry is registered (as kimia.train.cli expects)."""
    from kimia.train import cli

    monkeypatch.setitem(cli.RECIPES, "vq", cli.RecipeEntry(lambda: VQTrainConfig, train_vq, "semantic tokenizer"))
    out = tmp_path / "run"
    rc = cli.main(["vq", "--config", str(TINY), f"train.out_dir={out}", "train.steps=2", "train.save_every=0",
                   "data.synthetic=4"])
    assert rc == 0
    assert load_semantic_tokenizer(out / "export").encoder.cfg.quantize_vocab_size == 64
    assert cli.main(["vq", "--config", str(TINY), "model.codebook_size=many"]) == 2  # typed config error


@pytest.mark.slow
def test_packaged_whisper_base_start_uses_80_mels():
    """The real starting point: the packaged Whisper base (CTranslate2), first 2 of 6 layers."""
    recipe = VQRecipe(load_config(VQTrainConfig, ROOT / "configs" / "train" / "vq_small.yaml", ["model.layers=2"]))
    assert (recipe.enc_cfg.num_mel_bins, recipe.enc_cfg.d_model, recipe.enc_cfg.quantize_position) == (80, 512, 2)
    model = recipe.build_model(torch.device("cpu"))
    ref = load_whisper_encoder("base").state_dict()
    assert torch.equal(model.encoder.layers[1].fc2.weight, ref["layers.1.fc2.weight"])
    assert torch.equal(model.encoder.conv1.weight, ref["conv1.weight"])
    batch = recipe.collate([SyntheticToneASR(2)[i] for i in range(2)])
    out = model(batch.mel, batch.mask, batch.labels, batch.label_lengths)
    assert torch.isfinite(out["loss"]) and out["perplexity"] > 1
