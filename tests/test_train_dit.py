"""Flow-matching DiT recipe: the training forward equals the inference DiT (first chunk) and the streaming
prefix-cache path (later chunks); the flow-matching pair follows §6.1; a few steps on a tiny manifest lower a
fixed-batch loss; resume is exact; the export plus a vocoder folder drive the StreamingDetokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from kimia.detokenizer.bigvgan import BigVGAN, BigVGANConfig, save_vocoder
from kimia.detokenizer.dit import DiTConfig, to_timestep
from kimia.detokenizer.loader import load_detokenizer, load_dit
from kimia.detokenizer.stream import StreamConfig
from kimia.errors import ConfigError
from kimia.train.config import load_config
from kimia.train.dit import (DiTRecipe, DiTTrainConfig, FlowMatchingDiT, FlowSpec, flow_pair, masked_dit_forward, train_dit)
from kimia.train.vocoder import SyntheticVoiced
from kimia.train.vq import VQRecipe, VQTrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "dit_tiny.yaml"



@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    """A tiny (random-weight, data-initialised codebook) semantic tokenizer written by the VQ recipe's export."""
    folder = tmp_path_factory.mktemp("tok")
    recipe = VQRecipe(load_config(VQTrainConfig, ROOT / "configs" / "train" / "vq_tiny.yaml"))
    torch.manual_seed(0)
    model = recipe.build_model(torch.device("cpu"))
    model.init_codebook(torch.randn(256, recipe.enc_cfg.d_model))
    recipe.export(model.state_dict(), folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "target").mkdir()
    (root / "manifests").mkdir()
    src = SyntheticVoiced(6, seed=3, seconds=1.5)
    lines = []
    for i in range(len(src)):
        sf.write(root / "target" / f"{i}.wav", src[i].numpy(), 24000, subtype="FLOAT")
        lines.append(json.dumps({"index": i, "audio_path": f"in/{i}.wav", "target_audio_path": f"target/{i}.wav"}))
    lines.append(json.dumps({"index": 9, "audio_path": "in/9.wav", "target_audio_path": None}))
    (root / "manifests" / "s2s.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifests" / "s2s.jsonl"


def tiny_cfg(tmp_path: Path, tok: Path, *overrides: str) -> DiTTrainConfig:
    return load_config(DiTTrainConfig, TINY, [f"train.out_dir={tmp_path / 'run'}", "train.save_every=0",
                                              "train.log_every=0", f"data.semantic_tokenizer={tok}", *overrides])


def test_flow_pair_is_the_reference_objective():
    g = torch.Generator().manual_seed(0)
    x1, x0, t = torch.randn(2, 5, 80, generator=g), torch.randn(2, 5, 80, generator=g), torch.tensor([0.0, 1.0])
    xt, u = flow_pair(x1, x0, t, 1e-4)
    torch.testing.assert_close(xt[0], x0[0])  # t = 0: pure noise
    torch.testing.assert_close(xt[1], x1[1] + 1e-4 * x0[1])  # t = 1: data (+ sigma_min noise)
    torch.testing.assert_close(u, x1 - (1 - 1e-4) * x0)
    # u is the time derivative of x_t
    t2 = torch.tensor([0.3, 0.7])
    a, _ = flow_pair(x1, x0, t2, 1e-4)
    b, _ = flow_pair(x1, x0, t2 + 1e-3, 1e-4)
    torch.testing.assert_close((b - a) / 1e-3, u, atol=1e-3, rtol=1e-3)


def _model(seed=0) -> FlowMatchingDiT:
    cfg = DiTConfig.from_name("tiny")
    m = FlowMatchingDiT(cfg, FlowSpec())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random everything (the adaLN-Zero init would hide bugs behind zeros)
        for p in m.dit.parameters():
            p.normal_(0, 0.1, generator=g)
    return m.eval()


def test_training_forward_equals_inference_dit_and_prefix_cache_streaming():
    m = _model()
    dit = m.dit
    g = torch.Generator().manual_seed(1)
    B, P, C = 2, 8, 12
    mel = torch.randn(B, P + C, 80, generator=g)
    tokens = torch.randint(0, 1024, (B, (P + C) // 4), generator=g).repeat_interleave(4, dim=1)
    pos = torch.arange(16, 16 + P + C).expand(B, -1)
    t = torch.tensor([0.25, 0.8])
    with torch.no_grad():
        # first chunk (no prefix): one DiT.forward call
        cond = dit.condition_tokens(tokens[:, P:]) + dit.t_embedder(to_timestep(t, B))[:, None]
        ours = masked_dit_forward(dit, mel[:, P:], cond, pos[:, P:], None)
        ref = dit(mel[:, P:], tokens[:, P:], to_timestep(t, B), pos[:, P:])
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        # later chunk: the streaming path (prefix at t=0.999 into the KV cache, then the chunk over it)
        cache = dit.new_cache(B, P + C)
        dit(mel[:, :P], tokens[:, :P], to_timestep(0.999, B), pos[:, :P], cache)
        cache.commit(P)
        ref = dit(mel[:, P:], tokens[:, P:], to_timestep(t, B), pos[:, P:], cache)
        # the training path: one masked forward over [prefix ; chunk]
        from kimia.train.dit import prefix_mask

        cond = dit.condition_tokens(tokens)
        cond = torch.cat([cond[:, :P] + dit.t_embedder(to_timestep(0.999, B))[:, None],
                          cond[:, P:] + dit.t_embedder(to_timestep(t, B))[:, None]], dim=1)
        ours = masked_dit_forward(dit, mel, cond, pos, prefix_mask(P, P + C))
        torch.testing.assert_close(ours[:, P:], ref, atol=1e-5, rtol=1e-5)


def test_loss_is_the_chunk_velocity_error():
    m = _model(2)
    g = torch.Generator().manual_seed(3)
    B, P, C = 2, 4, 8
    mel = torch.randn(B, P + C, 80, generator=g) - 4
    tokens = torch.randint(0, 1024, (B, (P + C) // 4), generator=g).repeat_interleave(4, dim=1)
    pos = torch.arange(P + C).expand(B, -1)
    t, noise = torch.tensor([0.1, 0.6]), torch.randn(B, C, 80, generator=g)
    m.mel_mean.fill_(-4.0)
    m.mel_std.fill_(2.0)
    with torch.no_grad():
        loss = m(mel, tokens, pos, t, noise, P)["loss"]
        x1 = (mel - -4.0) / 2.0
        xt, u = flow_pair(x1[:, P:], noise, t, 1e-4)
        cache = m.dit.new_cache(B, P + C)
        m.dit(x1[:, :P], tokens[:, :P], to_timestep(0.999, B), pos[:, :P], cache)
        cache.commit(P)
        v = m.dit(xt, tokens[:, P:], to_timestep(t, B), pos[:, P:], cache)
    torch.testing.assert_close(loss, ((v - u) ** 2).mean(), atol=1e-5, rtol=1e-5)


def test_dit_trains_resumes_and_streams(tmp_path, corpus, tokenizer_folder):
    over = [f"data.manifests=[{corpus}]", "data.synthetic=0", "train.steps=16"]
    cfg = tiny_cfg(tmp_path / "a", tokenizer_folder, *over)
    recipe = DiTRecipe(cfg)
    assert recipe.dit_cfg.semantic_vocab_size == 64  # taken from the tokenizer
    data = recipe.dataset()
    assert len(data) == 6 and all(mel.shape[0] == 4 * ids.shape[0] for ids, mel in data)
    torch.manual_seed(11)
    fixed = recipe.collate([data[i] for i in range(4)])
    model0 = recipe.build_model(torch.device("cpu"))
    with torch.no_grad():
        before = float(model0(fixed.mel, fixed.tokens, fixed.positions, fixed.t, fixed.noise, fixed.prefix)["loss"])

    trainer, hist = train_dit(cfg)
    with torch.no_grad():
        m = trainer.raw_model
        after = float(m(fixed.mel, fixed.tokens, fixed.positions, fixed.t, fixed.noise, fixed.prefix)["loss"])
    assert after < 0.85 * before, (before, after, [r["loss"] for r in hist])
    assert any(r["prefix_frames"] > 0 for r in hist) and any(r["prefix_frames"] == 0 for r in hist)

    cfg_b = tiny_cfg(tmp_path / "b", tokenizer_folder, *over, "train.max_steps_this_run=7")
    _, h1 = train_dit(cfg_b)
    cfg_b.train.max_steps_this_run = 0
    _, h2 = train_dit(cfg_b)
    assert [r["loss"] for r in h1 + h2] == [r["loss"] for r in hist]

    # export -> model folder with a vocoder -> streaming detokenizer
    export = Path(cfg.train.out_dir) / "export"
    dit = load_dit(export)
    assert dit.cfg.normalize_mel and dit.cfg.mel_std == pytest.approx(float(m.mel_std))
    folder = tmp_path / "model"
    folder.mkdir()
    export.rename(folder / "audio_detokenizer")
    torch.manual_seed(0)
    save_vocoder(BigVGAN(BigVGANConfig.from_name("tiny")), folder / "vocoder")
    detok = load_detokenizer(folder, config=StreamConfig(ode_steps=4, chunk_size=6, look_ahead_tokens=2),
                             generator=torch.Generator().manual_seed(0))
    ids = data[0][0][:10]
    wav = torch.cat([detok.push(ids[:6]), detok.push(ids[6:], is_final=True)], dim=-1)
    assert wav.shape[-1] == 10 * 4 * 480 and torch.isfinite(wav).all()
    assert detok.stats.cached_attention_chunks >= 1


def test_token_noise_swaps_ids_for_near_codes(tmp_path, tokenizer_folder):
    """Every corrupted id is one of the original's k nearest codebook rows (not itself), at the given rate;
    collate applies it to prefix and chunk and leaves the mel target clean."""
    from kimia.encoders.semantic import load_semantic_tokenizer

    k = 5
    recipe = DiTRecipe(tiny_cfg(tmp_path, tokenizer_folder, "data.token_noise=1.0", f"data.token_noise_neighbours={k}",
                                "data.prefix_prob=1.0"))
    cb = load_semantic_tokenizer(tokenizer_folder, device="cpu").encoder.codebook.weight.detach().float()
    V = cb.shape[0]
    d = torch.cdist(cb.double(), cb.double())
    d.fill_diagonal_(float("inf"))
    near = d.argsort(dim=1)[:, :k]  # brute force, independent of the recipe's table
    ids = torch.arange(V).repeat(20)
    torch.manual_seed(0)
    out = recipe.corrupt(ids)
    assert (out != ids).all()
    assert (near[ids] == out[:, None]).any(dim=1).all()
    assert {int(x) for x in out[ids == 3]} == {int(x) for x in near[3]}  # all k are drawn

    half = DiTRecipe(tiny_cfg(tmp_path, tokenizer_folder, "data.token_noise=0.25", "data.token_noise_neighbours=0"))
    torch.manual_seed(1)
    many = torch.arange(V).repeat(200)
    out = half.corrupt(many)
    rate = float((out != many).float().mean())
    assert 0.22 < rate < 0.28, rate  # uniform replacement: a few draws land on the same code
    assert len(set(out[many == 3].tolist()) - {3}) > 3 * k  # any code, not only near ones

    c = 7
    mel = torch.randn(40 * 4, 80)
    items = [(torch.full((40,), c), mel), (torch.full((40,), c), mel)]
    torch.manual_seed(2)
    b = recipe.collate(items)
    assert b.prefix > 0
    assert set(b.tokens.unique().tolist()) <= set(near[c].tolist())
    assert any(torch.equal(b.mel[0], mel[i:i + b.mel.shape[1]]) for i in range(0, 160 - b.mel.shape[1] + 1, 4))


def test_token_noise_config_errors(tmp_path, tokenizer_folder):
    for bad in (["data.token_noise=1.5"], ["data.token_noise=0.1", "data.token_noise_neighbours=-1"]):
        with pytest.raises(ConfigError, match="token_noise"):
            DiTRecipe(tiny_cfg(tmp_path, tokenizer_folder, *bad))
    with pytest.raises(ConfigError, match="codebook"):
        DiTRecipe(load_config(DiTTrainConfig, TINY, [f"train.out_dir={tmp_path}", "data.token_noise=0.1",
                                                     "data.semantic_tokenizer=null"]))


def test_continuing_from_an_fp16_folder_trains_fp32_weights(tmp_path, tokenizer_folder):
    """A shipped DiT folder stores fp16; training on from it keeps fp32 master weights with the same values."""
    torch.manual_seed(0)
    from kimia.detokenizer.dit import DiT
    from kimia.detokenizer.loader import save_dit

    dit = DiT(DiTConfig.from_name("tiny")).half()
    folder = save_dit(dit, tmp_path / "dit16")
    recipe = DiTRecipe(tiny_cfg(tmp_path, tokenizer_folder, f"model.init={folder}"))
    model = recipe.build_model(torch.device("cpu"))
    params = dict(model.dit.named_parameters())
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    for n, p in dit.named_parameters():
        assert torch.equal(params[n].detach(), p.detach().float()), n
