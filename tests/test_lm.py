"""AudioLM against library oracles and its own properties (random weights, tiny configs, CPU, fp32).

- Both heads vs transformers' Qwen2ForCausalLM (q/k/v bias) and LlamaForCausalLM (no bias): the text head is
  the full main stack; the audio head is main layers 0..fork + mimo layers + mimo_norm + mimo_output.
- Static-cache decode == full forward; chunked prefill; right-padded batches == single rows; positional
  masking ignores whatever the cache holds beyond a row's position.
- Config round trip, presets, validation; loader errors naming a missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kimia.checkpoints.official_lm import load_official_lm
from kimia.errors import BudgetError, CheckpointError, ConfigError, PromptError
from kimia.lm import AudioLM, AudioLMConfig, KVCache, scatter_continuous
from tests.reference import fixture_root

SMALL = dict(vocab_size=1730, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4, kimia_mimo_layers=2, kimia_mimo_transformer_from_layer_index=1,
             kimia_adaptor_input_dim=24, max_position_embeddings=256)


def _model(seed: int = 0, **overrides) -> AudioLM:
    cfg = AudioLMConfig.from_name("tiny", **{**SMALL, **overrides})
    m = AudioLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():  # everything random, biases and norm weights included
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight") or name == "model.vq_adaptor.layers.4.weight":
                p.copy_(1.0 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.1 * r)
            elif "embed_tokens" in name:
                p.copy_(0.5 * r)
            else:
                p.copy_(r / p.shape[1] ** 0.5)
    return m.eval()


def _ids(shape, cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, shape, generator=g)


# ------------------------------------------------------------------ transformers oracles
def _hf_pair(model: AudioLM, family: str):
    """Two transformers causal LMs carrying our weights: text path and audio-branch path."""
    import transformers as tf

    c = model.config
    fork = c.kimia_mimo_transformer_from_layer_index
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                  max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                  rope_theta=c.rope_theta, tie_word_embeddings=False, attn_implementation="eager")
    if family == "qwen2":
        make = lambda n: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_hidden_layers=n, **common))  # noqa: E731
    else:
        make = lambda n: tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=n, attention_bias=False,  # noqa: E731
                                                            mlp_bias=False, **common))
    sd = model.state_dict()
    text = make(c.num_hidden_layers)
    text_sd = {k: v for k, v in sd.items() if k.startswith(("model.layers.", "model.embed_tokens", "model.norm.", "lm_head"))}
    text.load_state_dict(text_sd, strict=True)
    audio = make(fork + 1 + c.kimia_mimo_layers)
    audio_sd = {k: v for k, v in sd.items() if k.startswith("model.layers.") and int(k.split(".")[2]) <= fork}
    for k, v in sd.items():
        if k.startswith("model.mimo_layers."):
            j = int(k.split(".")[2])
            audio_sd[k.replace(f"model.mimo_layers.{j}.", f"model.layers.{fork + 1 + j}.")] = v
    audio_sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"]
    audio_sd["model.norm.weight"] = sd["model.mimo_norm.weight"]
    audio_sd["lm_head.weight"] = sd["mimo_output.weight"]
    audio.load_state_dict(audio_sd, strict=True)
    return text.eval(), audio.eval()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_heads_match_transformers(family):
    model = _model(attention_bias=(family == "qwen2"))
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == (family == "qwen2")
    hf_text, hf_audio = _hf_pair(model, family)
    c = model.config
    audio_ids, text_ids = _ids((2, 11), c, 1), _ids((2, 11), c, 2)
    positions = torch.arange(11)[None].repeat(2, 1) + torch.tensor([[0], [37]])  # second row far from 0
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        out = model(audio_ids, text_ids, positions)
        embeds = emb[audio_ids] + emb[text_ids]
        ref_text = hf_text(inputs_embeds=embeds, position_ids=positions).logits
        ref_audio = hf_audio(inputs_embeds=embeds, position_ids=positions).logits
    torch.testing.assert_close(out.text_logits, ref_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.audio_logits, ref_audio, atol=1e-5, rtol=1e-5)
    assert out.text_logits.dtype == torch.float32 and out.text_logits.shape == (2, 11, c.vocab_size)


# ------------------------------------------------------------------ cache properties
def _prompt(cfg, length=14, span=(3, 9), seed=3):
    """One row with a media span (continuous features inside) and a non-blank text stream."""
    audio = _ids((1, length), cfg, seed)
    audio[audio == cfg.kimia_media_begin] = 0
    audio[audio == cfg.kimia_media_end] = 0
    audio[0, span[0]] = cfg.kimia_media_begin
    audio[0, span[1]] = cfg.kimia_media_end
    text = _ids((1, length), cfg, seed + 1)
    feats = [torch.randn(1, span[1] - span[0] + 2, cfg.kimia_adaptor_input_dim, generator=torch.Generator().manual_seed(seed))]
    return audio, text, feats


def test_cached_decode_equals_full_forward():
    model = _model()
    c = model.config
    audio, text, feats = _prompt(c, length=14)
    cont, mask = model.scatter_continuous(audio, feats)
    assert mask.sum() == 5 and not mask[0, 3] and not mask[0, 9]
    n = audio.shape[1]
    with torch.no_grad():
        full = model(audio, text, torch.arange(n)[None], continuous=cont, continuous_mask=mask)
        cache = model.allocate_cache(1, 32)
        cache.k.normal_()  # stale contents beyond a row's position must never be attended
        cache.v.normal_()
        k = 10  # prefill covers the media span; the rest is decoded one position at a time
        pre = model(audio[:, :k], text[:, :k], torch.arange(k)[None], continuous=cont[:, :k],
                    continuous_mask=mask[:, :k], cache=cache)
        steps = [model(audio[:, i:i + 1], text[:, i:i + 1], torch.tensor([[i]]), cache=cache, kv_len=i + 1 + (i % 3))
                 for i in range(k, n)]
    torch.testing.assert_close(pre.text_logits, full.text_logits[:, :k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre.audio_logits, full.audio_logits[:, :k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([s.text_logits for s in steps], 1), full.text_logits[:, k:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([s.audio_logits for s in steps], 1), full.audio_logits[:, k:], atol=1e-5, rtol=1e-5)
    # chunked prefill (two chunks) through the cache, last-position logits only
    with torch.no_grad():
        cache.reset()
        model(audio[:, :6], text[:, :6], torch.arange(6)[None], continuous=cont[:, :6], continuous_mask=mask[:, :6], cache=cache)
        last = model(audio[:, 6:], text[:, 6:], torch.arange(6, n)[None], continuous=cont[:, 6:],
                     continuous_mask=mask[:, 6:], cache=cache, logits_at=-1)
    torch.testing.assert_close(last.audio_logits, full.audio_logits[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.text_logits, full.text_logits[:, -1:], atol=1e-5, rtol=1e-5)


def test_batched_rows_with_different_lengths_equal_single_rows():
    model = _model(seed=5)
    c = model.config
    lengths = [7, 13, 10]
    rows = [_ids((1, n), c, 10 + i) for i, n in enumerate(lengths)]
    texts = [_ids((1, n), c, 20 + i) for i, n in enumerate(lengths)]
    # row 1 carries a media span with continuous features
    rows[1][rows[1] == c.kimia_media_begin] = 0
    rows[1][rows[1] == c.kimia_media_end] = 0
    rows[1][0, 2], rows[1][0, 8] = c.kimia_media_begin, c.kimia_media_end
    feats = [torch.randn(5, c.kimia_adaptor_input_dim)]
    n_max, steps = max(lengths), 4
    pad = c.pad_token_id
    audio = torch.full((3, n_max), pad)
    text = torch.full((3, n_max), pad)
    for i, n in enumerate(lengths):  # right padding
        audio[i, :n], text[i, :n] = rows[i][0], texts[i][0]
    new_a, new_t = _ids((3, steps), c, 30), _ids((3, steps), c, 31)
    lens = torch.tensor(lengths)
    with torch.no_grad():
        cont, mask = model.scatter_continuous(audio, feats)
        cache = model.allocate_cache(3, n_max + steps)
        pre = model(audio, text, torch.arange(n_max)[None].repeat(3, 1), continuous=cont, continuous_mask=mask,
                    cache=cache, logits_at=lens - 1)
        batched = [pre]
        for s in range(steps):
            batched.append(model(new_a[:, s:s + 1], new_t[:, s:s + 1], (lens + s)[:, None], cache=cache))
        for i, n in enumerate(lengths):
            single_cache = model.allocate_cache(1, n + steps)
            f = feats if i == 1 else []
            sc, sm = model.scatter_continuous(rows[i], f)
            outs = [model(rows[i], texts[i], torch.arange(n)[None], continuous=sc, continuous_mask=sm,
                          cache=single_cache, logits_at=-1)]
            for s in range(steps):
                outs.append(model(new_a[i:i + 1, s:s + 1], new_t[i:i + 1, s:s + 1], torch.tensor([[n + s]]),
                                  cache=single_cache))
            for b_out, s_out in zip(batched, outs):
                torch.testing.assert_close(b_out.text_logits[i:i + 1], s_out.text_logits, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(b_out.audio_logits[i:i + 1], s_out.audio_logits, atol=1e-5, rtol=1e-5)


def test_cache_contract_errors():
    model = _model()
    c = model.config
    cache = model.allocate_cache(2, 8)
    assert cache.k.shape == (c.num_hidden_layers + c.kimia_mimo_layers, 2, c.num_key_value_heads, 8, c.head_dim)
    ids = _ids((2, 3), c)
    with pytest.raises(BudgetError, match="positions span"):
        model(ids, ids, torch.tensor([[6, 7, 8], [0, 1, 2]]), cache=cache)
    with pytest.raises(ConfigError, match="positions must be"):
        model(ids[:1], ids[:1], torch.arange(3)[None], cache=cache)
    with pytest.raises(BudgetError, match="max_position_embeddings"):
        KVCache.allocate(c, 1, c.max_position_embeddings + 1)


def test_scatter_continuous_layout_and_errors():
    begin, end, d = 7, 9, 4
    ids = torch.tensor([[1, begin, 2, 2, end, 1], [begin, 3, end, begin, 3, end]])
    feats = [torch.arange(12.0).view(1, 3, 4) + 100, torch.ones(2, 4), torch.full((1, 4), 5.0)]
    cont, mask = scatter_continuous(ids, feats, media_begin=begin, media_end=end, dim=d)
    assert mask.tolist() == [[False, False, True, True, False, False], [False, True, False, False, True, False]]
    assert torch.equal(cont[0, 2:4], feats[0][0, :2]) and torch.equal(cont[1, 1], feats[1][0])
    assert torch.equal(cont[1, 4], feats[2][0]) and cont[~mask].abs().sum() == 0
    with pytest.raises(PromptError, match="3 media spans.*2 feature"):
        scatter_continuous(ids, feats[:2], media_begin=begin, media_end=end, dim=d)
    with pytest.raises(PromptError, match="1 frames but its media span holds 2"):
        scatter_continuous(ids, [feats[2], feats[1], feats[2]], media_begin=begin, media_end=end, dim=d)
    with pytest.raises(PromptError, match="never closed"):
        scatter_continuous(torch.tensor([[begin, 1]]), [torch.ones(1, 4)], media_begin=begin, media_end=end, dim=d)


# ------------------------------------------------------------------ config
def test_config_roundtrip_presets_and_validation(tmp_path):
    release = json.loads((fixture_root() / "llm" / "config.json").read_text())
    cfg = AudioLMConfig.from_dict({**release, "some_future_key": {"a": 1}})
    out = cfg.to_dict()
    for k, v in release.items():
        assert out[k] == v, k
    assert out["some_future_key"] == {"a": 1} and cfg.extra == {"some_future_key": {"a": 1}}
    assert AudioLMConfig.from_dict(out) == cfg
    cfg.save_json(tmp_path / "c.json")
    assert AudioLMConfig.from_json(tmp_path / "c.json") == cfg
    tiny = AudioLMConfig.from_name("tiny")
    assert {k: v for k, v in tiny.to_dict().items() if k in release and k not in ("auto_map", "transformers_version")} == \
        {k: v for k, v in release.items() if k not in ("auto_map", "transformers_version")}
    big = AudioLMConfig.from_name("kimi-audio-7b")
    assert (big.head_dim, big.num_total_layers, big.vocab_size, big.kimia_token_offset) == (128, 34, 168448, 152064)
    with torch.device("meta"):
        n = sum(p.numel() for p in AudioLM(big).parameters())
    assert n == 9_766_334_464  # KIMI_AUDIO.md §3.5 parameter count of the release
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        AudioLMConfig.from_name("tiny", num_key_value_heads=3)
    with pytest.raises(ConfigError, match="kimia_mimo_transformer_from_layer_index"):
        AudioLMConfig.from_name("tiny", kimia_mimo_transformer_from_layer_index=4)
    with pytest.raises(ConfigError, match="unknown AudioLM preset"):
        AudioLMConfig.from_name("huge")
    with pytest.raises(ConfigError, match="rope_scaling"):
        AudioLMConfig.from_name("tiny", rope_scaling={"type": "linear", "factor": 2.0})


# ------------------------------------------------------------------ loader
def _write_release(folder, model: AudioLM, sd=None, sharded=False):
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_json(folder / "config.json")
    sd = dict(model.state_dict()) if sd is None else sd
    sd = {k: v.contiguous() for k, v in sd.items()}
    for i in range(model.config.num_hidden_layers):  # the release carries these; loaders must skip them
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(model.config.head_dim // 2)
    if not sharded:
        save_file(sd, str(folder / "model.safetensors"))
        return
    heads = {k for k in sd if not k.startswith(("model.layers.", "model.mimo_layers.", "model.vq_adaptor."))}
    parts = {"model-1-of-1.safetensors": {k: v for k, v in sd.items() if k not in heads},
             "model-2-of-2.safetensors": {k: sd[k] for k in heads}}
    for name, part in parts.items():
        save_file(part, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: n for n, part in parts.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_loader_roundtrip_and_dtype(tmp_path):
    model = _model(seed=9)
    c = model.config
    ids = _ids((1, 6), c)
    pos = torch.arange(6)[None]
    with torch.no_grad():
        ref = model(ids, ids, pos)
    for sharded in (False, True):
        folder = tmp_path / f"sharded{sharded}"
        _write_release(folder, model, sharded=sharded)
        loaded, cfg = load_official_lm(folder, dtype=torch.float32)
        assert cfg == c
        with torch.no_grad():
            out = loaded(ids, ids, pos)
        torch.testing.assert_close(out.text_logits, ref.text_logits, atol=0, rtol=0)
        torch.testing.assert_close(out.audio_logits, ref.audio_logits, atol=0, rtol=0)
    bf16, _ = load_official_lm(tmp_path / "shardedTrue", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with torch.no_grad():
        out = bf16(ids, ids, pos)
    assert out.text_logits.dtype == torch.float32
    torch.testing.assert_close(out.text_logits, ref.text_logits, atol=0.3, rtol=0.1)


def test_loader_names_bad_keys(tmp_path):
    model = _model()
    sd = dict(model.state_dict())
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "model.mimo_layers.1.mlp.up_proj.weight"},
                    "missing keys: model.mimo_layers.1.mlp.up_proj.weight"),
        "unexpected": ({**sd, "model.layers.0.self_attn.extra.weight": torch.zeros(2)},
                       "unexpected keys: model.layers.0.self_attn.extra.weight"),
        "shape": ({**sd, "model.vq_adaptor.layers.3.bias": torch.zeros(5)},
                  r"shape mismatches: model.vq_adaptor.layers.3.bias \(checkpoint \(5,\)"),
    }
    for name, (bad, pattern) in cases.items():
        _write_release(tmp_path / name, model, sd=bad)
        with pytest.raises(CheckpointError, match=pattern):
            load_official_lm(tmp_path / name)
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(model.config.to_dict()))
        load_official_lm(tmp_path / "empty")


def test_native_roundtrip_and_conversion(tmp_path):
    from kimia.checkpoints.native import convert_official_lm, load_native_lm, save_native_lm

    model = _model(seed=4)
    ids = _ids((1, 5), model.config)
    pos = torch.arange(5)[None]
    save_native_lm(model, tmp_path / "native")
    loaded, cfg = load_native_lm(tmp_path / "native")
    assert cfg == AudioLMConfig.from_dict(model.config.to_dict(), torch_dtype="float32")
    with torch.no_grad():
        a, b = model(ids, ids, pos), loaded(ids, ids, pos)
    assert torch.equal(a.text_logits, b.text_logits) and torch.equal(a.audio_logits, b.audio_logits)
    # sharded release folder -> native bf16 folder; config records the stored dtype
    _write_release(tmp_path / "release", model, sharded=True)
    convert_official_lm(tmp_path / "release", tmp_path / "bf16", dtype=torch.bfloat16)
    m16, cfg16 = load_native_lm(tmp_path / "bf16")
    assert cfg16.torch_dtype == "bfloat16" and m16.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(m16.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_meta_build_needs_buffers_and_text_skip_rule():
    cfg = AudioLMConfig.from_name("tiny", **SMALL)
    meta = AudioLM(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    model = _model()
    model.model.rotary.cos = torch.empty(cfg.max_position_embeddings, cfg.head_dim, device="meta")
    ids = _ids((1, 4), cfg)
    with pytest.raises(ConfigError, match="init_buffers"):
        model(ids, ids, torch.arange(4)[None])
    model.init_buffers()
    # a row whose text ids are all 0 gets no text embedding (the reference skips an all-zero text stream)
    with torch.no_grad():
        zero = model(ids, torch.zeros_like(ids), torch.arange(4)[None])
        none = model(ids, None, torch.arange(4)[None])
    assert torch.equal(zero.text_logits, none.text_logits)


def test_skip_audio_gives_identical_text_logits_and_leaves_the_mimo_cache_alone():
    """The text-only fast path: same text logits bit for bit (full, cached prefill + decode, batched), no audio
    logits, and no writes to the audio branch's cache slots (main-layer slots equal the full run's)."""
    model = _model(seed=3)
    c = model.config
    audio, text, feats = _prompt(c, length=14)
    cont, mask = model.scatter_continuous(audio, feats)
    n, k = audio.shape[1], 9
    pos = torch.arange(n)[None]
    with torch.no_grad():
        full = model(audio, text, pos, continuous=cont, continuous_mask=mask)
        fast = model(audio, text, pos, continuous=cont, continuous_mask=mask, skip_audio=True)
        assert fast.audio_logits is None
        assert torch.equal(fast.text_logits, full.text_logits)
        runs = {}
        for skip in (False, True):
            cache = model.allocate_cache(2, 32)
            cache.k.fill_(7.0)
            cache.v.fill_(7.0)
            two = lambda x: x.expand(2, *x.shape[1:])  # noqa: E731
            pre = model(two(audio[:, :k]), two(text[:, :k]), two(pos[:, :k]), continuous=two(cont[:, :k]),
                        continuous_mask=two(mask[:, :k]), cache=cache, logits_at=torch.tensor([k - 1, k - 2]),
                        skip_audio=skip)
            steps = [model(two(audio[:, i:i + 1]), two(text[:, i:i + 1]), torch.full((2, 1), i), cache=cache,
                           kv_len=i + 1, skip_audio=skip).text_logits for i in range(k, n)]
            runs[skip] = (pre.text_logits, torch.cat(steps, 1), cache)
    assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])
    torch.testing.assert_close(runs[False][1][:1], full.text_logits[:, k:], atol=1e-5, rtol=1e-5)
    main = c.num_hidden_layers
    fast_cache, full_cache = runs[True][2], runs[False][2]
    assert torch.equal(fast_cache.k[:main], full_cache.k[:main]) and torch.equal(fast_cache.v[:main], full_cache.v[:main])
    assert bool((fast_cache.k[main:] == 7.0).all()) and bool((fast_cache.v[main:] == 7.0).all())
    assert not bool((full_cache.k[main:, :, :, :n] == 7.0).all())
