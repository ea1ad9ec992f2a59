"""Adaptor pre-alignment (`kimia train align`): teach the LLM's input side to spell out speech before the LLM
itself trains on conversations.

At an audio position the LLM reads `x = sqrt(2) * (E[vq id] + adaptor(whisper features)) + E[text blank]`
(`AudioLM.embed`; E is the token embedding). Fresh, the adaptor and the new audio rows of E put vectors there
that mean nothing to the pretrained trunk, and the conversation loss has to find a use for them through all of
its layers: on a CPU budget that is thousands of slow steps before the model starts to listen.

This recipe scores `x` directly against the trunk's own (frozen) text embedding rows, `logits = s * x E_text^T`,
with the text-blank row as the CTC blank, and trains the adaptor (and, optionally, the audio rows of E) with
CTC against the transcript's token ids. The result is input vectors that already lie next to the embeddings of
the words being said, in order, at 12.5 Hz: the LLM stage then only has to learn to copy and answer. No
transformer layer runs, so a step costs about as much as one vocabulary projection.

Data: audio manifests (`audio_path` + `text`, as the VQ recipe reads them). Whisper features and VQ ids come
from frozen encoders through `kimia.train.data.AudioCache`; pointing `data.feature_cache` / `data.id_cache` at
the pipeline's tokenize caches reuses what that stage computed. The learnable logit scale `s` belongs to the
training head only. Export: the `model.init` LLM folder with the trained adaptor (and audio rows) written in,
in the same native layout (`kimia.checkpoints.native`), tokenizer files copied.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kimia.checkpoints.native import load_native_lm, save_native_lm
from kimia.errors import ConfigError
from kimia.lm.config import AudioLMConfig
from kimia.lm.model import VQAdaptor
from kimia.train.common import LossOutput, Recipe, copy_folder_files
from kimia.train.config import OptimConfig, TrainConfig, to_dict
from kimia.train.data import AudioCache, match_length, read_audio_manifest

logger = logging.getLogger(__name__)

_NATIVE_FILES = ("config.json", "model.safetensors", "lora.safetensors")


@dataclass
class AlignDataSpec:
    manifests: list[str] = field(default_factory=list)
    audio_key: str = "audio_path"
    text_key: str = "text"
    whisper: str = "base"  # frozen Whisper encoder of the LLM's continuous features ("base", "tiny.en" or a folder)
    whisper_padding: str = "segment"  # "segment": every segment padded to 30 s (official); "clip": its own length
    semantic_tokenizer: str | None = None  # frozen VQ tokenizer folder; None: no audio-row term (features only)
    feature_cache: str | None = None  # AudioCache folders (None: computed on every access)
    id_cache: str | None = None
    synthetic: int = 0  # > 0: this many random (features, ids, tokens) examples instead of manifests (tests)
    eval_manifests: list[str] = field(default_factory=list)  # held-out speech: greedy CTC WER at export
    eval_limit: int = 200


@dataclass
class AlignTrainConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: str = ""  # native LLM folder whose adaptor is aligned (the pipeline's lm_init output)
    data: AlignDataSpec = field(default_factory=AlignDataSpec)
    train_audio_rows: bool = True  # the VQ ids' embedding rows train too (the LLM adds them at audio positions)
    time_mask: float = 0.0  # share of each clip's frames zeroed in spans of `mask_span` (SpecAugment-style)
    mask_span: int = 2
    feature_dropout: float = 0.0  # dropout on the Whisper features (training only)
    classes: str = "all"  # CTC classes: "all" text rows, or "data": the tokens the training transcripts use
    export_dir: str | None = None


@dataclass
class AlignBatch:
    features: torch.Tensor  # [B, T, Din]
    audio_ids: torch.Tensor  # [B, T] long (LLM ids; the text blank where no VQ ids are used)
    frames: torch.Tensor  # [B] long, valid frames per row
    targets: torch.Tensor  # [sum(L)] long, transcript token ids (concatenated)
    target_lengths: torch.Tensor  # [B] long


class AlignModel(nn.Module):
    """The LLM's input side at audio positions and a CTC head made of its frozen text embedding rows.

    Parameters: `adaptor` (the LLM's `model.vq_adaptor`), `audio_rows` ([V_audio, H], rows
    `token_offset ...` of the embedding; frozen unless `train_audio_rows`), `log_scale` (head only). Buffers
    (not saved): the text rows E_text [V_text, H], the blank row and, with `classes` (text ids, e.g. those
    of the training transcripts: a softmax over a few thousand rows instead of the whole vocabulary), the
    class ids and the text id -> class lookup."""

    def __init__(self, config: AudioLMConfig, embedding: torch.Tensor, adaptor_state: dict[str, torch.Tensor],
                 *, train_audio_rows: bool = True, feature_dropout: float = 0.0,
                 classes: torch.Tensor | None = None):
        super().__init__()
        self.feature_dropout = nn.Dropout(feature_dropout)
        c = config
        self.offset, self.n_text = c.kimia_token_offset, c.num_base_tokens
        self.adaptor = VQAdaptor(c)
        self.adaptor.load_state_dict(adaptor_state)
        self.audio_rows = nn.Parameter(embedding[self.offset:].detach().clone(), requires_grad=train_audio_rows)
        self.register_buffer("text_rows", embedding[: self.n_text].detach().clone(), persistent=False)
        self.register_buffer("blank_row", torch.zeros(c.hidden_size), persistent=False)
        ids = torch.arange(self.n_text) if classes is None else torch.unique(classes.long())
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.n_text:
            raise ConfigError(f"align classes must be text ids in [0, {self.n_text})")
        lookup = torch.zeros(self.n_text, dtype=torch.long)
        lookup[ids] = torch.arange(1, ids.numel() + 1)
        self.register_buffer("class_ids", ids, persistent=False)
        self.register_buffer("lookup", lookup, persistent=False)  # text id -> CTC class (0: not a class)
        self.log_scale = nn.Parameter(torch.tensor(math.log(2.0)))

    def set_blank(self, row: torch.Tensor) -> None:
        self.blank_row.copy_(row)

    def inputs(self, features: torch.Tensor, audio_ids: torch.Tensor | None) -> torch.Tensor:
        """The LLM's input vectors at audio positions [B, T, H] (`AudioLM.embed` with a blank text stream)."""
        w = self.adaptor(self.feature_dropout(features))
        e = self.audio_rows[(audio_ids - self.offset).clamp(min=0)] if audio_ids is not None else torch.zeros_like(w)
        return (e + w) * math.sqrt(2.0) + self.blank_row

    def logits(self, features: torch.Tensor, audio_ids: torch.Tensor | None) -> torch.Tensor:
        """[B, T, 1 + K]: class 0 is the CTC blank (the text-blank row), class 1 + k is text id `class_ids[k]`."""
        x = self.inputs(features, audio_ids)
        rows = self.text_rows if self.class_ids.numel() == self.n_text else self.text_rows[self.class_ids]
        classes = torch.cat([self.blank_row[None], rows], dim=0)
        return self.log_scale.exp() * (x @ classes.T)

    def decode(self, logits: torch.Tensor, frames: int | None = None) -> list[int]:
        """Text ids of one row's logits [T, 1 + K] by greedy CTC."""
        return [int(self.class_ids[k]) for k in greedy_ctc(logits, frames)]

    def forward(self, batch: AlignBatch) -> torch.Tensor:
        lp = F.log_softmax(self.logits(batch.features, batch.audio_ids).float(), dim=-1)
        targets = self.lookup[batch.targets]
        if not bool((targets > 0).all()):
            raise ConfigError("align: a transcript token is not among the CTC classes (classes: data is built "
                              "from the training transcripts)")
        return F.ctc_loss(lp.transpose(0, 1), targets, batch.frames, batch.target_lengths, blank=0,
                          reduction="mean", zero_infinity=True)


def greedy_ctc(logits: torch.Tensor, frames: int | None = None) -> list[int]:
    """Class indices (0-based, blank excluded) of one row's CTC logits [T, 1 + K] (repeats merged, blanks dropped)."""
    ids = logits[:frames].argmax(-1).tolist()
    out, prev = [], None
    for i in ids:
        if i != prev and i != 0:
            out.append(i - 1)
        prev = i
    return out


class _ManifestAlign(Sequence):
    """(features [T, Din], LLM audio ids [T] or None, transcript token ids) per manifest record."""

    def __init__(self, records: list[dict[str, Any]], audio_key: str, text_key: str, tokenizer: Any,
                 features: AudioCache, ids: AudioCache | None):
        self.items = [(r[audio_key], r[text_key]) for r in records]
        self.tok, self.features, self.ids = tokenizer, features, ids

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        path, text = self.items[i]
        f = self.features.get(path)["features"]
        a = None
        if self.ids is not None:
            a = self.ids.get(path)["audio_tokens"]
            f = match_length(f, a.numel())
        return f, a, list(self.tok.encode(text))


class _SyntheticAlign(Sequence):
    """Random features whose frames each carry one of a few token ids (learnable; tests only)."""

    def __init__(self, n: int, dim: int, n_text: int, offset: int, audio_vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.protos = torch.randn(16, dim, generator=g)
        self.n, self.n_text, self.offset, self.av, self.seed = n, n_text, offset, audio_vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        k = int(torch.randint(3, 7, (1,), generator=g))
        cls = torch.randint(0, 16, (k,), generator=g)
        frames = cls.repeat_interleave(3)  # every token held for 3 frames
        f = self.protos[frames] + 0.1 * torch.randn(frames.numel(), self.protos.shape[1], generator=g)
        ids = self.offset + frames % self.av
        return f, ids, [int(c) % self.n_text for c in cls]


class AlignRecipe(Recipe):
    name = "align"

    def __init__(self, cfg: AlignTrainConfig, dataset: Sequence | None = None):
        self.cfg = cfg
        if not cfg.init or not (Path(cfg.init) / "config.json").is_file():
            raise ConfigError(f"align: init {cfg.init!r} is not a native LLM folder (config.json + model.safetensors)")
        self.init = Path(cfg.init)
        self.lm_config = AudioLMConfig.from_json(self.init / "config.json")
        self._dataset = dataset
        self._tokenizer = None

    def tokenizer(self):
        if self._tokenizer is None:
            from kimia.train.assemble import folder_tokenizer

            self._tokenizer = folder_tokenizer(self.init)
        return self._tokenizer

    def build_model(self, device: torch.device) -> nn.Module:
        from kimia.tokens import SpecialTokens

        lm, cfg = load_native_lm(self.init, device=torch.device("cpu"), dtype=torch.float32)
        emb = lm.model.embed_tokens.weight.detach()
        if self.cfg.classes not in ("all", "data"):
            raise ConfigError(f"align classes must be 'all' or 'data', got {self.cfg.classes!r}")
        classes = None
        if self.cfg.classes == "data":
            classes = torch.tensor(sorted({t for t in self._transcript_ids() for t in t}), dtype=torch.long)
        model = AlignModel(cfg, emb, lm.model.vq_adaptor.state_dict(), train_audio_rows=self.cfg.train_audio_rows,
                           feature_dropout=self.cfg.feature_dropout, classes=classes)
        if self.cfg.data.synthetic > 0:
            blank = cfg.pad_token_id
        else:
            blank = SpecialTokens.from_config(cfg.to_dict(), self.tokenizer()).text_blank
        model.set_blank(emb[blank])
        del lm
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("align: %.2f M trainable parameters (adaptor%s), %d text classes + blank", n / 1e6,
                    " + audio rows" if self.cfg.train_audio_rows else "", model.class_ids.numel())
        return model.to(device)

    def _transcript_ids(self) -> list[list[int]]:
        ds = self.dataset()
        if isinstance(ds, _ManifestAlign):  # text only: no audio is read
            return [list(self.tokenizer().encode(t)) for _, t in ds.items]
        return [ds[i][2] for i in range(len(ds))]

    def dataset(self) -> Sequence:
        if self._dataset is None:
            d, c = self.cfg.data, self.lm_config
            if d.synthetic > 0:
                self._dataset = _SyntheticAlign(d.synthetic, c.kimia_adaptor_input_dim, c.num_base_tokens,
                                                c.kimia_token_offset, c.vocab_size - c.kimia_token_offset,
                                                seed=self.cfg.train.seed)
            elif d.manifests:
                from kimia.encoders.whisper import load_continuous_extractor

                recs = read_audio_manifest(d.manifests, [d.audio_key, d.text_key])
                feats = AudioCache(token_offset=c.kimia_token_offset, cache_dir=d.feature_cache,
                                   features=load_continuous_extractor(d.whisper, device="cpu", padding=d.whisper_padding))
                ids = None
                if d.semantic_tokenizer:
                    from kimia.encoders.semantic import load_semantic_tokenizer

                    ids = AudioCache(token_offset=c.kimia_token_offset, cache_dir=d.id_cache,
                                     semantic=load_semantic_tokenizer(d.semantic_tokenizer, device="cpu"))
                self._dataset = _ManifestAlign(recs, d.audio_key, d.text_key, self.tokenizer(), feats, ids)
            else:
                raise ConfigError("align: data.manifests is empty and data.synthetic is 0: nothing to train on")
        return self._dataset

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor | None, list[int]]]) -> AlignBatch:
        T = max(f.shape[0] for f, _, _ in items)
        B, D = len(items), items[0][0].shape[-1]
        feats = torch.zeros(B, T, D)
        ids = torch.full((B, T), self.lm_config.kimia_token_offset, dtype=torch.long)
        for i, (f, a, _) in enumerate(items):
            feats[i, : f.shape[0]] = f
            if a is not None:
                ids[i, : a.numel()] = a
            n_spans = int(self.cfg.time_mask * f.shape[0] / max(1, self.cfg.mask_span))
            if n_spans > 0:  # masked frames keep their VQ id: only the continuous features are hidden
                for s in torch.randint(0, max(1, f.shape[0] - self.cfg.mask_span + 1), (n_spans,)).tolist():
                    feats[i, s: s + self.cfg.mask_span] = 0
        targets = [t or [0] for _, _, t in items]
        return AlignBatch(feats, ids if items[0][1] is not None else None,
                          torch.tensor([f.shape[0] for f, _, _ in items]),
                          torch.tensor([x for t in targets for x in t], dtype=torch.long),
                          torch.tensor([len(t) for t in targets]))

    def loss(self, model: nn.Module, batch: AlignBatch, phase: str) -> LossOutput:
        loss = model(batch)
        return LossOutput(loss, tokens=int(batch.frames.sum()),
                          metrics={"scale": float(getattr(model, "module", model).log_scale.detach().exp())})

    def held_out_wer(self, model: AlignModel) -> dict[str, Any] | None:
        """Greedy CTC WER of `model` on `data.eval_manifests` (first `eval_limit` records), or None."""
        d = self.cfg.data
        if not d.eval_manifests or d.synthetic > 0:
            return None
        from kimia.eval.metrics import corpus_wer

        ds = self.dataset()
        recs = read_audio_manifest(d.eval_manifests, [d.audio_key, d.text_key])[: d.eval_limit]
        held = _ManifestAlign(recs, d.audio_key, d.text_key, self.tokenizer(), ds.features, ds.ids)
        pairs = []
        model.eval()
        with torch.no_grad():
            for i in range(len(held)):
                f, a, _ = held[i]
                hyp = self.tokenizer().decode(model.decode(model.logits(f[None], None if a is None else a[None])[0]))
                pairs.append((held.items[i][1], hyp))
        st = corpus_wer(pairs)
        return {"wer": round(100.0 * st.errors / max(1, st.ref_words), 2), "utterances": len(pairs),
                "examples": [{"ref": r, "hyp": h} for r, h in pairs[:3]]}

    def export(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        model = self.build_model(torch.device("cpu"))
        model.load_state_dict(state_dict)
        held = self.held_out_wer(model)
        if held is not None:
            logger.info("align: greedy CTC WER on %d held-out clips: %.2f%%", held["utterances"], held["wer"])
        lm, _ = load_native_lm(self.init, device=torch.device("cpu"), dtype=torch.float32)
        ad = {k[len("adaptor."):]: v for k, v in state_dict.items() if k.startswith("adaptor.")}
        lm.model.vq_adaptor.load_state_dict(ad)
        with torch.no_grad():
            lm.model.embed_tokens.weight[self.lm_config.kimia_token_offset:] = state_dict["audio_rows"]
        save_native_lm(lm, folder)
        copy_folder_files(self.init, folder, skip=_NATIVE_FILES)
        (folder / "align.json").write_text(json.dumps({"init": str(self.init.resolve()), "held_out": held,
                                                       "logit_scale": float(state_dict["log_scale"].exp())}) + "\n")
        logger.info("exported the aligned LLM folder to %s", folder)

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)


def train_align(cfg: AlignTrainConfig, dataset: Sequence | None = None, env=None):
    """Build the recipe and trainer, train, export when the run is complete; returns (trainer, history)."""
    from kimia.train.common import run_recipe

    return run_recipe(AlignRecipe(cfg, dataset), cfg, env)


__all__ = ["AlignTrainConfig", "AlignDataSpec", "AlignModel", "AlignBatch", "AlignRecipe", "greedy_ctc", "train_align"]
