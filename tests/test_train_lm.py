"""Audio-LLM training recipe: loss formula, learning, freezing, LoRA, resume, config loading, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kimia.checkpoints.native import load_native_lm
from kimia.errors import ConfigError
from kimia.lm.model import LMOutput
from kimia.train.common import Trainer, lr_factor
from kimia.train.config import load_config
from kimia.train.data import SyntheticLMDataset
from kimia.train.lm import LMRecipe, LMTrainConfig, lm_loss, train_lm
from kimia.train.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora, unmerge_lora

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "lm_tiny.yaml"


def tiny_cfg(tmp_path: Path, *overrides: str) -> LMTrainConfig:
    return load_config(LMTrainConfig, TINY, [f"train.out_dir={tmp_path / 'run'}", "train.save_every=0",
                                             "train.log_every=0", *overrides])


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_masked_ce_is_the_shifted_official_loss():
    """Loss == mean over masked positions t of CE(logits[t], ids[t+1]) per stream, summed (explicit loop)."""
    ds = SyntheticLMDataset(3, num_base_tokens=285, token_offset=706, audio_vocab=1024, adaptor_dim=256)
    recipe = LMRecipe(LMTrainConfig())
    batch = recipe.collate([ds[0], ds[1], ds[2]])
    g = torch.Generator().manual_seed(0)
    b, n = batch.audio_ids.shape
    out = LMOutput(torch.randn(b, n, 1730, generator=g), torch.randn(b, n, 1730, generator=g))
    total, la, lt = lm_loss(out, batch)
    expect = []
    for logits, ids, mask in ((out.audio_logits, "audio_ids", "audio_loss_mask"),
                              (out.text_logits, "text_ids", "text_loss_mask")):
        terms = []
        for r, item in enumerate([ds[0], ds[1], ds[2]]):
            src, m = getattr(item, ids), getattr(item, mask)
            for t in range(len(item) - 1):
                if m[t + 1]:
                    terms.append(F.cross_entropy(logits[r, t][None], src[t + 1][None]))
        expect.append(torch.stack(terms).sum() / (len(terms) + 1e-4))
    torch.testing.assert_close(la, expect[0])
    torch.testing.assert_close(lt, expect[1])
    torch.testing.assert_close(total, expect[0] + expect[1])
    # the text loss covers the assistant text and its text-EOS; the audio loss the echoed audio + media_end
    sp = ds.specials
    assert batch.text_labels[batch.text_loss_mask].eq(sp.text_eos).sum() == 3
    assert batch.audio_labels[batch.audio_loss_mask].eq(sp.media_end).sum() == 1


def test_loss_goes_down_and_export_loads(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=25", "data.synthetic=4", "train.micro_batch=4")
    trainer, hist = train_lm(cfg)
    first, last = hist[0]["loss"], hist[-1]["loss"]
    assert last < 0.6 * first, (first, last)
    assert all(r["tokens_per_s"] > 0 and r["tokens"] > 0 for r in hist)
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == [r["loss"] for r in hist]
    # the exported native folder reproduces the trained model's logits
    model, _ = load_native_lm(tmp_path / "run" / "export")
    batch = trainer.recipe.collate([trainer.data[0]])
    trained = trainer.raw_model.eval()
    with torch.no_grad():
        a = trained(batch.audio_ids, batch.text_ids, batch.positions, continuous=batch.continuous,
                    continuous_mask=batch.continuous_mask)
        b = model(batch.audio_ids, batch.text_ids, batch.positions, continuous=batch.continuous,
                  continuous_mask=batch.continuous_mask)
    torch.testing.assert_close(b.text_logits, a.text_logits, rtol=0, atol=0)
    torch.testing.assert_close(b.audio_logits, a.audio_logits, rtol=0, atol=0)


def test_freeze_groups_keep_params_bit_identical(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=3", "freeze=[trunk,embeddings,adaptor]", "freeze_embedding_rows_below=0")
    recipe = LMRecipe(cfg)
    trainer = Trainer(recipe, cfg.train, cfg.optim, full_config=cfg)
    before = params(trainer.raw_model)
    trainer.fit()
    after = params(trainer.raw_model)
    fork = recipe.lm_config.kimia_mimo_transformer_from_layer_index
    frozen = [n for n in before if n.startswith("model.embed_tokens") or n.startswith("model.vq_adaptor")
              or any(n.startswith(f"model.layers.{i}.") for i in range(fork + 1))]
    assert frozen and len(frozen) < len(before)
    for n in before:
        same = torch.equal(before[n], after[n])
        assert same == (n in frozen), n


def test_freeze_embedding_rows_below_trains_only_new_rows(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=3", "freeze_embedding_rows_below=706")
    trainer = Trainer(LMRecipe(cfg), cfg.train, cfg.optim, full_config=cfg)
    w0 = trainer.raw_model.model.embed_tokens.weight.detach().clone()
    trainer.fit()
    w1 = trainer.raw_model.model.embed_tokens.weight.detach()
    assert torch.equal(w0[:706], w1[:706])
    assert not torch.equal(w0[706:], w1[706:])


def test_unknown_freeze_entry_is_a_config_error(tmp_path):
    cfg = tiny_cfg(tmp_path, "freeze=[no_such_part]")
    with pytest.raises(ConfigError, match="no_such_part"):
        LMRecipe(cfg).build_model(torch.device("cpu"))


def test_lora_trains_only_adapters_and_merge_matches(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=4", "lora.enabled=true", "lora.r=4",
                   "lora.targets=['*.self_attn.q_proj','*.mlp.down_proj']")
    trainer, _ = train_lm(cfg)
    model = trainer.raw_model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    adapters = lora_state_dict(model)
    assert set(adapters) == trainable
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_B"))
    # base weights untouched by training
    ref = LMRecipe(tiny_cfg(tmp_path)).build_model(torch.device("cpu"))
    for n, p in ref.named_parameters():
        assert torch.equal(p, model.get_parameter(n)), n
    batch = trainer.recipe.collate([trainer.data[1]])
    args = (batch.audio_ids, batch.text_ids, batch.positions)
    kw = dict(continuous=batch.continuous, continuous_mask=batch.continuous_mask)
    with torch.no_grad():
        unmerged = model(*args, **kw)
        merge_lora(model)
        merged = model(*args, **kw)
        unmerge_lora(model)
        again = model(*args, **kw)
        plain = ref(*args, **kw)
    torch.testing.assert_close(merged.text_logits, unmerged.text_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.audio_logits, unmerged.audio_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.text_logits, unmerged.text_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain.text_logits, unmerged.text_logits, atol=1e-4)
    # the export is a plain native folder (adapters merged) giving the adapted logits
    exported, _ = load_native_lm(tmp_path / "run" / "export")
    assert not any("lora" in k for k in exported.state_dict())
    with torch.no_grad():
        ex = exported(*args, **kw)
    torch.testing.assert_close(ex.audio_logits, unmerged.audio_logits, atol=1e-5, rtol=1e-5)


def test_lora_wrap_starts_as_identity():
    lin = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6)
    ref = lin(x)
    m = torch.nn.Sequential(lin)
    apply_lora(m, ["0"], r=2, alpha=4.0)
    assert isinstance(m[0], LoRALinear) and set(m.state_dict()) == {"0.weight", "0.bias", "0.lora_A", "0.lora_B"}
    torch.testing.assert_close(m(x), ref)


def test_resume_equals_uninterrupted(tmp_path):
    common = ("train.steps=6", "data.synthetic=12", "train.micro_batch=2", "train.grad_accum=2")
    full_cfg = tiny_cfg(tmp_path / "a", *common)
    full = Trainer(LMRecipe(full_cfg), full_cfg.train, full_cfg.optim, full_config=full_cfg)
    full_hist = full.fit()
    # the "killed" run stops after 3 steps (its last checkpoint), then a fresh process object resumes
    part_cfg = tiny_cfg(tmp_path / "b", *common, "train.max_steps_this_run=3", "train.save_every=2")
    first = Trainer(LMRecipe(part_cfg), part_cfg.train, part_cfg.optim, full_config=part_cfg)
    h1 = first.fit()
    assert first.step == 3 and len(h1) == 3
    torch.manual_seed(1234)  # resume must not depend on the RNG state of the new process
    (tmp_path / "b" / "run" / "checkpoints" / "step_0000005.tmp").mkdir()  # a torn write is ignored
    part_cfg.train.max_steps_this_run = 0
    second = Trainer(LMRecipe(part_cfg), part_cfg.train, part_cfg.optim, full_config=part_cfg)
    assert second.step == 3
    h2 = second.fit()
    assert [r["loss"] for r in h1 + h2] == [r["loss"] for r in full_hist]
    for (n, p), (_, q) in zip(full.raw_model.named_parameters(), second.raw_model.named_parameters()):
        assert torch.equal(p, q), n


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(LMTrainConfig, TINY, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(LMTrainConfig, TINY, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(LMTrainConfig, TINY, ["train.precision=fp8"])
    cfg = load_config(LMTrainConfig, TINY, ["optim.lr=3e-4", "freeze=[trunk]"])
    assert cfg.optim.lr == 3e-4 and cfg.freeze == ["trunk"] and cfg.train.steps == 20


def test_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 2, 0.1) for s in range(11)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and abs(f[10] - 0.1) < 1e-12


@pytest.mark.slow
def test_smollm2_conversion_matches_transformers_llama(tmp_path):
    """The converted trunk reproduces transformers' LlamaForCausalLM loaded from the same GGUF; the audio
    branch starts as a copy of the text tail; the tokenizer encodes as the GGUF's own tokenizer does."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kimia.tokens import SpecialTokens, load_tokenizer
    from kimia.train.init_smollm2 import TOKENIZER_SPEC, convert_smollm2, find_smollm2_gguf, smollm2_tokenizer

    torch.set_num_threads(2)
    gguf = find_smollm2_gguf()
    folder = convert_smollm2(tmp_path / "smol", audio_vocab=64, mimo_layers=2)
    model, cfg = load_native_lm(folder)
    model.eval()
    assert not cfg.attention_bias and cfg.tie_word_embeddings and cfg.kimia_mimo_transformer_from_layer_index == 27
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
        hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = smollm2_tokenizer(folder)
    # (runs of several spaces right before a digit are left out: transformers' GGUF tokenizer splits them
    # into single spaces, SmolLM2's own Digits-then-ByteLevel pre-tokeniser keeps them as one piece)
    texts = ["The capital of France is Paris.", "In 1969, 3 astronauts   flew 384400 km!\n\nWhy? (it's \"fun\")",
             "héllo wörld 日本語 x2 -- a\tb\r\nc 12.5%", "  leading spaces and trailing   ", "don't WE'LL U.S.A. $1,000"]
    for s in texts:
        assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False), s
        assert tok.decode(tok.encode(s)) == s
    ids = torch.tensor([hf_tok.encode(texts[0] + " " + texts[1], add_special_tokens=False)])
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids, None, torch.arange(ids.shape[1])[None])
    v = ref.shape[-1]
    torch.testing.assert_close(out.text_logits[..., :v], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.audio_logits, out.text_logits, atol=1e-5, rtol=1e-5)
    # Kimi specials appended after SmolLM2's vocabulary, consistent between config and tokenizer spec
    spec = json.loads((folder / TOKENIZER_SPEC).read_text())
    sp = SpecialTokens.from_config(cfg.to_dict(), load_tokenizer(spec, folder))
    assert sp == SpecialTokens.from_config(cfg.to_dict(), tok)
    assert (sp.pad, sp.token_offset, cfg.vocab_size) == (49152 + 420, 49152 + 421, 49152 + 421 + 64)
    assert tok.decode([sp.media_begin]) == "<|im_media_begin|>"


def test_manifest_dataset_with_cached_frozen_encoder(tmp_path):
    """Official finetune jsonl -> prompts; features from a frozen encoder computed once into the cache."""
    import numpy as np
    import soundfile as sf

    from kimia.prompt import PromptBuilder
    from kimia.train.data import AudioCache, IdTokenizer, ManifestLMDataset, read_manifests

    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "a.wav", np.random.default_rng(0).standard_normal(16000).astype("float32") * 0.1, 16000)
    recs = [
        {"task_type": "understanding", "conversation": [
            {"role": "user", "message_type": "text", "content": "3 4 5"},
            {"role": "user", "message_type": "audio", "content": "audio/a.wav", "audio_tokens": list(range(706, 718))},
            {"role": "assistant", "message_type": "text", "content": "7 8"}]},
        {"task_type": "speech2speech", "conversation": [
            {"role": "user", "message_type": "audio", "content": "audio/a.wav", "audio_tokens": list(range(706, 719))}]},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    calls = []

    def encoder(wave: torch.Tensor) -> torch.Tensor:  # frozen "encoder": 12 frames of 256 values
        calls.append(1)
        return wave[: 12 * 256].reshape(1, 12, 256)

    tok = IdTokenizer(285)
    from kimia.tokens import SpecialTokens

    sp = SpecialTokens.from_tokenizer(tok, token_offset=706)
    cache = AudioCache(token_offset=706, features=encoder, cache_dir=tmp_path / "cache")
    ds = ManifestLMDataset(read_manifests([tmp_path / "m.jsonl"]), PromptBuilder(tok, sp), audio=cache)
    a, b = ds[0], ds[1]
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert sp.speech_ct in a.audio_ids.tolist() and sp.speech_ctd in b.audio_ids.tolist()  # task -> output type
    assert a.features[0].shape == (12, 256) and b.features[0].shape == (13, 256)  # 1 frame short: repeated
    torch.testing.assert_close(b.features[0][12], b.features[0][11])
    again = ManifestLMDataset(read_manifests([tmp_path / "m.jsonl"]), PromptBuilder(tok, sp), audio=cache)[0]
    assert len(calls) == 1 and torch.equal(again.features[0], a.features[0])
    batch = LMRecipe(LMTrainConfig()).collate([a, b])
    assert batch.continuous.shape == (2, batch.audio_ids.shape[1], 256)
    assert int(batch.continuous_mask.sum()) == 25


def test_audio_cache_is_keyed_by_content_and_reads_path_keyed_entries(tmp_path):
    """A copy or hard link of a cached file elsewhere hits the cache; new bytes at the same path do not; an
    entry written under the earlier key (sha1 of "path|size|mtime_ns") is still read; `adopt` links another
    folder's entries so a grown corpus's linked audio finds them."""
    import hashlib
    import os
    import shutil

    import numpy as np
    import soundfile as sf
    from safetensors.torch import save_file

    from kimia.train.data import AudioCache

    calls = []

    def encoder(wave: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return wave[: 4 * 8].reshape(1, 4, 8)

    a = tmp_path / "a.wav"
    sf.write(a, np.random.default_rng(0).standard_normal(800).astype("float32") * 0.1, 16000)
    cache = AudioCache(token_offset=0, features=encoder, cache_dir=tmp_path / "c1")
    first = cache.get(a)["features"]
    shutil.copy2(a, tmp_path / "copy.wav")
    os.link(a, tmp_path / "link.wav")
    for p in (tmp_path / "copy.wav", tmp_path / "link.wav"):
        assert torch.equal(cache.get(p)["features"], first)
    assert len(calls) == 1
    sf.write(tmp_path / "copy.wav", np.random.default_rng(1).standard_normal(800).astype("float32"), 16000)
    assert not torch.equal(cache.get(tmp_path / "copy.wav")["features"], first) and len(calls) == 2

    old = tmp_path / "old.wav"  # a path-keyed entry, as caches were written before content keys
    sf.write(old, np.random.default_rng(2).standard_normal(800).astype("float32"), 16000)
    st = old.stat()
    legacy = hashlib.sha1(f"{old.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    save_file({"features": torch.full((4, 8), 7.0)}, str(tmp_path / "c1" / f"{legacy}.safetensors"))
    assert torch.equal(cache.get(old)["features"], torch.full((4, 8), 7.0)) and len(calls) == 2

    grown = tmp_path / "grown"
    grown.mkdir()
    for f in (a, old):
        os.link(f, grown / f.name)
    other = AudioCache(token_offset=0, features=encoder, cache_dir=tmp_path / "c2")
    assert other.adopt(tmp_path / "c1", [a, old, tmp_path / "link.wav"]) == 2  # the link is a's content again
    assert torch.equal(other.get(grown / "old.wav")["features"], torch.full((4, 8), 7.0))
    assert torch.equal(other.get(grown / "a.wav")["features"], first) and len(calls) == 2


def test_truncation_never_cuts_an_audio_span():
    from kimia.train.data import truncate_prompt

    ds = SyntheticLMDataset(3, num_base_tokens=285, token_offset=706, audio_vocab=1024, adaptor_dim=256)
    pb = ds[2]  # user audio span, assistant text, assistant audio span
    start, n = pb.spans[1]
    cut = truncate_prompt(pb, start + 2)
    assert len(cut) == start - 1 and len(cut.features) == 1 and cut.spans == pb.spans[:1]
    assert truncate_prompt(pb, len(pb)) is pb


def probe_inputs(recipe, trainer) -> tuple[tuple, dict]:
    """The forward arguments of a batch of the trainer's first two examples (to compare logits before / after)."""
    batch = recipe.collate([trainer.data[0], trainer.data[1]])
    return (batch.audio_ids, batch.text_ids, batch.positions), dict(continuous=batch.continuous,
                                                                   continuous_mask=batch.continuous_mask)


def test_kept_adapters_and_frozen_groups_retrain_only_the_audio_branch(tmp_path):
    """lora.train=false with every other group frozen: the audio branch alone learns and the text path (its
    logits) is exactly what it was, adapters included."""
    cfg = tiny_cfg(tmp_path, "train.steps=3", "lora.enabled=true", "lora.r=4", "lora.freeze_base=false",
                   "lora.train=false", "freeze=[embeddings,trunk,text_tail,adaptor]", "freeze_embedding_rows_below=0",
                   "lora.targets=['*.self_attn.q_proj','*.mlp.down_proj']")
    recipe = LMRecipe(cfg)
    trainer = Trainer(recipe, cfg.train, cfg.optim, full_config=cfg)
    model = trainer.raw_model
    with torch.no_grad():  # adapters that change the trunk, as a continued model's do
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    args, kw = probe_inputs(recipe, trainer)
    before = params(model)
    with torch.no_grad():
        text0 = model.eval()(*args, **kw).text_logits
    trainer.fit()
    after = params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith(("model.mimo_layers.", "model.mimo_norm.", "mimo_output.")) for n in changed)
    with torch.no_grad():
        assert torch.equal(model.eval()(*args, **kw).text_logits, text0)


def test_lora_train_only_trains_the_text_tail_adapters_and_leaves_the_audio_logits_exact(tmp_path):
    """lora.train_only over the text tail's layers (after the fork) with every other group frozen: only those
    adapters change, so the audio branch (which reads the fork layer) gives exactly the logits it gave."""
    cfg = tiny_cfg(tmp_path, "train.steps=3", "lora.enabled=true", "lora.r=4", "lora.freeze_base=false",
                   "freeze=[embeddings,trunk,text_tail,adaptor,audio_branch]", "freeze_embedding_rows_below=0",
                   "lora.targets=['*.self_attn.q_proj','*.mlp.down_proj']", "lora.train_only=['model.layers.[23].*']")
    recipe = LMRecipe(cfg)
    trainer = Trainer(recipe, cfg.train, cfg.optim, full_config=cfg)
    model = trainer.raw_model
    assert model.config.kimia_mimo_transformer_from_layer_index == 1  # layers 2, 3: the text tail
    args, kw = probe_inputs(recipe, trainer)
    before = params(model)
    with torch.no_grad():
        out0 = model.eval()(*args, **kw)
    trainer.fit()
    changed = {n for n, p in params(model).items() if not torch.equal(before[n], p)}
    assert changed and all(n.startswith(("model.layers.2.", "model.layers.3.")) and "lora_" in n for n in changed)
    with torch.no_grad():
        out1 = model.eval()(*args, **kw)
    assert torch.equal(out1.audio_logits, out0.audio_logits)
    assert not torch.equal(out1.text_logits, out0.text_logits)


def test_lora_train_only_matching_no_adapter_is_a_config_error(tmp_path):
    cfg = tiny_cfg(tmp_path, "lora.enabled=true", "lora.train_only=['model.layers.99.*']")
    with pytest.raises(ConfigError, match="train_only"):
        LMRecipe(cfg).build_model(torch.device("cpu"))


def test_lora_without_freeze_base_keeps_other_params_trainable():
    from kimia.lm.config import AudioLMConfig
    from kimia.lm.model import AudioLM

    model = AudioLM(AudioLMConfig.from_name("tiny"))
    names = apply_lora(model, ["model.layers.*.self_attn.q_proj"], r=2, freeze_base=False)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    for n in names:
        assert not grads[f"{n}.weight"] and grads[f"{n}.lora_A"] and grads[f"{n}.lora_B"]
    assert grads["model.layers.0.self_attn.k_proj.weight"] and grads["mimo_output.weight"]


def test_bf16_autocast_on_cpu_trains(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=12", "data.synthetic=4", "train.micro_batch=4", "train.precision=bf16")
    trainer, hist = train_lm(cfg)
    assert trainer.autocast_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())  # fp32 master weights
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_trainer_runs_multi_phase_recipes(tmp_path):
    """The GAN-style plug-in: one optimizer per phase, each phase steps only its own parameters."""
    from torch import nn

    from kimia.train.common import LossOutput, Recipe
    from kimia.train.config import OptimConfig, TrainConfig

    class ToyGAN(Recipe):
        phases = ("disc", "gen")

        def build_model(self, device):
            return nn.ModuleDict({"gen": nn.Linear(4, 4), "disc": nn.Linear(4, 1)}).to(device)

        def dataset(self):
            return [torch.randn(4, generator=torch.Generator().manual_seed(i)) for i in range(8)]

        def collate(self, items):
            return torch.stack(items)

        def phase_parameters(self, model, phase):
            return list(model[phase].named_parameters())

        def loss(self, model, x, phase):
            fake = model["gen"](x)
            if phase == "disc":
                return LossOutput(F.softplus(model["disc"](fake.detach())).mean() + F.softplus(-model["disc"](x)).mean(),
                                  tokens=x.shape[0])
            return LossOutput(F.softplus(-model["disc"](fake)).mean(), tokens=x.shape[0])

    cfg = TrainConfig(out_dir=str(tmp_path / "gan"), steps=3, micro_batch=2, grad_accum=2, log_every=0)
    trainer = Trainer(ToyGAN(), cfg, OptimConfig(lr=1e-2))
    before = params(trainer.raw_model)
    hist = trainer.fit()
    assert {"loss/disc", "loss/gen"} <= set(hist[-1])
    after = params(trainer.raw_model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    ids = {ph: {id(p) for g in o.param_groups for p in g["params"]} for ph, o in trainer.optimizers.items()}
    assert ids["disc"] == {id(p) for p in trainer.raw_model["disc"].parameters()} and not ids["disc"] & ids["gen"]


def test_native_folder_with_tied_head_loads_tied_and_keeps_frozen_rows(tmp_path):
    """A tied text head (SmolLM2) must stay one Parameter after a native save/load: otherwise training updates
    an untied copy of the head while the saved folder keeps only the embedding (what a v0 run hit)."""
    from kimia.checkpoints.native import load_native_lm, save_native_lm
    from kimia.lm.config import AudioLMConfig
    from kimia.lm.model import AudioLM

    config = AudioLMConfig.from_name("tiny", tie_word_embeddings=True)
    model = AudioLM(config, dtype=torch.float32)
    model.init_weights(torch.Generator().manual_seed(0))
    save_native_lm(model, tmp_path / "init")
    loaded, _ = load_native_lm(tmp_path / "init", dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    cfg = tiny_cfg(tmp_path, "train.steps=3", f"model.init={tmp_path / 'init'}", "freeze_embedding_rows_below=706")
    trainer = Trainer(LMRecipe(cfg), cfg.train, cfg.optim, full_config=cfg)
    m = trainer.raw_model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    w0 = m.model.embed_tokens.weight.detach().clone()
    trainer.fit()
    w1 = trainer.raw_model.model.embed_tokens.weight.detach()
    assert torch.equal(w0[:706], w1[:706]) and not torch.equal(w0[706:], w1[706:])
