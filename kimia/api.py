"""`KimiAudio`: the official package's surface (generate -> (wav, text)) plus streaming and batching.

This is the layer that wires the parts together (DESIGN.md layering): a model folder is loaded once on one
resolved device/dtype (`kimia.model_folder`), messages become prompts (`kimia.prompt.PromptBuilder` with the
semantic tokenizer and the Whisper feature extractor as its audio encoders), the `Engine` generates ids, and
the streaming detokenizer turns semantic ids into 24 kHz audio.

`generate` keeps the official signature, parameter names and defaults and returns `(wav [1, S] float32 at
24 kHz or None, text)`. There is ONE decoding loop, `generate_batch_stream`: all prompts built together
(`PromptBuilder.build_many`, one call per audio encoder), one batched engine decode, per-row incremental text
decoding and a per-row streaming detokenizer (sharing the model's DiT and vocoder) fed on the release's
offline chunk schedule (30-token chunks, the last one final), so streamed PCM concatenates to the offline
waveform. `generate`, `generate_stream` and `generate_batch` (and the server's batcher) are views of it.
A voice prompt (`speaker_prompt`: audio or a (mel, ids) pair, see `voice_prompt`) prefills each answer's
detokenizer and applies to that call only.

Randomness: `seed` builds one generator for LLM sampling and, per answer, one (CPU, as the release draws noise
on the CPU) for the detokenizer noise, so a batched answer's audio equals its single run.
Length limits are configuration (`Budgets`) and raise `BudgetError`.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kimia.errors import AudioError, BudgetError, ConfigError, PromptError

log = logging.getLogger(__name__)

OUTPUT_SAMPLE_RATE = 24000
ASR_INSTRUCTION = "Please transcribe the spoken content into written text."


@dataclass
class Budgets:
    """Length limits of one model instance (official values: 1500 / 7500 context positions).

    max_context_both / max_context_text: prompt + generated positions per answer, by output type.
    max_audio_seconds: longest input clip accepted (None: no limit besides the context budget).
    max_batch: most conversations per `generate_batch` call (None: no limit).
    """

    max_context_both: int = 1500
    max_context_text: int = 7500
    max_audio_seconds: float | None = None
    max_batch: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_context_both", "max_context_text"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"Budgets.{name} must be positive, got {getattr(self, name)}")
        if self.max_audio_seconds is not None and not self.max_audio_seconds > 0:
            raise ConfigError(f"Budgets.max_audio_seconds must be positive or None, got {self.max_audio_seconds}")
        if self.max_batch is not None and self.max_batch <= 0:
            raise ConfigError(f"Budgets.max_batch must be positive or None, got {self.max_batch}")


# ------------------------------------------------------------------------------------------ stream events
# Every event carries `row`: the index of its conversation in the call (always 0 for `generate_stream`).
@dataclass(frozen=True)
class StreamStart:
    """The conversation's prompt was built and fits the budget (`generate_batch_stream` only)."""

    row: int
    prompt_tokens: int


@dataclass(frozen=True)
class StreamError:
    """The conversation could not start (bad messages, audio, budget); with errors="yield" only."""

    row: int
    error: Exception


@dataclass(frozen=True)
class TextPiece:
    """New text of the answer: `delta` (what was added) and `text` (everything so far)."""

    delta: str
    text: str
    row: int = 0


@dataclass(frozen=True)
class AudioPiece:
    """A chunk of the spoken answer: mono float32 PCM [S] at `sample_rate` (24 kHz)."""

    pcm: torch.Tensor
    sample_rate: int = OUTPUT_SAMPLE_RATE
    row: int = 0


@dataclass(frozen=True)
class StreamEnd:
    """Last event of a row: the full text, the full waveform [1, S] (None in text mode / without
    detokenizer), the raw semantic ids, why generation stopped, loop steps and prompt positions."""

    text: str
    wav: torch.Tensor | None
    audio_ids: list[int]
    stop_reason: str
    row: int = 0
    steps: int = 0
    prompt_tokens: int = 0


StreamEvent = StreamStart | StreamError | TextPiece | AudioPiece | StreamEnd


class _TextStream:
    """Incremental decoding of text ids (UTF-8 that a token boundary cut in half is held back)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._bytes = hasattr(tokenizer, "decode_bytes")
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        if self._bytes:
            delta = self._dec.decode(self.tok.decode_bytes(ids))
        else:
            full = self.tok.decode(self.ids)
            delta = full[len(self.text):] if full.startswith(self.text) else full
        self.text += delta
        return delta

    def finish(self) -> str:
        delta = self._dec.decode(b"", final=True) if self._bytes else ""
        self.text += delta
        return delta


class _AudioStream:
    """Feeds semantic ids to the streaming detokenizer on the release's offline chunk schedule
    (first `first_chunk_size`, then `chunk_size` tokens; a chunk is sent only once a later token proves it is
    not the last one, so every chunk gets the same `is_final` flag as in `StreamingDetokenizer.detokenize`)."""

    def __init__(self, detok: Any):
        self.detok = detok
        self.buf: list[int] = []
        self.first = True
        self.pieces: list[torch.Tensor] = []

    def _size(self) -> int:
        c = self.detok.config
        return c.first_chunk_size if self.first else c.chunk_size

    def add(self, ids: Sequence[int]) -> list[torch.Tensor]:
        self.buf.extend(ids)
        out = []
        while len(self.buf) > self._size():
            n = self._size()
            chunk, self.buf = self.buf[:n], self.buf[n:]
            self.first = False
            out.append(self.detok.push(torch.tensor([chunk], dtype=torch.long), is_final=False)[0])
        self.pieces.extend(out)
        return out

    def finish(self) -> torch.Tensor | None:
        if not self.buf and self.first:
            return None
        pcm = self.detok.push(torch.tensor([self.buf], dtype=torch.long), is_final=True)[0]
        self.buf = []
        self.pieces.append(pcm)
        return pcm

    def wav(self) -> torch.Tensor:
        if not self.pieces:
            return torch.zeros(1, 0)
        return torch.cat(self.pieces).float()[None]


class KimiAudio:
    """Kimi-Audio: hear audio (and text), answer in text or in text + 24 kHz speech.

    model_path: a model folder (official release layout or kimia's native layout, see kimia.model_folder), the
        name of a shipped model, or None: $KIMIA_MODEL, else kimia's own shipped model `kimia-small`.
    load_detokenizer: False skips the detokenizer and vocoder (text answers only; `both` returns wav None).
    device, dtype: default cuda > mps > cpu and bfloat16 on CUDA, float32 elsewhere.
    quantize: "auto" (what the model folder recommends for the device: kimia-small runs its LLM in int8 on CPU;
        official release folders run exact), "int8" (weight-only, `kimia.quantize`) or None (exact).
    budgets: length limits (`Budgets`). **paths: component overrides such as `semantic_tokenizer_path=`.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, load_detokenizer: bool = True,
                 device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, *, budgets: Budgets | None = None,
                 quantize: str | None = "auto", **paths: Any):
        from kimia.audio import load_audio
        from kimia.engine import Engine
        from kimia.model_folder import load_model_folder
        from kimia.prompt import PromptBuilder

        self.budgets = budgets or Budgets()
        self.parts = load_model_folder(resolve_model_path(model_path), load_detokenizer=load_detokenizer, device=device,
                                       dtype=dtype, quantize=quantize, **paths)
        p = self.parts
        self.device, self.dtype = p.device, p.dtype
        self.tokenizer, self.specials = p.tokenizer, p.specials
        self.detokenizer = p.detokenizer
        self.kimia_token_offset = p.specials.token_offset
        self._load_audio = load_audio
        self.prompt_builder = PromptBuilder(
            p.tokenizer, p.specials, audio_tokenizer=p.semantic_tokenizer, feature_extractor=p.feature_extractor,
            audio_loader=self._audio_file, batched_encoders=True)
        self.engine = Engine(p.lm, p.specials, device=p.device, dtype=p.dtype)

    # ------------------------------------------------------------------ helpers
    def _audio_file(self, path: os.PathLike) -> torch.Tensor:
        """Validated 16 kHz mono waveform of an input file, within the audio-duration budget."""
        wave = self._load_audio(path)
        limit = self.budgets.max_audio_seconds
        seconds = wave.shape[0] / 16000
        if limit is not None and seconds > limit:
            raise BudgetError(f"{path}: {seconds:.1f} s of audio exceeds the input budget of {limit:g} s "
                              "(Budgets.max_audio_seconds)")
        return wave

    def generation_config(self, output_type: str = "text", max_new_tokens: int = -1, **sampling: Any):
        """The engine's `GenerationConfig` for official `generate` keywords, within this model's budgets."""
        from kimia.engine import GenerationConfig

        cfg = GenerationConfig.from_official(output_type=output_type, max_new_tokens=max_new_tokens, **sampling)
        cfg.max_context_both = int(self.budgets.max_context_both)
        cfg.max_context_text = int(self.budgets.max_context_text)
        return cfg

    @staticmethod
    def _seed(seed: Any, what: str = "seed") -> int | None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"{what} must be an int or None, got {type(seed).__name__}")
        return seed

    def voice_prompt(self, audio: Any, sample_rate: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A reference voice for the detokenizer: audio (path, file bytes or an open binary file, array/tensor
        at `sample_rate`, default 16 kHz for arrays, or a `(array, sample_rate)` pair) -> (mel [4n, 80] float32, the 24 kHz
        log-mel of `kimia.detokenizer.mel`; semantic ids [n] long, from the loaded tokenizer at 16 kHz),
        trimmed to the same length (`upsample_factor` mel frames per token). Reuse it across calls."""
        from kimia.audio import load_audio
        from kimia.detokenizer.mel import SAMPLE_RATE as MEL_RATE, mel_frames

        if isinstance(audio, (tuple, list)) and len(audio) == 2 and isinstance(audio[1], (int, np.integer)):
            audio, sample_rate = audio[0], int(audio[1])
        if isinstance(audio, io.IOBase):  # read once: it is decoded twice below (24 kHz mel, 16 kHz ids)
            audio = audio.read()
        if isinstance(audio, (np.ndarray, torch.Tensor)) and sample_rate is None:
            sample_rate = 16000
        name = f"speaker_prompt {audio}" if isinstance(audio, (str, os.PathLike)) else "speaker_prompt audio"
        try:
            w24 = load_audio(audio, sample_rate, target_sr=MEL_RATE, name=name)
            w16 = load_audio(audio, sample_rate, target_sr=16000, name=name)
        except AudioError as e:
            raise PromptError(str(e)) from None
        ids = self.parts.semantic_tokenizer.tokenize(w16).reshape(-1).long()
        mel = mel_frames(w24)
        up = self.detokenizer.config.upsample_factor if self.detokenizer is not None else 4
        n = min(ids.shape[0], mel.shape[0] // up)
        if n == 0:
            raise PromptError(f"speaker_prompt: {w16.shape[0] / 16000:.3f} s of audio is too short for one semantic "
                              f"token ({up} mel frames)")
        return mel[: n * up].float(), ids[:n]

    def _speaker(self, speaker_prompt: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """speaker_prompt as (mel [T, 80], ids [T / upsample]): audio is converted, a (mel, ids) pair checked."""
        if speaker_prompt is None:
            return None
        pair = isinstance(speaker_prompt, (tuple, list)) and len(speaker_prompt) == 2
        if pair and not isinstance(speaker_prompt[1], (int, np.integer)):
            mel, ids = (torch.as_tensor(x) for x in speaker_prompt)
            if mel.dim() != 2 or mel.shape[-1] != 80 or ids.dim() != 1 or ids.is_floating_point():
                raise PromptError(f"speaker_prompt (mel, ids) must be a [T, 80] mel and [n] integer ids, got "
                                  f"{tuple(mel.shape)} and {tuple(ids.shape)} {ids.dtype}")
            return mel.float(), ids.long()
        if pair or isinstance(speaker_prompt, (str, os.PathLike, bytes, bytearray, np.ndarray, torch.Tensor)):
            return self.voice_prompt(speaker_prompt)
        raise PromptError("speaker_prompt must be an audio file path, a waveform (+ sample rate) or a (mel [T, 80] "
                          f"at 24 kHz, semantic ids [T/4]) pair, got {type(speaker_prompt).__name__}")

    def _row_detokenizer(self, seed: int | None, voice: tuple[torch.Tensor, torch.Tensor] | None):
        """A fresh streaming state over the shared DiT and vocoder (noise seeded per answer)."""
        from kimia.detokenizer.stream import StreamingDetokenizer

        d = self.detokenizer
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        row = StreamingDetokenizer(d.dit, d.vocoder, d.config, generator=gen, noise_provider=d.noise_provider)
        if voice is not None:
            row.prefill_voice(*voice)
        return row

    def detokenize_text(self, text_ids: Sequence[int]) -> str:
        """Text of generated ids (audio-range ids dropped, cut at the text EOS), as the official API."""
        out = []
        for t in text_ids:
            if t == self.specials.text_eos:
                break
            if t < self.kimia_token_offset:
                out.append(int(t))
        return self.tokenizer.decode(out)

    def detokenize_audio(self, audio_ids: Sequence[int] | torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Raw semantic ids -> waveform [1, S] float32 at 24 kHz (the release's 30-token chunk schedule).
        `seed`: the DiT noise of this call alone, drawn as `generate(..., seed=seed)` draws an answer's (same
        ids, same seed: the same waveform); None: the detokenizer's own generator (or torch's global one)."""
        if self.detokenizer is None:
            raise ConfigError("this KimiAudio was created with load_detokenizer=False: no audio synthesis")
        ids = torch.as_tensor(audio_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            return torch.zeros(1, 0)
        d = self.detokenizer if seed is None else self._row_detokenizer(self._seed(seed), None)
        return d.detokenize(ids[None]).float().cpu()

    # ------------------------------------------------------------------ the one streaming loop
    def _stream(self, conversations: Sequence[Sequence[dict]], output_type: str, *, seed: int | None,
                audio_seeds: Sequence[int | None] | None, generator: torch.Generator | None, speaker_prompt: Any,
                max_new_tokens: int, errors: str, cancelled: Callable[[int], bool] | None, label: bool,
                sampling: dict[str, Any]) -> Iterator[StreamEvent]:
        from kimia.engine import AudioTokens, Finished, TextDelta

        if errors not in ("raise", "yield"):
            raise ConfigError(f"errors must be 'raise' or 'yield', got {errors!r}")
        cfg = self.generation_config(output_type, max_new_tokens, **sampling)
        n = len(conversations)
        seed = self._seed(seed)
        if audio_seeds is None:
            audio_seeds = [seed] * n
        elif len(audio_seeds) != n:
            raise ConfigError(f"audio_seeds has {len(audio_seeds)} entries for {n} conversations")
        audio_seeds = [self._seed(s, "audio_seeds entry") for s in audio_seeds]
        built = self.prompt_builder.build_many(conversations, output_type, errors="return")
        rows: list[int] = []  # engine row -> conversation index
        prompts = []
        for k, p in enumerate(built):
            if not isinstance(p, Exception):
                try:
                    cfg.steps_for(len(p))
                except BudgetError as e:
                    p = e
            if isinstance(p, Exception):
                if errors == "raise":
                    if label and isinstance(p, PromptError):
                        raise PromptError(f"conversation {k}: {p}") from None
                    raise p
                yield StreamError(k, p)
                continue
            rows.append(k)
            prompts.append(p)
        if not prompts:
            return
        speak = output_type == "both" and self.detokenizer is not None
        voice = self._speaker(speaker_prompt) if speak else None
        for k, p in zip(rows, prompts):
            yield StreamStart(k, len(p))
        if generator is None and seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        text = [_TextStream(self.tokenizer) for _ in rows]
        audio = [_AudioStream(self._row_detokenizer(audio_seeds[k], voice)) if speak else None for k in rows]
        stop = None if cancelled is None else (lambda r: bool(cancelled(rows[r])))
        events = self.engine.stream(prompts, cfg, generator, audio_chunk=1, cancel=stop)
        try:
            for ev in events:
                r, k = ev.row, rows[ev.row]
                if isinstance(ev, TextDelta):
                    delta = text[r].add(ev.ids)
                    if delta:
                        yield TextPiece(delta, text[r].text, k)
                elif isinstance(ev, AudioTokens):
                    if audio[r] is not None and not (cancelled is not None and cancelled(k)):
                        for pcm in audio[r].add(ev.ids):
                            if pcm.numel():
                                yield AudioPiece(pcm.float(), row=k)
                elif isinstance(ev, Finished):
                    delta = text[r].finish()
                    if delta:
                        yield TextPiece(delta, text[r].text, k)
                    wav = None
                    if audio[r] is not None and ev.result.stop_reason != "cancelled":
                        pcm = audio[r].finish()
                        if pcm is not None and pcm.numel():
                            yield AudioPiece(pcm.float(), row=k)
                        wav = audio[r].wav()
                    res = ev.result
                    yield StreamEnd(text[r].text, wav, list(res.audio_ids), res.stop_reason, k, res.steps,
                                    res.prompt_length)
        finally:
            events.close()

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate_batch_stream(self, conversations: Sequence[Sequence[dict]], output_type: str = "text", *,
                              seed: int | None = None, audio_seeds: Sequence[int | None] | None = None,
                              generator: torch.Generator | None = None, speaker_prompt: Any = None,
                              max_new_tokens: int = -1, errors: str = "raise",
                              cancelled: Callable[[int], bool] | None = None, **sampling: Any) -> Iterator[StreamEvent]:
        """Answer many conversations in one batched decode, streaming per-row events as they are produced.

        Events (each with `row` = the conversation's index): `StreamStart` for every conversation that
        starts, then interleaved `TextPiece`s and `AudioPiece`s (24 kHz PCM, "both" mode), and one
        `StreamEnd` per row when it stops. All prompts are built with one call per audio encoder
        (`PromptBuilder.build_many`). Sampling keywords as in `generate`.

        seed: seeds LLM sampling (unless `generator` is given) and every row's detokenizer noise;
        audio_seeds: per-row detokenizer noise seeds instead (None entries: unseeded). A row's answer
        equals `generate(seed=...)` for the same seed under greedy sampling.
        errors: "raise" (a bad conversation raises before anything is decoded; a PromptError names it) or
        "yield" (it becomes a `StreamError` and the others go on). cancelled(row) -> True: the row stops at
        the next step (StreamEnd with stop_reason "cancelled", no more audio synthesised for it).
        """
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence) or not conversations:
            raise PromptError("generate_batch() takes a non-empty list of conversations (each a list of messages)")
        if self.budgets.max_batch is not None and len(conversations) > self.budgets.max_batch:
            raise BudgetError(f"{len(conversations)} conversations exceed the batch budget of {self.budgets.max_batch} "
                              "(Budgets.max_batch)")
        yield from self._stream(conversations, output_type, seed=seed, audio_seeds=audio_seeds, generator=generator,
                                speaker_prompt=speaker_prompt, max_new_tokens=max_new_tokens, errors=errors,
                                cancelled=cancelled, label=True, sampling=sampling)

    @torch.inference_mode()
    def generate(self, messages: Sequence[dict], output_type: str = "text", audio_temperature: float = 0.0,
                 audio_top_k: int = 5, text_temperature: float = 0.0, text_top_k: int = 5,
                 audio_repetition_penalty: float = 1.0, audio_repetition_window_size: int = 64,
                 text_repetition_penalty: float = 1.0, text_repetition_window_size: int = 16,
                 max_new_tokens: int = -1, seed: int | None = None, speaker_prompt: Any = None):
        """Answer one conversation. Returns (wav [1, S] float32 @ 24 kHz or None, text).

        speaker_prompt: a reference voice for the spoken answer ("both" mode): an audio file path, a
        waveform (16 kHz, or `(waveform, sample_rate)`), or a precomputed (mel [T, 80], semantic ids [T/4])
        pair (see `voice_prompt`). It applies to this call only."""
        kw = dict(audio_temperature=audio_temperature, audio_top_k=audio_top_k, text_temperature=text_temperature,
                  text_top_k=text_top_k, audio_repetition_penalty=audio_repetition_penalty,
                  audio_repetition_window_size=audio_repetition_window_size,
                  text_repetition_penalty=text_repetition_penalty, text_repetition_window_size=text_repetition_window_size)
        for ev in self.generate_stream(messages, output_type, seed=seed, speaker_prompt=speaker_prompt,
                                       max_new_tokens=max_new_tokens, **kw):
            if isinstance(ev, StreamEnd):
                return ev.wav, ev.text
        raise AssertionError("unreachable: the stream always ends with StreamEnd")  # pragma: no cover

    @torch.inference_mode()
    def generate_batch(self, conversations: Sequence[Sequence[dict]], output_type: str = "text", seed: int | None = None,
                       speaker_prompt: Any = None, max_new_tokens: int = -1, **sampling: Any) -> list[tuple[torch.Tensor | None, str]]:
        """Answer many conversations in one batched generation; returns [(wav or None, text)] in order.
        Sampling keywords as in `generate`. Under greedy sampling each answer equals its single `generate`."""
        out: list[tuple[torch.Tensor | None, str] | None] = [None] * len(conversations or [])
        for ev in self.generate_batch_stream(conversations, output_type, seed=seed, speaker_prompt=speaker_prompt,
                                             max_new_tokens=max_new_tokens, **sampling):
            if isinstance(ev, StreamEnd):
                out[ev.row] = (ev.wav, ev.text)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def generate_stream(self, messages: Sequence[dict], output_type: str = "text", seed: int | None = None,
                        speaker_prompt: Any = None, max_new_tokens: int = -1, **sampling: Any) -> Iterator[StreamEvent]:
        """Answer one conversation incrementally: `TextPiece`s as text ids decode, `AudioPiece`s (24 kHz PCM)
        as soon as the detokenizer has a chunk, then one `StreamEnd`. Sampling keywords as in `generate`.
        The pieces concatenate to what `generate` returns for the same arguments and seed."""
        for ev in self._stream([messages], output_type, seed=seed, audio_seeds=None, generator=None,
                               speaker_prompt=speaker_prompt, max_new_tokens=max_new_tokens, errors="raise",
                               cancelled=None, label=False, sampling=sampling):
            if not isinstance(ev, StreamStart):
                yield ev


def load_model(model_path: str | os.PathLike | None = None, **kwargs: Any) -> KimiAudio:
    """`KimiAudio(model_path, **kwargs)`."""
    return KimiAudio(model_path, **kwargs)


DEFAULT_MODEL = "kimia-small"
MODEL_ENV = "KIMIA_MODEL"


def models_dir() -> Path:
    """Where the shipped models live: `models/` beside the `kimia` package (the repository checkout)."""
    return Path(__file__).resolve().parent.parent / "models"


def available_models() -> list[str]:
    """Names of the shipped models that `KimiAudio(name)` loads without a path."""
    root = models_dir()
    return sorted(p.name for p in root.iterdir() if (p / "kimia.json").is_file()) if root.is_dir() else []


def resolve_model_path(model_path: str | os.PathLike | None) -> Path:
    """A model folder for `model_path`: a folder as given; a shipped model's name; None -> $KIMIA_MODEL, else
    the shipped default (`kimia-small`). ConfigError naming what was looked for otherwise."""
    if model_path is None:
        model_path = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    p = Path(model_path).expanduser()
    if p.is_dir():
        return p
    shipped = models_dir() / str(model_path)
    if (shipped / "kimia.json").is_file():
        return shipped
    if str(model_path) == DEFAULT_MODEL:
        raise ConfigError(f"the shipped default model {DEFAULT_MODEL!r} is not at {shipped} (kimia's models/ folder "
                          "comes with a source checkout: pip install -e .); pass a model folder instead")
    return p  # not a folder: the loader names it


__all__ = ["KimiAudio", "Budgets", "StreamStart", "StreamError", "TextPiece", "AudioPiece", "StreamEnd", "StreamEvent",
           "load_model", "available_models", "models_dir", "resolve_model_path", "DEFAULT_MODEL", "ASR_INSTRUCTION",
           "OUTPUT_SAMPLE_RATE"]
