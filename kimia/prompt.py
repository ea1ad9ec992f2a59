"""Messages -> the two aligned id streams Kimi-Audio reads (audio stream, text stream) plus masks.

Kimi-Audio's LLM consumes two equal-length id sequences: the audio stream (role markers, media markers,
semantic audio ids) and the text stream (text ids, with the blank filler wherever the other stream carries
the content), a mask of the positions where continuous Whisper features are added, and, for training,
loss masks. This module builds them from the official message format
`{"role": "user"|"assistant", "message_type": "text"|"audio"|"audio-text"|None, "content": ...}` exactly
as the reference prompt manager does (role markers on role change, ct/ctd and msg_end when a turn closes,
text EOS after assistant text, the 6-blank audio delay under `audio-text` history), and pads several
prompts into one batch for batched prefill.

The audio encoders are injected as callables (`audio_tokenizer(wave) -> semantic ids`,
`feature_extractor(wave) -> [1, N, D]`, both on a mono 16 kHz float32 waveform [S]) so this module depends
on neither encoder; a message may also carry precomputed `audio_tokens` (LLM ids, already offset) and
`features`. `build_many` builds N prompts with ONE call of each encoder over every waveform of every
conversation (kimia's encoders batch across files when given a list; `batched_encoders=True`), instead of
one call per audio message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import torch

from kimia.audio import SAMPLE_RATE, load_audio
from kimia.errors import KimiaError, PromptError
from kimia.tokens import SpecialTokens, Tokenizer

log = logging.getLogger(__name__)

ROLES = ("user", "assistant")
MESSAGE_TYPES = ("text", "audio", "audio-text", None)
OutputType = Literal["text", "both"]

AudioTokenizerFn = Callable[[torch.Tensor], "Sequence[int] | torch.Tensor"]
FeatureExtractorFn = Callable[[torch.Tensor], torch.Tensor]
AudioLoaderFn = Callable[[Path], torch.Tensor]


class Message(TypedDict, total=False):
    """One chat message in the official format.

    content: text -> str; audio -> a file path, a waveform (numpy/torch, with `sample_rate`, default 16 kHz)
    or a `(waveform, sample_rate)` pair; audio-text -> `[audio, transcript]`; None -> nothing.
    audio_tokens: precomputed LLM audio ids (semantic id + token offset), used instead of the tokenizer.
    features: precomputed continuous features [N, D] or [1, N, D] for an `audio` message.
    """

    role: str
    message_type: str | None
    content: Any
    audio_tokens: Sequence[int]
    features: torch.Tensor
    sample_rate: int


@dataclass
class PromptBatch:
    """One prompt: equal-length streams [L] and the continuous features of its audio spans, in span order."""

    audio_ids: torch.Tensor  # [L] long
    text_ids: torch.Tensor  # [L] long
    continuous_mask: torch.Tensor  # [L] bool: positions that also receive a Whisper feature vector
    audio_loss_mask: torch.Tensor  # [L] bool
    text_loss_mask: torch.Tensor  # [L] bool
    features: list[torch.Tensor] = field(default_factory=list)  # [N_k, D] per continuous span (may be empty)
    spans: list[tuple[int, int]] = field(default_factory=list)  # (start, length) of each continuous span

    def __len__(self) -> int:
        return int(self.audio_ids.shape[0])

    def to(self, device: torch.device | str, feature_dtype: torch.dtype | None = None) -> "PromptBatch":
        return PromptBatch(
            self.audio_ids.to(device), self.text_ids.to(device), self.continuous_mask.to(device),
            self.audio_loss_mask.to(device), self.text_loss_mask.to(device),
            [f.to(device=device, dtype=feature_dtype or f.dtype) for f in self.features], list(self.spans),
        )


@dataclass
class CollatedPrompts:
    """Several prompts padded to one length L for batched prefill (B rows)."""

    audio_ids: torch.Tensor  # [B, L] long, pad_id where padded
    text_ids: torch.Tensor  # [B, L] long
    continuous_mask: torch.Tensor  # [B, L] bool
    audio_loss_mask: torch.Tensor  # [B, L] bool
    text_loss_mask: torch.Tensor  # [B, L] bool
    attention_mask: torch.Tensor  # [B, L] bool, True on real tokens
    positions: torch.Tensor  # [B, L] long: 0..len-1 on real tokens, 0 on padding
    lengths: torch.Tensor  # [B] long
    features: list[torch.Tensor]  # every span's features, row by row in span order
    spans: list[tuple[int, int, int]]  # (row, start, length) of each continuous span, in padded coordinates


class _Streams:
    """Parallel python lists that grow together (kept equal length by construction)."""

    def __init__(self) -> None:
        self.audio: list[int] = []
        self.text: list[int] = []
        self.cont: list[bool] = []
        self.aloss: list[bool] = []
        self.tloss: list[bool] = []
        self.features: list[torch.Tensor | None] = []
        self.spans: list[tuple[int, int]] = []

    def add(self, audio: Sequence[int], text: Sequence[int], *, cont: bool = False, aloss: bool = False, tloss: bool = False) -> None:
        assert len(audio) == len(text)
        n = len(audio)
        self.audio.extend(int(a) for a in audio)
        self.text.extend(int(t) for t in text)
        self.cont.extend([cont] * n)
        self.aloss.extend([aloss] * n)
        self.tloss.extend([tloss] * n)


def _load_audio_file(path: Path) -> torch.Tensor:
    """Default loader: any supported format, mixed to mono, resampled to 16 kHz, validated (kimia.audio)."""
    return load_audio(path)


class PromptBuilder:
    """Builds `PromptBatch`es from messages with one tokenizer, special-token table and audio encoders.

    batched_encoders: the encoders also accept a list of waveforms and return a list of results in order
    (kimia's SemanticTokenizer and ContinuousFeatureExtractor do); `build_many` then calls each once.
    """

    def __init__(self, tokenizer: Tokenizer, specials: SpecialTokens, audio_tokenizer: AudioTokenizerFn | None = None,
                 feature_extractor: FeatureExtractorFn | None = None, *, audio_loader: AudioLoaderFn | None = None,
                 batched_encoders: bool = False):
        self.tokenizer = tokenizer
        self.specials = specials
        self.audio_tokenizer = audio_tokenizer
        self.feature_extractor = feature_extractor
        self.audio_loader = audio_loader or _load_audio_file
        self.batched_encoders = batched_encoders

    # ---- public -------------------------------------------------------------------------------------------
    def build(self, messages: Sequence[Message], output_type: OutputType = "text", add_assistant_start: bool = True,
              *, speech_targets: bool = False) -> PromptBatch:
        """The prompt of `messages`; `output_type` picks ct ("text") or ctd ("both") after user audio.

        `add_assistant_start=False` gives the training layout (no trailing assistant marker).
        `speech_targets=True` (training) turns assistant `audio-text` messages into spoken-answer targets laid
        out exactly as the engine generates them in "both" mode: the transcript + text EOS on the text stream
        over `audio_delay` blanks + the semantic ids on the audio stream, the turn closed by `msg_end` (the
        audio stop id), with loss on the transcript, its EOS, the ids and that `msg_end`. Without it an
        `audio-text` message is conversation history as the official inference builder writes it (no EOS,
        no loss).
        """
        self._check_all(messages, output_type)
        return self._build(messages, output_type, add_assistant_start, {}, speech_targets)

    def build_many(self, conversations: Sequence[Sequence[Message]], output_type: OutputType = "text",
                   add_assistant_start: bool = True, *, errors: Literal["raise", "return"] = "raise",
                   speech_targets: bool = False) -> list[PromptBatch | KimiaError]:
        """The prompts of several conversations, equal to `build` on each, with the audio of ALL of them
        encoded together: one audio-tokenizer call and one feature-extractor call in total (with
        `batched_encoders`; otherwise one call per waveform, still without repeats).

        errors="raise": the first failing conversation's error is raised (a PromptError names the
        conversation); "return": its error object takes its place in the returned list and the others build.
        """
        if errors not in ("raise", "return"):
            raise PromptError(f"errors must be 'raise' or 'return', got {errors!r}")
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
            raise PromptError(f"conversations must be a list of message lists, got {type(conversations).__name__}")
        n = len(conversations)
        failed: dict[int, KimiaError] = {}
        caches: list[dict[int, dict[str, Any]]] = [{} for _ in range(n)]
        id_jobs: list[tuple[int, int, torch.Tensor]] = []  # (conversation, message, waveform)
        feat_jobs: list[tuple[int, int, torch.Tensor]] = []
        for c, msgs in enumerate(conversations):
            try:
                self._check_all(msgs, output_type)
                for i, m in enumerate(msgs):
                    kind = m.get("message_type")
                    if kind not in ("audio", "audio-text"):
                        continue
                    source = m.get("content") if kind == "audio" else m["content"][0]
                    cache = caches[c].setdefault(i, {})
                    if m.get("audio_tokens") is None and self.audio_tokenizer is not None:
                        id_jobs.append((c, i, self._wave(source, m, i, cache)))
                    if (kind == "audio" and m.get("features") is None and self.feature_extractor is not None
                            and source is not None):
                        feat_jobs.append((c, i, self._wave(source, m, i, cache)))
            except KimiaError as e:
                failed[c] = e
        for key, fn, jobs in (("raw", self.audio_tokenizer, id_jobs), ("feats", self.feature_extractor, feat_jobs)):
            jobs = [j for j in jobs if j[0] not in failed]
            for (c, i, _), out in zip(jobs, self._encode_all(fn, jobs, failed)):
                if out is not None:
                    caches[c][i][key] = out
        results: list[PromptBatch | KimiaError] = []
        for c, msgs in enumerate(conversations):
            if c not in failed:
                try:
                    results.append(self._build(msgs, output_type, add_assistant_start, caches[c], speech_targets))
                    continue
                except KimiaError as e:
                    failed[c] = e
            e = failed[c]
            if errors == "raise":
                if isinstance(e, PromptError):
                    raise PromptError(f"conversation {c}: {e}") from None
                raise e
            results.append(e)
        return results

    def _encode_all(self, fn: Callable | None, jobs: list[tuple[int, int, torch.Tensor]],
                    failed: dict[int, KimiaError]) -> list[Any]:
        """fn over every job's waveform: one batched call; if it fails, one call each so that the error
        lands on its own conversation. Results in job order (None where that conversation failed)."""
        if not jobs:
            return []
        waves = [w for _, _, w in jobs]
        if self.batched_encoders:
            try:
                out = fn(waves)
                if isinstance(out, (list, tuple)) and len(out) == len(waves):
                    return list(out)
                raise PromptError(f"a batched audio encoder returned {type(out).__name__} for {len(waves)} waveforms")
            except KimiaError:
                log.debug("batched audio encoding failed; encoding one by one to find the culprit", exc_info=True)
        outs: list[Any] = []
        for c, i, w in jobs:
            try:
                outs.append(fn(w) if c not in failed else None)
            except KimiaError as e:
                failed[c] = e
                outs.append(None)
        return outs

    # ---- building -----------------------------------------------------------------------------------------
    def _check_all(self, messages: Any, output_type: str) -> None:
        if output_type not in ("text", "both"):
            raise PromptError(f"output_type must be 'text' or 'both', got {output_type!r}")
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise PromptError(f"messages must be a list of message dicts, got {type(messages).__name__}")
        if len(messages) == 0:
            raise PromptError("empty message list: a prompt needs at least one message")
        for i, m in enumerate(messages):
            self._check(i, m)

    def _build(self, messages: Sequence[Message], output_type: str, add_assistant_start: bool,
               caches: dict[int, dict[str, Any]], speech_targets: bool = False) -> PromptBatch:
        """Streams of checked messages; caches[i] may hold message i's waveform ("w"), tokenizer output
        ("raw") and features ("feats") computed beforehand."""
        sp, s = self.specials, _Streams()
        for i, m in enumerate(messages):
            role = m["role"]
            if i == 0 or messages[i - 1]["role"] != role:
                s.add([sp.user_msg_start if role == "user" else sp.assistant_msg_start], [sp.text_blank])
            closes = i == len(messages) - 1 or messages[i + 1]["role"] != role
            kind = m.get("message_type")
            if kind == "text":
                self._text(s, m, role)
            elif kind == "audio":
                self._audio(s, m, i, role, closes, output_type, caches.setdefault(i, {}))
            elif kind == "audio-text":
                target = speech_targets and role == "assistant"
                self._audio_text(s, m, i, caches.setdefault(i, {}), target=target)
                if closes and target:  # the audio stream's stop id is the turn's msg_end: learn to say it
                    s.add([sp.msg_end], [sp.text_blank], aloss=True)
                    continue
            if closes:
                s.add([sp.msg_end], [sp.text_blank])
        if add_assistant_start:
            s.add([sp.assistant_msg_start], [sp.text_blank])
        return self._finish(s)

    # ---- validation ---------------------------------------------------------------------------------------
    def _check(self, i: int, m: Any) -> None:
        if not isinstance(m, dict):
            raise PromptError(f"message {i}: must be a dict with role/message_type/content, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            hint = " (Kimi-Audio has no system role; put instructions in a user text message)" if role == "system" else ""
            raise PromptError(f"message {i}: unknown role {role!r}; expected one of {ROLES}{hint}")
        kind = m.get("message_type")
        if kind not in MESSAGE_TYPES:
            raise PromptError(f"message {i}: unknown message_type {kind!r}; expected 'text', 'audio', 'audio-text' or None")
        content = m.get("content")
        if kind == "text" and not isinstance(content, str):
            raise PromptError(f"message {i}: text content must be a str, got {type(content).__name__}")
        if kind == "audio" and content is None and "audio_tokens" not in m:
            raise PromptError(f"message {i}: audio message needs content (path or waveform) or audio_tokens")
        if kind == "audio-text":
            if not isinstance(content, (list, tuple)) or len(content) != 2 or not isinstance(content[1], str):
                raise PromptError(f"message {i}: audio-text content must be [audio, transcript str], got {content!r:.80}")

    # ---- message kinds ------------------------------------------------------------------------------------
    def _text(self, s: _Streams, m: Message, role: str) -> None:
        ids = list(self.tokenizer.encode(m["content"]))
        sp = self.specials
        assistant = role == "assistant"
        s.add([sp.text_blank] * len(ids), ids, tloss=assistant)
        if assistant:
            s.add([sp.text_blank], [sp.text_eos], tloss=True)

    def _audio(self, s: _Streams, m: Message, i: int, role: str, closes: bool, output_type: str,
               wave_cache: dict[str, Any]) -> None:
        sp = self.specials
        ids = self._audio_ids(m, m.get("content"), i, wave_cache)
        assistant = role == "assistant"
        s.add([sp.media_begin], [sp.text_blank])
        start = len(s.audio)
        s.add(ids, [sp.text_blank] * len(ids), cont=True, aloss=assistant)
        s.add([sp.media_end], [sp.text_blank], aloss=assistant)
        s.spans.append((start, len(ids)))
        s.features.append(self._features(m, m.get("content"), i, len(ids), wave_cache))
        if closes:
            s.add([sp.speech_ct if output_type == "text" else sp.speech_ctd], [sp.text_blank])

    def _audio_text(self, s: _Streams, m: Message, i: int, cache: dict[str, Any], *, target: bool = False) -> None:
        """Transcript over delayed audio ids; as a spoken-answer target (`target`) the transcript ends with
        the text EOS and both streams carry loss (see `build(speech_targets=)`)."""
        sp = self.specials
        audio, transcript = m["content"]
        ids = self._audio_ids(m, audio, i, cache)
        text = list(self.tokenizer.encode(transcript)) + ([sp.text_eos] if target else [])
        width = sp.audio_delay + len(ids)
        if len(text) > width:
            raise PromptError(
                f"message {i}: audio-text transcript has {len(text)} tokens{' (with its EOS)' if target else ''} "
                f"but its audio allows at most {width} ({len(ids)} audio tokens + {sp.audio_delay} delay); "
                "shorten the transcript")
        if not target:
            s.add([sp.text_blank] * sp.audio_delay + ids, text + [sp.text_blank] * (width - len(text)))
            return
        # Per position: text loss while the transcript (and its EOS) is being written, audio loss on the ids.
        audio_ids = [sp.text_blank] * sp.audio_delay + ids
        for k in range(width):
            s.add([audio_ids[k]], [text[k] if k < len(text) else sp.text_blank],
                  aloss=k >= sp.audio_delay, tloss=k < len(text))

    # ---- audio helpers ------------------------------------------------------------------------------------
    def _wave(self, source: Any, m: Message, i: int, cache: dict[str, torch.Tensor]) -> torch.Tensor:
        if "w" in cache:
            return cache["w"]
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise PromptError(f"message {i}: audio file not found: {path}")
            wave = self.audio_loader(path)
        elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], (int, np.integer)):
            wave = self._array(source[0], int(source[1]), i)
        elif isinstance(source, (np.ndarray, torch.Tensor)):
            wave = self._array(source, int(m.get("sample_rate", SAMPLE_RATE)), i)
        else:
            raise PromptError(f"message {i}: audio content must be a file path, a waveform array/tensor or "
                              f"(waveform, sample_rate), got {type(source).__name__}")
        cache["w"] = wave
        return wave

    @staticmethod
    def _array(x: np.ndarray | torch.Tensor, sr: int, i: int) -> torch.Tensor:
        a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        if a.ndim == 2:  # channels along the short axis
            a = a.mean(axis=0 if a.shape[0] <= a.shape[1] else 1)
        if a.ndim != 1:
            raise PromptError(f"message {i}: waveform must be 1-D (or 2-D multichannel), got shape {a.shape}")
        return load_audio(a, sr, name=f"message {i} waveform")

    def _audio_ids(self, m: Message, source: Any, i: int, cache: dict[str, torch.Tensor]) -> list[int]:
        off = self.specials.token_offset
        if m.get("audio_tokens") is not None:
            ids = [int(t) for t in (m["audio_tokens"].tolist() if isinstance(m["audio_tokens"], torch.Tensor) else m["audio_tokens"])]
            bad = [t for t in ids if t < off]
            if bad:
                raise PromptError(f"message {i}: audio_tokens must be LLM ids (semantic id + offset {off}); got {bad[:5]}")
        else:
            if self.audio_tokenizer is None:
                raise PromptError(f"message {i}: audio needs an audio tokenizer (none given) or precomputed audio_tokens")
            raw = cache["raw"] if "raw" in cache else self.audio_tokenizer(self._wave(source, m, i, cache))
            raw = raw.reshape(-1).tolist() if isinstance(raw, torch.Tensor) else [int(t) for t in raw]
            if any(t < 0 for t in raw):
                raise PromptError(f"message {i}: audio tokenizer returned negative ids")
            ids = [int(t) + off for t in raw]
        if not ids:
            raise PromptError(f"message {i}: audio gave no semantic tokens (too short?)")
        return ids

    def _features(self, m: Message, source: Any, i: int, n: int, cache: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if m.get("features") is not None:
            feats = m["features"]
        elif self.feature_extractor is not None:
            if source is None:
                raise PromptError(f"message {i}: continuous features need the audio content (or 'features') "
                                  "besides audio_tokens")
            feats = cache["feats"] if "feats" in cache else self.feature_extractor(self._wave(source, m, i, cache))
        else:
            return None
        if not isinstance(feats, torch.Tensor):
            raise PromptError(f"message {i}: features must be a tensor, got {type(feats).__name__}")
        if feats.dim() == 3 and feats.shape[0] == 1:
            feats = feats[0]
        if feats.dim() != 2 or feats.shape[0] != n:
            raise PromptError(f"message {i}: continuous features of shape {tuple(feats.shape)} do not match the "
                              f"{n} audio tokens of the span (expected [{n}, D])")
        return feats

    def _finish(self, s: _Streams) -> PromptBatch:
        have = [f is not None for f in s.features]
        if any(have) and not all(have):
            raise PromptError("some audio spans have continuous features and others do not; give a feature "
                              "extractor or 'features' for every audio message")
        return PromptBatch(
            audio_ids=torch.tensor(s.audio, dtype=torch.long),
            text_ids=torch.tensor(s.text, dtype=torch.long),
            continuous_mask=torch.tensor(s.cont, dtype=torch.bool),
            audio_loss_mask=torch.tensor(s.aloss, dtype=torch.bool),
            text_loss_mask=torch.tensor(s.tloss, dtype=torch.bool),
            features=[f for f in s.features if f is not None],
            spans=list(s.spans),
        )


def collate(batches: Sequence[PromptBatch], pad_id: int, side: Literal["left", "right"] = "left") -> CollatedPrompts:
    """Pad prompts to a common length L (left padding by default, so every row's last token is at L-1)."""
    if not batches:
        raise PromptError("collate() needs at least one prompt")
    if side not in ("left", "right"):
        raise PromptError(f"padding side must be 'left' or 'right', got {side!r}")
    B, L = len(batches), max(len(b) for b in batches)
    ids_a = torch.full((B, L), pad_id, dtype=torch.long)
    ids_t = torch.full((B, L), pad_id, dtype=torch.long)
    cont, aloss, tloss, attn = (torch.zeros(B, L, dtype=torch.bool) for _ in range(4))
    positions = torch.zeros(B, L, dtype=torch.long)
    features: list[torch.Tensor] = []
    spans: list[tuple[int, int, int]] = []
    for r, b in enumerate(batches):
        n = len(b)
        lo = L - n if side == "left" else 0
        sl = slice(lo, lo + n)
        ids_a[r, sl], ids_t[r, sl] = b.audio_ids.cpu(), b.text_ids.cpu()
        cont[r, sl], aloss[r, sl], tloss[r, sl] = b.continuous_mask.cpu(), b.audio_loss_mask.cpu(), b.text_loss_mask.cpu()
        attn[r, sl] = True
        positions[r, sl] = torch.arange(n)
        spans.extend((r, lo + start, length) for start, length in b.spans)
        features.extend(b.features)
    return CollatedPrompts(ids_a, ids_t, cont, aloss, tloss, attn, positions,
                           torch.tensor([len(b) for b in batches], dtype=torch.long), features, spans)


__all__ = ["Message", "PromptBatch", "CollatedPrompts", "PromptBuilder", "collate", "SAMPLE_RATE"]
