"""Datasets and collate for training the audio LLM.

Examples come from jsonl manifests in the official finetune format (reference KIMI_AUDIO.md §9):
`{"task_type": "understanding" | "speech2speech" | ..., "conversation": [messages as in §4]}`. Each example
is turned into the two streams + loss masks by the same `PromptBuilder` the engine uses (training layout: no
trailing assistant marker; "understanding" -> output_type "text" (ct token), anything else -> "both" (ctd)),
so training and inference can never disagree on the prompt format.

Audio content: an audio message may already carry `audio_tokens` (LLM ids) and `features`; otherwise the
semantic ids and Whisper features are computed from its file by frozen encoders, either on the fly or once
into a cache folder (`AudioCache`, one safetensors file per audio file keyed by the file's content).

`collate_lm` right-pads a list of prompts and builds the training targets exactly as the official finetune
code: both id streams shifted left by one with the pad id appended, loss masks shifted the same way.
`SyntheticLMDataset` makes small learnable conversations with precomputed ids/features for tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from kimia.checkpoints.common import save_safetensors
from kimia.data.manifest import link_atomic
from kimia.errors import ConfigError, PromptError
from kimia.lm.model import scatter_continuous
from kimia.prompt import PromptBatch, PromptBuilder, collate
from kimia.tokens import SpecialTokens, release_special_table

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ batch
@dataclass
class LMBatch:
    """Right-padded training batch; labels/masks already shifted (position t predicts the id at t+1)."""

    audio_ids: torch.Tensor  # [B, L] long
    text_ids: torch.Tensor  # [B, L] long
    positions: torch.Tensor  # [B, L] long
    audio_labels: torch.Tensor  # [B, L] long
    text_labels: torch.Tensor  # [B, L] long
    audio_loss_mask: torch.Tensor  # [B, L] bool (shifted)
    text_loss_mask: torch.Tensor  # [B, L] bool (shifted)
    continuous: torch.Tensor | None  # [B, L, Din] or None
    continuous_mask: torch.Tensor | None  # [B, L] bool or None
    tokens: int = 0  # real (non-pad) positions


def shift_left(x: torch.Tensor, fill: int | bool) -> torch.Tensor:
    """[B, L] -> [B, L]: x[:, 1:] with `fill` appended (the official label construction)."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], fill)], dim=1)


def collate_lm(prompts: Sequence[PromptBatch], *, pad_id: int, media_begin: int, media_end: int,
               adaptor_dim: int) -> LMBatch:
    c = collate(prompts, pad_id, side="right")
    cont = cmask = None
    if c.features:
        cont, cmask = scatter_continuous(c.audio_ids, c.features, media_begin=media_begin, media_end=media_end,
                                         dim=adaptor_dim)
    return LMBatch(
        audio_ids=c.audio_ids, text_ids=c.text_ids, positions=c.positions,
        audio_labels=shift_left(c.audio_ids, pad_id), text_labels=shift_left(c.text_ids, pad_id),
        audio_loss_mask=shift_left(c.audio_loss_mask, False), text_loss_mask=shift_left(c.text_loss_mask, False),
        continuous=cont, continuous_mask=cmask, tokens=int(c.lengths.sum()),
    )


def truncate_prompt(pb: PromptBatch, max_len: int) -> PromptBatch:
    """Cut a prompt to at most `max_len` positions, never inside an audio span (the span is dropped whole)."""
    if len(pb) <= max_len:
        return pb
    cut = max_len
    for start, n in pb.spans:  # span occupies [start-1 (media_begin), start+n (media_end)]
        if start - 1 < cut <= start + n:
            cut = start - 1
    keep = [k for k, (s, n) in enumerate(pb.spans) if s + n < cut]
    sl = slice(0, cut)
    return PromptBatch(pb.audio_ids[sl], pb.text_ids[sl], pb.continuous_mask[sl], pb.audio_loss_mask[sl],
                       pb.text_loss_mask[sl], [pb.features[k] for k in keep if k < len(pb.features)],
                       [pb.spans[k] for k in keep])


# ------------------------------------------------------------------------------------------ audio cache
class AudioCache:
    """Semantic ids + Whisper features of audio files from frozen encoders, optionally cached on disk.

    `semantic(wave [S]) -> ids` (raw codebook ids) and `features(wave [S]) -> [1, N, D]` are the frozen
    encoders (either may be None). `token_offset` turns codebook ids into LLM ids. Cache entries are keyed by
    the file's bytes (so a copy or hard link of a file elsewhere, e.g. in a grown corpus, finds its entry) and
    by how the features are made (a `ContinuousFeatureExtractor`'s padding), so one cache folder never serves
    30 s-padded features to a clip-padded run or back. Entries written under the earlier key (the file's
    path, size and mtime) are still read. One cache folder belongs to one pair of encoders: entries do not
    record which VQ or Whisper made them."""

    def __init__(self, *, token_offset: int, semantic: Callable | None = None, features: Callable | None = None,
                 cache_dir: str | os.PathLike | None = None, loader: Callable[[Path], torch.Tensor] | None = None):
        self.offset, self.semantic, self.features = token_offset, semantic, features
        self.dir = Path(cache_dir) if cache_dir else None
        padding = getattr(features, "padding", "segment")
        self._mode = "" if padding == "segment" else f"|{padding}"  # segment keys as before: old caches stay valid
        self._digests: dict[tuple[str, int, int], str] = {}
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
        if loader is None:
            from kimia.prompt import _load_audio_file as loader  # noqa: N813 - the builder's own loader
        self.loader = loader

    def _key(self, path: Path) -> str:
        st = path.stat()
        stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if stamp not in self._digests:  # hashed once per file and process
            self._digests[stamp] = hashlib.sha1(path.read_bytes()).hexdigest()
        return hashlib.sha1(f"content|{self._digests[stamp]}{self._mode}".encode()).hexdigest()

    def _path_key(self, path: Path) -> str:
        st = path.stat()
        return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}{self._mode}".encode()).hexdigest()

    def _entry(self, path: Path, folder: Path | None = None) -> Path | None:
        """The cache file of `path` in `folder` (default: this cache's), under either key, or None."""
        folder = folder or self.dir
        if folder is None:
            return None
        for key in (self._key(path), self._path_key(path)):
            if (folder / f"{key}.safetensors").is_file():
                return folder / f"{key}.safetensors"
        return None

    def adopt(self, folder: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> int:
        """Link into this cache the entries that another cache folder, made by the same encoders, holds for
        `paths` (files as they are now); returns how many were linked. Entries are keyed by content, so the
        same audio at another path (a grown corpus's hard links) then finds them."""
        if self.dir is None:
            raise ConfigError("this AudioCache has no cache folder to adopt entries into")
        n = 0
        for p in map(Path, paths):
            dst = self.dir / f"{self._key(p)}.safetensors"
            src = None if dst.is_file() else self._entry(p, Path(folder))
            if src is not None:
                link_atomic(src, dst)
                n += 1
        return n

    def get(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        path = Path(path)
        if not path.is_file():
            raise PromptError(f"audio file not found: {path}")
        hit = self._entry(path)
        if hit is not None:
            return load_file(str(hit))
        cached = self.dir / f"{self._key(path)}.safetensors" if self.dir else None
        wave = self.loader(path)
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.semantic is not None:
                ids = torch.as_tensor(self.semantic(wave)).reshape(-1).long()
                out["audio_tokens"] = ids + self.offset
            if self.features is not None:
                f = self.features(wave)
                f = f[0] if f.dim() == 3 else f
                n = out["audio_tokens"].numel() if "audio_tokens" in out else f.shape[0]
                out["features"] = f[:n].float().cpu().contiguous()
        if cached is not None:
            save_safetensors(out, cached)
        return out


# ------------------------------------------------------------------------------------------ datasets
def _jsonl_records(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, line number, record) of every non-empty line; a missing file, bad JSON or a non-object record
    raises ConfigError naming the file and line."""
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"manifest not found: {p}")
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{n}: invalid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{p}:{n}: a record must be a JSON object")
            yield p, n, rec


def read_manifests(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Every `{"task_type", "conversation"}` record of the jsonl files (relative audio paths resolved
    against the manifest's folder)."""
    out = []
    for p, n, rec in _jsonl_records(paths):
        conv = rec.get("conversation")
        if not isinstance(conv, list) or not conv:
            raise ConfigError(f"{p}:{n}: record has no 'conversation' list")
        for m in conv:
            if m.get("message_type") in ("audio", "audio-text"):
                c = m.get("content")
                if isinstance(c, str) and not os.path.isabs(c):
                    m["content"] = str(p.parent / c)
                elif isinstance(c, list) and c and isinstance(c[0], str) and not os.path.isabs(c[0]):
                    m["content"] = [str(p.parent / c[0]), *c[1:]]
        out.append(rec)
    return out


def match_length(feats: torch.Tensor, n: int, slack: int = 2) -> torch.Tensor:
    """Features [N', D] cut to the n semantic ids of the span; up to `slack` missing frames (rounding at the
    end of the audio between the two encoders) are filled by repeating the last frame."""
    feats = feats[0] if feats.dim() == 3 else feats
    if feats.shape[0] >= n:
        return feats[:n]
    if n - feats.shape[0] <= slack:
        return torch.cat([feats, feats[-1:].expand(n - feats.shape[0], -1)])
    raise PromptError(f"{feats.shape[0]} feature frames for {n} semantic ids: the two encoders disagree on length")


def output_type_of(task_type: str | None) -> str:
    return "text" if task_type in (None, "understanding", "asr", "text") else "both"


class ManifestLMDataset:
    """Indexable training prompts from manifest records, built lazily by `PromptBuilder`.

    Long-form ASR (`concat_prob` > 0): a record of corpus task "asr" is, with that probability, joined with 1 to
    `concat_max - 1` other ASR records (chosen by a generator seeded with the index, so example i is always the
    same): one audio span of their concatenated semantic ids and Whisper features, one transcript of their
    joined texts. Synthetic clips are single sentences; real prompts run to 15 s and more, and this teaches the
    model to keep transcribing over spans longer than any one training clip.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], builder: PromptBuilder, *, max_len: int = 0,
                 audio: AudioCache | None = None, concat_prob: float = 0.0, concat_max: int = 3, seed: int = 0):
        self.records, self.builder, self.max_len, self.audio = list(records), builder, max_len, audio
        self.concat_prob, self.concat_max, self.seed = concat_prob, concat_max, seed
        self.asr = [i for i, r in enumerate(self.records) if r.get("task") == "asr"]
        if concat_prob > 0 and concat_max < 2:
            raise ConfigError(f"concat_max must be >= 2 when concat_prob > 0, got {concat_max}")

    def __len__(self) -> int:
        return len(self.records)

    def _messages(self, rec: Mapping[str, Any]) -> list[dict[str, Any]]:
        msgs = []
        for m in rec["conversation"]:
            m = dict(m)
            if m.get("message_type") == "audio" and self.audio is not None and isinstance(m.get("content"), str):
                got = self.audio.get(m["content"])
                for k, v in got.items():
                    m.setdefault(k, v)
            if m.get("message_type") == "audio" and m.get("features") is not None and m.get("audio_tokens") is not None:
                m["features"] = match_length(m["features"], len(m["audio_tokens"]))
            msgs.append(m)
        return msgs

    def _joined(self, i: int) -> list[dict[str, Any]] | None:
        """Messages of example i as long-form ASR, or None when it stays as it is."""
        import random

        rec = self.records[i]
        if self.concat_prob <= 0 or rec.get("task") != "asr" or len(self.asr) < 2:
            return None
        rng = random.Random(self.seed * 1_000_003 + i)
        if rng.random() >= self.concat_prob:
            return None
        others = [j for j in rng.sample(self.asr, min(len(self.asr), self.concat_max)) if j != i]
        parts = [self._messages(rec)] + [self._messages(self.records[j]) for j in others[: rng.randint(1, self.concat_max - 1)]]
        audios = [next(m for m in p if m.get("message_type") == "audio") for p in parts]
        answers = [next(m for m in p if m["role"] == "assistant")["content"] for p in parts]
        if any(a.get("audio_tokens") is None for a in audios):
            return None
        joined = {"role": "user", "message_type": "audio", "content": None,
                  "audio_tokens": [int(t) for a in audios for t in torch.as_tensor(a["audio_tokens"]).tolist()]}
        if all(a.get("features") is not None for a in audios):
            joined["features"] = torch.cat([torch.as_tensor(a["features"]) for a in audios])
        out = []
        for m in parts[0]:
            if m.get("message_type") == "audio":
                out.append(joined)
            elif m["role"] == "assistant":
                out.append({**m, "content": " ".join(a.strip() for a in answers)})
            else:
                out.append(m)
        return out

    def __getitem__(self, i: int) -> PromptBatch:
        rec = self.records[i]
        msgs = self._joined(i) or self._messages(rec)
        try:
            pb = self.builder.build(msgs, output_type=output_type_of(rec.get("task_type")), add_assistant_start=False,
                                    speech_targets=True)
        except PromptError as e:
            raise PromptError(f"training record {i}: {e}") from e
        return truncate_prompt(pb, self.max_len) if self.max_len > 0 else pb


class IdTokenizer:
    """Tokenizer for synthetic data: text is whitespace-separated integer ids ("12 7 99" -> [12, 7, 99]);
    the release special order starts at `special_base`."""

    def __init__(self, special_base: int):
        self._specials = release_special_table(special_base)
        self._n = special_base + len(self._specials)

    @property
    def n_vocab(self) -> int:
        return self._n

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._specials

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


class SyntheticLMDataset:
    """Small learnable conversations on a model config's vocabulary (for tests and smoke runs).

    Each example: a user audio span of random semantic ids with random features; the assistant answers
    with text ids that are a fixed function of the audio ids ("understanding"), or (every third example,
    "speech2speech") with text plus the audio ids echoed back as an assistant audio span."""

    def __init__(self, n: int, *, num_base_tokens: int, token_offset: int, audio_vocab: int, adaptor_dim: int,
                 audio_delay: int = 6, seed: int = 0, min_audio: int = 4, max_audio: int = 10):
        self.tok = IdTokenizer(num_base_tokens)
        self.specials = SpecialTokens.from_tokenizer(self.tok, token_offset=token_offset, audio_delay=audio_delay)
        self.builder = PromptBuilder(self.tok, self.specials)
        self.n, self.seed = n, seed
        self.nb, self.off, self.av, self.dim = num_base_tokens, token_offset, min(audio_vocab, 64), adaptor_dim
        self.lo, self.hi = min_audio, max_audio

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> PromptBatch:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        n = int(torch.randint(self.lo, self.hi + 1, (1,), generator=g))
        sem = torch.randint(0, self.av, (n,), generator=g)
        feats = torch.randn(n, self.dim, generator=g)
        answer = " ".join(str(int(s) % min(self.nb, 50)) for s in sem[: max(1, n // 2)])
        conv: list[dict[str, Any]] = [
            {"role": "user", "message_type": "audio", "content": None, "audio_tokens": (sem + self.off).tolist(),
             "features": feats},
            {"role": "assistant", "message_type": "text", "content": answer},
        ]
        task = "understanding"
        if i % 3 == 2:
            task = "speech2speech"
            conv.append({"role": "assistant", "message_type": "audio", "content": None,
                         "audio_tokens": (sem + self.off).tolist(), "features": feats})
        return self.builder.build(conv, output_type=output_type_of(task), add_assistant_start=False, speech_targets=True)



# ---------------------------------------------------------------- text-only conversations
def text_qa_records(n: int, *, seed: int = 0, eval_fraction: float = 0.1, dialogue_share: float = 0.2
                    ) -> list[dict[str, Any]]:
    """`n` text-only conversations of the corpus' spoken-question kinds (`kimia.data.texts`: arithmetic,
    counting, facts, instructions) and two-turn dialogues, in the finetune format ("understanding"), drawn
    from `random.Random(f"text_qa:{seed}")`. Only questions of the train split (`texts.split_of` of the question,
    of a dialogue's first turn, as the corpus splits them) are kept, so the corpus' held-out spoken questions
    stay unseen in any form. Text is cheap to train on (no audio positions): the LLM learns the answers' logic
    here and meets the same questions spoken in the corpus."""
    import random

    from kimia.data import texts

    rng = random.Random(f"text_qa:{seed}")
    out: list[dict[str, Any]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 100:
            raise ConfigError(f"text_qa: only {len(out)} of {n} train-split questions found")
        qa = texts.dialogue(rng) if rng.random() < dialogue_share else texts.spoken_question(rng)
        if texts.split_of(qa.turns[0][0] if qa.turns else qa.question, eval_fraction) != "train":
            continue
        conv: list[dict[str, Any]] = []
        for u, a in qa.turns:
            conv += [{"role": "user", "message_type": "text", "content": u},
                     {"role": "assistant", "message_type": "text", "content": a}]
        conv += [{"role": "user", "message_type": "text", "content": qa.question},
                 {"role": "assistant", "message_type": "text", "content": qa.answer}]
        out.append({"task_type": "understanding", "task": "text_qa", "conversation": conv})
    return out


# ---------------------------------------------------------------- audio manifests (VQ, DiT, vocoder recipes)
def _resolve_path(p: str, manifest: Path) -> str:
    """Absolute paths as they are; relative ones against the manifest's folder, else the corpus root
    (the manifest's grandparent: `kimia data synth` writes <root>/manifests/*.jsonl)."""
    if os.path.isabs(p):
        return p
    for base in (manifest.parent, manifest.parent.parent):
        if (base / p).exists():
            return str(base / p)
    return str(manifest.parent / p)


def read_audio_manifest(paths: Iterable[str | os.PathLike], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Records of jsonl manifests that have every field of `keys` non-empty (others are counted and skipped);
    fields ending in `_path` are resolved to usable paths."""
    out: list[dict[str, Any]] = []
    skipped = 0
    for p, _n, rec in _jsonl_records(paths):
        if any(not isinstance(rec.get(k), str) or not rec[k] for k in keys):
            skipped += 1
            continue
        for k in keys:
            if k.endswith("_path"):
                rec[k] = _resolve_path(rec[k], p)
        out.append(rec)
    if skipped:
        logger.info("manifests: skipped %d records without %s", skipped, ", ".join(keys))
    if not out:
        raise ConfigError(f"no usable records (with {', '.join(keys)}) in {[str(p) for p in paths]}")
    return out

__all__ = ["text_qa_records", "LMBatch", "collate_lm", "shift_left", "truncate_prompt", "AudioCache", "read_manifests", "read_audio_manifest",
           "ManifestLMDataset", "SyntheticLMDataset", "IdTokenizer", "output_type_of"]
