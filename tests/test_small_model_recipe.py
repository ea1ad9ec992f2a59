"""The pieces the shipped small model's recipe adds: logits only at loss positions, length-grouped global
batches, a frozen audio-head text block, LoRA factors stored in the model-folder delta (bit-equal at load),
fp16 storage, and a VQ tokenizer whose Whisper encoder stays frozen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kimia.checkpoints.native import load_native_lm
from kimia.checkpoints.smollm2 import load_delta_lm
from kimia.errors import CheckpointError, ConfigError
from kimia.train.common import GlobalBatchOrder, Trainer
from kimia.train.config import load_config
from kimia.train.data import SyntheticLMDataset
from kimia.train.lm import LMRecipe, LMTrainConfig, lm_loss
from kimia.train.vq import SyntheticToneASR, VQTrainConfig, train_vq

from tests.test_model_folder_delta import FAKE_PACKAGE, fake_base  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]


def lm_cfg(tmp_path: Path, *overrides: str) -> LMTrainConfig:
    return load_config(LMTrainConfig, ROOT / "configs/train/lm_tiny.yaml",
                       [f"train.out_dir={tmp_path / 'run'}", "train.save_every=0", "train.log_every=0", *overrides])


def _batch(recipe: LMRecipe, idx=(0, 1, 2, 5)):
    ds = SyntheticLMDataset(8, num_base_tokens=285, token_offset=706, audio_vocab=1024, adaptor_dim=256)
    return recipe.collate([ds[i] for i in idx])


def test_sparse_logits_equal_the_full_ones_at_the_loss_positions(tmp_path):
    recipe = LMRecipe(lm_cfg(tmp_path))
    model = recipe.build_model(torch.device("cpu")).eval()
    b = _batch(recipe)
    args = (b.audio_ids, b.text_ids, b.positions)
    kw = dict(continuous=b.continuous, continuous_mask=b.continuous_mask)
    with torch.no_grad():
        full = model(*args, **kw)
        sparse = model(*args, **kw, logits_where=(b.text_loss_mask, b.audio_loss_mask))
    assert sparse.text_logits.shape == (int(b.text_loss_mask.sum()), full.text_logits.shape[-1])
    torch.testing.assert_close(sparse.text_logits, full.text_logits[b.text_loss_mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.audio_logits, full.audio_logits[b.audio_loss_mask], rtol=1e-5, atol=1e-5)
    for x, y in zip(lm_loss(full, b), lm_loss(sparse, b)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # a batch without audio targets skips the audio branch altogether
    text_only = _batch(recipe, (0, 1))
    assert not text_only.audio_loss_mask.any()
    with torch.no_grad():
        out = model(text_only.audio_ids, text_only.text_ids, text_only.positions, continuous=text_only.continuous,
                    continuous_mask=text_only.continuous_mask,
                    logits_where=(text_only.text_loss_mask, text_only.audio_loss_mask))
    assert out.audio_logits is None
    assert float(lm_loss(out, text_only)[1]) == 0.0
    # data-parallel training runs the branch anyway (every rank must use every parameter): an exact zero loss
    kept = model(text_only.audio_ids, text_only.text_ids, text_only.positions, continuous=text_only.continuous,
                 continuous_mask=text_only.continuous_mask, skip_audio=False,
                 logits_where=(text_only.text_loss_mask, text_only.audio_loss_mask))
    assert kept.audio_logits.shape == (0, model.config.vocab_size)
    la = lm_loss(kept, text_only)[1]
    assert float(la) == 0.0
    la.backward()
    assert model.mimo_output.weight.grad is not None and not model.mimo_output.weight.grad.any()
    with pytest.raises(ConfigError, match="exclusive"):
        model(*args, **kw, logits_at=-1, logits_where=(b.text_loss_mask, b.audio_loss_mask))


def test_length_grouped_batches_keep_the_examples_of_each_step():
    lengths = [(7 * i) % 23 for i in range(40)]
    plain = GlobalBatchOrder(40, 4, 2, 2, seed=3)
    grouped = GlobalBatchOrder(40, 4, 2, 2, seed=3, lengths=lengths)
    one_rank = GlobalBatchOrder(40, 4, 4, 1, seed=3, lengths=lengths)
    for step in range(12):  # crosses epochs
        a = [i for k in range(2) for r in range(2) for i in plain.micro_indices(step, k, r)]
        g = [grouped.micro_indices(step, k, r) for k in range(2) for r in range(2)]
        flat = [i for m in g for i in m]
        assert sorted(flat) == sorted(a)  # the same examples form the step
        assert [lengths[i] for i in flat] == sorted(lengths[i] for i in flat)  # micro-batches of similar length
        assert flat == [i for k in range(4) for i in one_rank.micro_indices(step, k, 0)]  # world-size invariant
    with pytest.raises(ConfigError, match="lengths"):
        GlobalBatchOrder(40, 4, 2, 1, seed=0, lengths=[1, 2])


def test_group_by_length_trains_with_less_padding(tmp_path):
    cfg = lm_cfg(tmp_path, "train.steps=2", "data.synthetic=12", "train.micro_batch=3", "train.grad_accum=2",
                 "train.group_by_length=true")
    trainer = Trainer(LMRecipe(cfg), cfg.train, cfg.optim, full_config=cfg)
    hist = trainer.fit()
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)


def test_frozen_head_rows_stay_exact(tmp_path):
    cfg = lm_cfg(tmp_path, "train.steps=3", "freeze_head_rows_below=706", "optim.weight_decay=0.5")
    trainer = Trainer(LMRecipe(cfg), cfg.train, cfg.optim, full_config=cfg)
    w0 = trainer.raw_model.mimo_output.weight.detach().clone()
    trainer.fit()
    w1 = trainer.raw_model.mimo_output.weight.detach()
    assert torch.equal(w0[:706], w1[:706]) and not torch.equal(w0[706:], w1[706:])


def _lora_export(fake, tmp_path):
    """A LoRA-trained export of the fake SmolLM2 start: trunk frozen under adapters, new rows and the audio
    branch trained (as small.yaml's lm stage)."""
    init = fake["export"].parent / "init"
    cfg = load_config(LMTrainConfig, None, [f"model.init={init}", "freeze=[trunk,text_tail]", "lora.enabled=true",
                                            "lora.r=2", "lora.freeze_base=false",
                                            "lora.targets=[model.layers.*.self_attn.q_proj,model.layers.*.mlp.up_proj]",
                                            "freeze_embedding_rows_below=40", "freeze_head_rows_below=40"])
    recipe = LMRecipe(cfg)
    model = recipe.build_model(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                if n in ("model.embed_tokens.weight", "mimo_output.weight"):
                    p[40:] += 0.05 * torch.randn(p[40:].shape, generator=g)
                else:
                    p += 0.05 * torch.randn(p.shape, generator=g)
    out = tmp_path / "lora_export"
    recipe.export(model.state_dict(), out)
    return out


def test_lora_factors_are_stored_instead_of_merged_weights_and_load_bit_equal(fake_base, tmp_path):
    from kimia.train.assemble import write_lm_delta

    export = _lora_export(fake_base, tmp_path)
    assert (export / "lora.safetensors").is_file()
    doc = json.loads((export / "config.json").read_text())
    doc["kimia_init"]["package"] = FAKE_PACKAGE
    (export / "config.json").write_text(json.dumps(doc))
    root = tmp_path / "m"
    root.mkdir()
    entry = write_lm_delta(export, root, "lm")
    assert set(entry["lora_scales"]) == {f"model.layers.{i}.{m}" for i in range(3)
                                         for m in ("self_attn.q_proj", "mlp.up_proj")}
    assert not any(t.endswith("q_proj.weight") and t.startswith("model.layers.") for t in entry["delta_tensors"])
    assert entry["rows_from"]["mimo_output.weight"] == 40
    full, _ = load_native_lm(export)
    delta, _ = load_delta_lm(entry, root)
    for name, t in full.state_dict().items():
        assert torch.equal(delta.state_dict()[name], t), name
    # fp16 storage: about half the bytes, weights within fp16 rounding
    root16 = tmp_path / "m16"
    root16.mkdir()
    e16 = write_lm_delta(export, root16, "lm", dtype="float16")
    assert (root16 / "lm/delta.safetensors").stat().st_size < 0.6 * (root / "lm/delta.safetensors").stat().st_size
    d16, _ = load_delta_lm(e16, root16, dtype=torch.float32)
    for name, t in full.state_dict().items():
        torch.testing.assert_close(d16.state_dict()[name], t, rtol=2e-3, atol=2e-3)
    # a manifest whose LoRA list does not match the file is refused
    bad = dict(entry, lora_scales={**entry["lora_scales"], "model.layers.0.self_attn.v_proj": 1.0})
    with pytest.raises(CheckpointError, match="LoRA"):
        load_delta_lm(bad, root)


def test_frozen_whisper_vq_keeps_the_encoder_and_learns_the_codebook(tmp_path):
    cfg = load_config(VQTrainConfig, ROOT / "configs/train/vq_tiny.yaml",
                      [f"train.out_dir={tmp_path / 'run'}", "train.steps=4", "train.save_every=0", "train.log_every=0",
                       "model.freeze_encoder=true", "model.causal=false", "model.block_size=null", "data.synthetic=8"])
    from kimia.train.vq import VQRecipe

    recipe = VQRecipe(cfg)
    assert not recipe.enc_cfg.encoder_causal_convolution and recipe.enc_cfg.quantize_causal_block_size is None
    trainer, hist = train_vq(cfg, SyntheticToneASR(8, seed=1))
    start = VQRecipe(cfg).build_model(torch.device("cpu"))
    trained = trainer.raw_model
    for n, p in start.encoder.named_parameters():
        if n != "codebook.weight":
            assert torch.equal(p, trained.encoder.get_parameter(n)), n
    assert not torch.equal(start.encoder.codebook.weight, trained.encoder.codebook.weight)
    assert all(k in hist[-1] for k in ("ctc", "perplexity", "used"))


def test_long_form_asr_joins_clips_deterministically():
    from kimia.prompt import PromptBuilder
    from kimia.tokens import SpecialTokens
    from kimia.train.data import IdTokenizer, ManifestLMDataset

    tok = IdTokenizer(285)
    sp = SpecialTokens.from_tokenizer(tok, token_offset=706)
    recs = []
    for k in range(6):
        n = 5 + k
        recs.append({"task_type": "understanding", "task": "asr" if k < 5 else "sound", "conversation": [
            {"role": "user", "message_type": "text", "content": "3 4"},
            {"role": "user", "message_type": "audio", "content": None, "audio_tokens": [706 + k] * n,
             "features": torch.full((n, 8), float(k))},
            {"role": "assistant", "message_type": "text", "content": str(10 + k)}]})
    plain = ManifestLMDataset(recs, PromptBuilder(tok, sp))
    joined = ManifestLMDataset(recs, PromptBuilder(tok, sp), concat_prob=1.0, concat_max=3, seed=4)
    for i in range(5):
        a, b = plain[i], joined[i]
        assert len(b) > len(a) and len(b.spans) == 1  # one longer audio span
        feats = b.features[0]
        assert feats[0, 0] == i and feats.shape[0] == b.spans[0][1]  # starts with its own clip
        assert int(b.text_loss_mask.sum()) > int(a.text_loss_mask.sum())  # the joined transcript is longer
        assert torch.equal(b.audio_ids, joined[i].audio_ids)  # same example every time
    assert torch.equal(plain[5].audio_ids, joined[5].audio_ids)  # non-ASR records stay as they are
    with pytest.raises(ConfigError, match="concat_max"):
        ManifestLMDataset(recs, PromptBuilder(tok, sp), concat_prob=0.5, concat_max=1)


def test_text_qa_records_are_train_split_text_conversations():
    from kimia.data import texts
    from kimia.train.data import text_qa_records

    recs = text_qa_records(300, seed=1, eval_fraction=0.3)
    assert len(recs) == 300 and recs == text_qa_records(300, seed=1, eval_fraction=0.3)
    kinds = set()
    for r in recs:
        conv = r["conversation"]
        assert r["task_type"] == "understanding" and all(m["message_type"] == "text" for m in conv)
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert texts.split_of(conv[0]["content"], 0.3) == "train"  # the corpus' held-out questions never appear
        kinds.add(len(conv))
    assert kinds == {2, 4}  # single questions and two-turn dialogues
    # the held-out share is really filtered out (about 30% of the drawn questions)
    assert text_qa_records(300, seed=1, eval_fraction=0.0) != recs


def _shipped_lora_folder(fake, tmp_path):
    """(root, lm entry) of a shipped-style folder: `_lora_export`'s LM stored as an fp16 delta with LoRA factors."""
    from kimia.train.assemble import write_lm_delta

    export = _lora_export(fake, tmp_path)
    doc = json.loads((export / "config.json").read_text())
    doc["kimia_init"]["package"] = FAKE_PACKAGE
    (export / "config.json").write_text(json.dumps(doc))
    root = tmp_path / "shipped"
    root.mkdir()
    return root, write_lm_delta(export, root, "lm", dtype="float16")


def test_continued_adapters_start_where_the_folder_stopped_and_ship_as_factors_again(fake_base, tmp_path):
    """A shipped folder (fp16 delta with LoRA factors), continued the pipeline's way: its LM is rebuilt with
    the trunk unmerged (exactly the packaged base) and its factors as the next run's `lora.init`. The run starts
    at the folder's own weights, and its export is stored again as small factors, not merged matrices."""
    from types import SimpleNamespace

    from kimia.train.assemble import write_lm_delta
    from kimia.train.lora import merge_lora_state_dict
    from kimia.train.pipeline import _seed_lm

    root, entry = _shipped_lora_folder(fake_base, tmp_path)
    start, lora_start = tmp_path / "lm_init", tmp_path / "lora_start.safetensors"
    n = _seed_lm(SimpleNamespace(lm_delta=entry, root=root, lm=root / "lm"), start, lora_start)
    assert n == 6 and lora_start.is_file()
    base, _ = load_native_lm(fake_base["export"].parent / "init")
    seeded, _ = load_native_lm(start)
    for name in entry["lora_scales"]:  # the adapted weights are the packaged base, bit for bit
        assert torch.equal(seeded.state_dict()[f"{name}.weight"], base.state_dict()[f"{name}.weight"])

    over = [f"model.init={start}", "freeze=[trunk,text_tail]", "lora.enabled=true", "lora.r=2", "lora.freeze_base=false",
            "lora.targets=[model.layers.*.self_attn.q_proj,model.layers.*.mlp.up_proj]",
            "freeze_embedding_rows_below=40", "freeze_head_rows_below=40"]
    recipe = LMRecipe(load_config(LMTrainConfig, None, [*over, f"lora.init={lora_start}"]))
    model = recipe.build_model(torch.device("cpu"))
    shipped, _ = load_delta_lm(entry, root, dtype=torch.float32)
    merged = merge_lora_state_dict(model.state_dict(), recipe._scales)
    for name, t in shipped.state_dict().items():
        assert torch.equal(merged[name], t), name
    with torch.no_grad():  # "train on": only the adapters (and the trainable branch) move
        for n_, p in model.named_parameters():
            if n_.endswith("lora_B"):
                p += 0.01
    out = tmp_path / "continued"
    recipe.export(model.state_dict(), out)
    root2 = tmp_path / "shipped2"
    root2.mkdir()
    doc = json.loads((out / "config.json").read_text())
    doc["kimia_init"]["package"] = FAKE_PACKAGE
    (out / "config.json").write_text(json.dumps(doc))
    entry2 = write_lm_delta(out, root2, "lm")
    assert set(entry2["lora_scales"]) == set(entry["lora_scales"])
    assert not any(t.endswith(".weight") and any(t.startswith(f"{s}.") for s in entry2["lora_scales"])
                   for t in entry2["delta_tensors"])  # no adapted matrix stored whole
    full, _ = load_native_lm(out)
    loaded, _ = load_delta_lm(entry2, root2)
    for name, t in full.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    # adapters of another shape or scale are refused, naming the mismatch
    for bad, match in (("lora.r=4", "another r"), ("lora.alpha=8.0", "scale")):
        with pytest.raises(ConfigError, match=match):
            LMRecipe(load_config(LMTrainConfig, None, [*over, bad, f"lora.init={lora_start}"])).build_model(torch.device("cpu"))
    with pytest.raises(ConfigError, match="not found"):
        LMRecipe(load_config(LMTrainConfig, None, [*over, f"lora.init={tmp_path / 'nope.safetensors'}"])).build_model(torch.device("cpu"))


def test_a_folders_lm_taken_as_it_is_ships_the_same_delta_again(fake_base, tmp_path):
    """from_model with `lm` (a candidate that only trains the DiT): the folder's LM is written as the lm stage
    exports one (merged weights + its adapters), which loads as the folder's own LM bit for bit, and assembling
    it again stores the very same delta (factors, not merged matrices), so nothing new enters git history."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from kimia.train.assemble import write_lm_delta
    from kimia.train.lm import LORA_FILE
    from kimia.train.pipeline import _seed_lm

    root, entry = _shipped_lora_folder(fake_base, tmp_path)
    out = tmp_path / "lm_export"
    assert _seed_lm(SimpleNamespace(lm_delta=entry, root=root, lm=root / "lm"), out, out / LORA_FILE, merged=True) == 6
    shipped, _ = load_delta_lm(entry, root, dtype=torch.float32)
    seeded, _ = load_native_lm(out)
    base, _ = load_native_lm(fake_base["export"].parent / "init")
    for name, t in shipped.state_dict().items():
        assert torch.equal(seeded.state_dict()[name], t), name
    assert any(not torch.equal(seeded.state_dict()[f"{n}.weight"], base.state_dict()[f"{n}.weight"])
               for n in entry["lora_scales"])  # merged: not the unmerged base the lm_init seed writes
    root2 = tmp_path / "shipped2"
    root2.mkdir()
    entry2 = write_lm_delta(out, root2, "lm", dtype="float16")
    assert entry2["lora_scales"] == entry["lora_scales"] and entry2["delta_tensors"] == entry["delta_tensors"]
    a, b = load_file(root / entry["delta"]), load_file(root2 / entry2["delta"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_storage_leaves_a_file_already_in_fp16_byte_for_byte(tmp_path):
    """Assembly casts every part to the folder's dtype; a part carried over from an earlier fp16 folder must
    come out byte-identical (else each continued model adds a new copy of it to git history)."""
    from safetensors.torch import load_file, save_file

    from kimia.train.assemble import cast_safetensors

    f = tmp_path / "part" / "model.safetensors"
    f.parent.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(4, 3, generator=g), "codebook.weight": torch.randn(5, 2, generator=g),
               "ids": torch.arange(3)}, str(f), metadata={"format": "pt", "component": "x"})
    cast_safetensors(f.parent, "float16", keep=("codebook",))
    once, st = f.read_bytes(), f.stat()
    t = load_file(str(f))
    assert t["w"].dtype == torch.float16 and t["codebook.weight"].dtype == torch.float32 and t["ids"].dtype == torch.int64
    cast_safetensors(f.parent, "float16", keep=("codebook",))
    # not rewritten at all (a rewrite may reorder the metadata, which safetensors does not keep stable)
    assert f.read_bytes() == once and (f.stat().st_ino, f.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


def test_saved_parts_are_byte_stable_and_load_unchanged(tmp_path):
    """Equal tensors and metadata must give equal bytes whenever a part is saved (the semantic-tokenizer delta is
    rebuilt at every assembly: a reordered header would be a new 2 MB blob per ship). safetensors writes the
    metadata in hash-map order, so saving 16 times with four keys would differ with near certainty."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file

    from kimia.checkpoints.common import save_safetensors

    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(4, 3, generator=g), "codebook.weight": torch.randn(5, 2, generator=g),
          "ids": torch.arange(3), "h": torch.randn(7, generator=g).half()}
    meta = {"format": "pt", "kimia_component": "semantic-delta", "scales": json.dumps({"a": 0.5}), "é": "ü\"q\""}
    f = tmp_path / "delta.safetensors"
    digests = set()
    for _ in range(16):
        save_safetensors(sd, f, metadata=meta)
        digests.add(hashlib.sha256(f.read_bytes()).hexdigest())
    assert len(digests) == 1 and not list(tmp_path.glob("*.tmp"))
    back = load_file(str(f))
    assert set(back) == set(sd) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items())
    with safe_open(str(f), framework="pt") as st:
        assert st.metadata() == meta
    save_safetensors(sd, f)  # no metadata at all
    assert set(load_file(str(f))) == set(sd)
