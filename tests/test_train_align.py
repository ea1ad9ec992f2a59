"""Adaptor pre-alignment recipe: its input vectors are the LLM's own, CTC learns, export changes only what trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kimia.checkpoints.native import load_native_lm, save_native_lm
from kimia.errors import ConfigError
from kimia.lm.config import AudioLMConfig
from kimia.lm.model import AudioLM
from kimia.train.align import AlignRecipe, AlignTrainConfig, train_align
from kimia.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "align_tiny.yaml"


def _init_folder(tmp_path: Path) -> Path:
    model = AudioLM(AudioLMConfig.from_name("tiny"))
    model.init_weights(torch.Generator().manual_seed(3))
    return save_native_lm(model, tmp_path / "init")


def _cfg(tmp_path: Path, *overrides: str) -> AlignTrainConfig:
    return load_config(AlignTrainConfig, TINY, [f"init={_init_folder(tmp_path)}", f"train.out_dir={tmp_path / 'run'}",
                                                "train.save_every=0", "train.log_every=0", *overrides])


def test_align_inputs_are_the_llm_embedding_at_audio_positions(tmp_path):
    cfg = _cfg(tmp_path)
    recipe = AlignRecipe(cfg)
    model = recipe.build_model(torch.device("cpu"))
    lm, c = load_native_lm(cfg.init)
    f, ids, _ = recipe.dataset()[0]
    blank = c.pad_token_id  # the synthetic recipe's blank row (a real run uses the text-blank special)
    audio = torch.cat([torch.tensor([c.kimia_media_begin]), ids, torch.tensor([c.kimia_media_end])])[None]
    text = torch.full_like(audio, blank)
    cont, mask = lm.scatter_continuous(audio, [f])
    with torch.no_grad():
        ref = lm.embed(audio, text, cont, mask)[0, 1:-1]
        got = model.inputs(f[None], ids[None])[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_align_learns_and_exports_only_adaptor_and_audio_rows(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=150", "optim.lr=1e-2")
    trainer, hist = train_align(cfg)
    first, last = hist[0]["loss"], hist[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    # greedy decoding of a training clip gives back its token ids
    recipe, model = trainer.recipe, trainer.raw_model.eval()
    hits = 0
    for i in range(16):
        f, ids, target = recipe.dataset()[i]
        with torch.no_grad():
            hits += model.decode(model.logits(f[None], ids[None])[0]) == target
    assert hits >= 12, hits
    init, _ = load_native_lm(cfg.init)
    out, _ = load_native_lm(Path(cfg.train.out_dir) / "export")
    a, b = init.state_dict(), out.state_dict()
    off = init.config.kimia_token_offset
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("model.vq_adaptor.") or k in ("model.embed_tokens.weight", "lm_head.weight")
                           for k in changed), changed
    torch.testing.assert_close(b["model.embed_tokens.weight"][:off], a["model.embed_tokens.weight"][:off], rtol=0, atol=0)
    assert not torch.equal(b["model.embed_tokens.weight"][off:], a["model.embed_tokens.weight"][off:])


def test_frozen_audio_rows_stay_exact(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=3", "train_audio_rows=false")
    train_align(cfg)
    a = load_native_lm(cfg.init)[0].model.embed_tokens.weight
    b = load_native_lm(Path(cfg.train.out_dir) / "export")[0].model.embed_tokens.weight
    assert torch.equal(a, b)


def test_align_needs_an_llm_folder_and_data(tmp_path):
    with pytest.raises(ConfigError, match="native LLM folder"):
        AlignRecipe(load_config(AlignTrainConfig, TINY, [f"init={tmp_path / 'nope'}"]))
    cfg = _cfg(tmp_path, "data.synthetic=0")
    with pytest.raises(ConfigError, match="nothing to train on"):
        AlignRecipe(cfg).dataset()


def test_time_mask_hides_features_not_ids(tmp_path):
    recipe = AlignRecipe(_cfg(tmp_path, "time_mask=0.5", "mask_span=2"))
    items = [recipe.dataset()[i] for i in range(4)]
    plain = AlignRecipe(_cfg(tmp_path / "b", "time_mask=0.0")).collate(items)
    torch.manual_seed(1)
    masked = recipe.collate(items)
    assert torch.equal(masked.audio_ids, plain.audio_ids) and torch.equal(masked.targets, plain.targets)
    hidden = (masked.features != plain.features).any(-1)
    assert torch.all(masked.features[hidden] == 0)
    for i, (f, _, _) in enumerate(items):  # about half of each clip's frames, none beyond its end
        assert 0 < int(hidden[i].sum()) <= f.shape[0] and not hidden[i, f.shape[0]:].any()


def test_data_classes_give_the_full_vocabulary_loss_over_fewer_rows(tmp_path):
    """With `classes: data` the CTC softmax runs over the transcripts' tokens only; the logits of those classes
    equal the full-vocabulary ones, decoding maps back to text ids, and a token outside the set is refused."""
    full = AlignRecipe(_cfg(tmp_path))
    sub = AlignRecipe(_cfg(tmp_path / "b", "classes=data"))
    mf, ms = full.build_model(torch.device("cpu")), sub.build_model(torch.device("cpu"))
    used = sorted({t for i in range(len(sub.dataset())) for t in sub.dataset()[i][2]})
    assert ms.class_ids.tolist() == used and len(used) < mf.class_ids.numel()
    ms.load_state_dict(mf.state_dict())
    f, ids, target = sub.dataset()[0]
    with torch.no_grad():
        lf, ls = mf.logits(f[None], ids[None])[0], ms.logits(f[None], ids[None])[0]
    torch.testing.assert_close(ls[:, 0], lf[:, 0])
    torch.testing.assert_close(ls[:, 1:], lf[:, 1 + torch.tensor(used)])
    batch = sub.collate([sub.dataset()[i] for i in range(4)])
    assert float(ms(batch)) > 0
    batch.targets[0] = max(used) + 1
    with pytest.raises(ConfigError, match="not among the CTC classes"):
        ms(batch)
    with pytest.raises(ConfigError, match="'all' or 'data'"):
        AlignRecipe(_cfg(tmp_path / "c", "classes=some")).build_model(torch.device("cpu"))
