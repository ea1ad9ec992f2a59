"""`KimiAudio`: the official package's surface (generate -> (wav, text)) plus streaming and batching.

This is the layer that wires the parts together (DESIGN.md layering): a model folder is loaded once on one
resolved device/dtype (`kimia.model_folder`), messages become prompts (`kimia.prompt.PromptBuilder` with the
semantic tokenizer and the Whisper feature extractor as its audio encoders), the `Engine` generates ids, and
the streaming detokenizer turns semantic ids into 24 kHz audio.

`generate` keeps the official signature, parameter names and defaults and returns `(wav [1, S] float32 at
24 kHz or None, text)`. Audio is synthesised with the release's chunk schedule (30-token chunks, the last one
final). `generate_stream` drives the same loop but pushes audio ids into the detokenizer as they arrive, with
exactly the same chunk boundaries and noise draws, so its PCM pieces concatenate to `generate`'s waveform and
its text deltas to `generate`'s text. `generate_batch` runs many conversations through the engine's batching.

Randomness: `seed` builds one generator for LLM sampling and one (CPU, as the release draws noise on the CPU)
for the detokenizer noise; the detokenizer generator is re-seeded for every answer, so a batched answer's
audio equals its single run. Length limits are configuration (`Budgets`) and raise `BudgetError`.
"""

from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kimia.errors import BudgetError, ConfigError, PromptError

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
@dataclass(frozen=True)
class TextPiece:
    """New text of the answer: `delta` (what was added) and `text` (everything so far)."""

    delta: str
    text: str


@dataclass(frozen=True)
class AudioPiece:
    """A chunk of the spoken answer: mono float32 PCM [S] at `sample_rate` (24 kHz)."""

    pcm: torch.Tensor
    sample_rate: int = OUTPUT_SAMPLE_RATE


@dataclass(frozen=True)
class StreamEnd:
    """Last event: the full text, the full waveform [1, S] (None in text mode / without detokenizer),
    the raw semantic ids and why generation stopped."""

    text: str
    wav: torch.Tensor | None
    audio_ids: list[int]
    stop_reason: str


StreamEvent = TextPiece | AudioPiece | StreamEnd


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

    model_path: a model folder (official release layout or kimia's native layout, see kimia.model_folder).
    load_detokenizer: False skips the detokenizer and vocoder (text answers only; `both` returns wav None).
    device, dtype: default cuda > mps > cpu and bfloat16 on CUDA, float32 elsewhere.
    budgets: length limits (`Budgets`). **paths: component overrides such as `semantic_tokenizer_path=`.
    """

    def __init__(self, model_path: str | os.PathLike, load_detokenizer: bool = True, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, *, budgets: Budgets | None = None, **paths: Any):
        from kimia.audio import load_audio
        from kimia.engine import Engine
        from kimia.model_folder import load_model_folder
        from kimia.prompt import PromptBuilder

        self.budgets = budgets or Budgets()
        self.parts = load_model_folder(model_path, load_detokenizer=load_detokenizer, device=device, dtype=dtype, **paths)
        p = self.parts
        self.device, self.dtype = p.device, p.dtype
        self.tokenizer, self.specials = p.tokenizer, p.specials
        self.detokenizer = p.detokenizer
        self.kimia_token_offset = p.specials.token_offset
        self._load_audio = load_audio
        self.prompt_builder = PromptBuilder(
            p.tokenizer, p.specials, audio_tokenizer=p.semantic_tokenizer, feature_extractor=p.feature_extractor,
            audio_loader=self._audio_file)
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

    def _config(self, output_type: str, max_new_tokens: int, kw: dict[str, Any]):
        from kimia.engine import GenerationConfig

        cfg = GenerationConfig.from_official(output_type=output_type, max_new_tokens=max_new_tokens, **kw)
        cfg.max_context_both = int(self.budgets.max_context_both)
        cfg.max_context_text = int(self.budgets.max_context_text)
        return cfg

    def _generators(self, seed: int | None) -> tuple[torch.Generator | None, torch.Generator | None]:
        if seed is None:
            return None, None
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an int or None, got {type(seed).__name__}")
        return torch.Generator(self.device).manual_seed(seed), torch.Generator().manual_seed(seed)

    def _prompt(self, messages: Any, output_type: str):
        return self.prompt_builder.build(messages, output_type=output_type)

    def _start_audio(self, speaker_prompt: Any, detok_gen: torch.Generator | None) -> None:
        """Reset the detokenizer for a new answer (voice prompt prefilled when given)."""
        d = self.detokenizer
        d.generator = detok_gen
        if speaker_prompt is None:
            d.reset()
            return
        if not (isinstance(speaker_prompt, (tuple, list)) and len(speaker_prompt) == 2):
            raise PromptError("speaker_prompt must be (mel [T, 80] at 24 kHz / hop 480, semantic ids [T/4]); "
                              "reading it from an audio file needs the vocoder mel front end, which kimia does not have yet")
        mel, ids = speaker_prompt
        d.prefill_voice(torch.as_tensor(mel), torch.as_tensor(ids))

    def detokenize_text(self, text_ids: Sequence[int]) -> str:
        """Text of generated ids (audio-range ids dropped, cut at the text EOS), as the official API."""
        out = []
        for t in text_ids:
            if t == self.specials.text_eos:
                break
            if t < self.kimia_token_offset:
                out.append(int(t))
        return self.tokenizer.decode(out)

    def detokenize_audio(self, audio_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Raw semantic ids -> waveform [1, S] float32 at 24 kHz (the release's 30-token chunk schedule)."""
        if self.detokenizer is None:
            raise ConfigError("this KimiAudio was created with load_detokenizer=False: no audio synthesis")
        ids = torch.as_tensor(audio_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            return torch.zeros(1, 0)
        return self.detokenizer.detokenize(ids[None]).float().cpu()

    def _answer(self, result: Any, output_type: str, speaker_prompt: Any, detok_gen_seed: int | None):
        text = self.tokenizer.decode(result.text_ids)
        if output_type != "both" or self.detokenizer is None:
            return None, text
        self._start_audio(speaker_prompt, self._generators(detok_gen_seed)[1])
        return self.detokenize_audio(result.audio_ids), text

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(self, messages: Sequence[dict], output_type: str = "text", audio_temperature: float = 0.0,
                 audio_top_k: int = 5, text_temperature: float = 0.0, text_top_k: int = 5,
                 audio_repetition_penalty: float = 1.0, audio_repetition_window_size: int = 64,
                 text_repetition_penalty: float = 1.0, text_repetition_window_size: int = 16,
                 max_new_tokens: int = -1, seed: int | None = None, speaker_prompt: Any = None):
        """Answer one conversation. Returns (wav [1, S] float32 @ 24 kHz or None, text)."""
        kw = dict(audio_temperature=audio_temperature, audio_top_k=audio_top_k, text_temperature=text_temperature,
                  text_top_k=text_top_k, audio_repetition_penalty=audio_repetition_penalty,
                  audio_repetition_window_size=audio_repetition_window_size,
                  text_repetition_penalty=text_repetition_penalty, text_repetition_window_size=text_repetition_window_size)
        cfg = self._config(output_type, max_new_tokens, kw)
        prompt = self._prompt(messages, output_type)
        gen, _ = self._generators(seed)
        (result,) = self.engine.generate([prompt], cfg, gen)
        return self._answer(result, output_type, speaker_prompt, seed)

    @torch.inference_mode()
    def generate_batch(self, conversations: Sequence[Sequence[dict]], output_type: str = "text", seed: int | None = None,
                       speaker_prompt: Any = None, max_new_tokens: int = -1, **sampling: Any) -> list[tuple[torch.Tensor | None, str]]:
        """Answer many conversations in one batched generation; returns [(wav or None, text)] in order.
        Sampling keywords as in `generate`. Under greedy sampling each answer equals its single `generate`."""
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence) or not conversations:
            raise PromptError("generate_batch() takes a non-empty list of conversations (each a list of messages)")
        if self.budgets.max_batch is not None and len(conversations) > self.budgets.max_batch:
            raise BudgetError(f"{len(conversations)} conversations exceed the batch budget of {self.budgets.max_batch} "
                              "(Budgets.max_batch)")
        cfg = self._config(output_type, max_new_tokens, sampling)
        prompts = []
        for k, conv in enumerate(conversations):
            try:
                prompts.append(self._prompt(conv, output_type))
            except PromptError as e:
                raise PromptError(f"conversation {k}: {e}") from None
        gen, _ = self._generators(seed)
        results = self.engine.generate(prompts, cfg, gen)
        return [self._answer(r, output_type, speaker_prompt, seed) for r in results]

    @torch.inference_mode()
    def generate_stream(self, messages: Sequence[dict], output_type: str = "text", seed: int | None = None,
                        speaker_prompt: Any = None, max_new_tokens: int = -1, **sampling: Any) -> Iterator[StreamEvent]:
        """Answer one conversation incrementally: `TextPiece`s as text ids decode, `AudioPiece`s (24 kHz PCM)
        as soon as the detokenizer has a chunk, then one `StreamEnd`. Sampling keywords as in `generate`.
        The pieces concatenate to what `generate` returns for the same arguments and seed."""
        from kimia.engine import AudioTokens, Finished, TextDelta

        cfg = self._config(output_type, max_new_tokens, sampling)
        prompt = self._prompt(messages, output_type)
        gen, detok_gen = self._generators(seed)
        speak = output_type == "both" and self.detokenizer is not None
        if speak:
            self._start_audio(speaker_prompt, detok_gen)
        text = _TextStream(self.tokenizer)
        audio = _AudioStream(self.detokenizer) if speak else None
        for ev in self.engine.stream([prompt], cfg, gen, audio_chunk=1):
            if isinstance(ev, TextDelta):
                delta = text.add(ev.ids)
                if delta:
                    yield TextPiece(delta, text.text)
            elif isinstance(ev, AudioTokens) and audio is not None:
                for pcm in audio.add(ev.ids):
                    if pcm.numel():
                        yield AudioPiece(pcm.float())
            elif isinstance(ev, Finished):
                delta = text.finish()
                if delta:
                    yield TextPiece(delta, text.text)
                wav = None
                if audio is not None:
                    pcm = audio.finish()
                    if pcm is not None and pcm.numel():
                        yield AudioPiece(pcm.float())
                    wav = audio.wav()
                yield StreamEnd(text.text, wav, list(ev.result.audio_ids), ev.result.stop_reason)


def load_model(model_path: str | os.PathLike, **kwargs: Any) -> KimiAudio:
    """`KimiAudio(model_path, **kwargs)`."""
    return KimiAudio(model_path, **kwargs)


def available_models() -> list[str]:
    """Names of models kimia can load without a path (none is shipped yet: pass a model folder)."""
    return []


__all__ = ["KimiAudio", "Budgets", "TextPiece", "AudioPiece", "StreamEnd", "StreamEvent", "load_model",
           "available_models", "ASR_INSTRUCTION", "OUTPUT_SAMPLE_RATE"]
