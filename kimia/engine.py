"""Generation engine: batched prefill + one-token decode of `AudioLM` under Kimi-Audio's dual-stream rules.

Why a separate engine: the model is teacher-forced and stateless; everything that makes generation
Kimi-Audio specific lives here (reference KIMI_AUDIO.md §5):

* Every step samples a text id and an audio id from the two heads' last-position logits (text first,
  then audio, each with its own `SamplingParams`, repetition windows over that stream's generated ids:
  forced blanks included, prompt excluded).
* Text stream: once `kimia_text_eos` was sampled, later text ids are forced to `kimia_text_blank` (the EOS
  itself is fed back on the next step). Valid text = the ids sampled before the EOS.
* Audio stream: forced to blank during the first `audio_delay` steps and always in text mode.
  Valid audio = the ids from step `audio_delay` on (the end id included).
* Stop: text mode at the text EOS; both mode when the audio id is `msg_end` or `media_end`; otherwise at the
  budget (`max_new_tokens`, by default the context budget minus the prompt length: 1500 for both, 7500
  for text, the official 120 s / 7500-token limits). A prompt that does not fit raises `BudgetError`.
* Post-filters: audio ids >= token_offset minus the offset (raw semantic ids); text ids < token_offset.

Batching: N prompts of different lengths are right-padded and prefilled together (explicit positions,
per-row logits, see kimia.lm.cache); all rows then decode in lockstep, each at its own position, on one
static KV cache. A row that stops is dropped from the batch (its cache row is compacted away), so finished
rows cost nothing; under greedy sampling each row's result equals its single run.

`Engine.stream` yields `TextDelta` / `AudioTokens` / `Finished` events as they decode; `Engine.generate`
consumes the same loop. `reference_generate` is a deliberately naive batch-1 loop without a cache (full
forward over the growing sequence every step), used by tests to prove the cached engine equal to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from kimia.errors import BudgetError, ConfigError, PromptError
from kimia.lm import AudioLM, KVCache
from kimia.prompt import PromptBatch
from kimia.sampling import SamplingParams, sample_with_params
from kimia.tokens import SpecialTokens

logger = logging.getLogger(__name__)

OutputType = Literal["text", "both"]
StopReason = Literal["text_eos", "audio_msg_end", "audio_media_end", "budget", "max_cache_len", "cancelled"]
_CACHE_BLOCK = 256  # initial KV room beyond the prompt; the cache doubles (copy, not per-step cat) when full


@dataclass
class GenerationConfig:
    """What to generate and when to stop.

    max_new_tokens: loop iterations (forward calls, prefill included); None or -1 = the context budget
        (max_context_<mode> - prompt length). An explicit value beyond that budget raises BudgetError.
    max_cache_len: hard cap on KV positions per row (memory bound); a row reaching it stops with
        stop_reason "max_cache_len". None = as many as the budget needs.
    audio_stop: False disables the both-mode stop on msg_end/media_end (benchmarks: fixed step counts).
    return_logits: keep every step's last-position logits of both heads in the result (tests, analysis).
    skip_audio_branch: run the model without its audio branch (mimo layers + head), text mode only: the
        audio stream is forced to blank there, so the branch's output is never used. None = automatic:
        skip in text mode unless return_logits asks for the audio logits. Text results are identical.
    skip_text_after_eos: in "both" mode, once every row's text has ended (the text stream is forced to blank
        from then on), run the model without its text tail (layers after the fork + text head). None =
        automatic: when text sampling is greedy (no random draw is skipped, so results are identical to the
        full loop) and return_logits is off. True with sampled text gives valid samples but a different
        random stream than the full loop.
    """

    output_type: OutputType = "text"
    text: SamplingParams = field(default_factory=SamplingParams.text_default)
    audio: SamplingParams = field(default_factory=SamplingParams.audio_default)
    max_new_tokens: int | None = None
    max_context_both: int = 1500
    max_context_text: int = 7500
    max_cache_len: int | None = None
    audio_stop: bool = True
    return_logits: bool = False
    skip_audio_branch: bool | None = None
    skip_text_after_eos: bool | None = None

    def __post_init__(self) -> None:
        if self.output_type not in ("text", "both"):
            raise ConfigError(f"output_type must be 'text' or 'both', got {self.output_type!r}")
        if self.max_new_tokens is not None and self.max_new_tokens != -1 and self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be positive, -1 or None, got {self.max_new_tokens}")
        for name in ("max_context_both", "max_context_text"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_cache_len is not None and self.max_cache_len <= 0:
            raise ConfigError(f"max_cache_len must be positive or None, got {self.max_cache_len}")
        if not isinstance(self.text, SamplingParams) or not isinstance(self.audio, SamplingParams):
            raise ConfigError("text and audio must be SamplingParams")
        if self.skip_audio_branch and self.output_type != "text":
            raise ConfigError("skip_audio_branch=True needs output_type 'text' (audio is sampled in 'both')")
        if self.skip_text_after_eos and (self.output_type != "both" or self.return_logits):
            raise ConfigError("skip_text_after_eos=True needs output_type 'both' and return_logits off")

    @property
    def skips_audio(self) -> bool:
        """Whether generation runs the model without its audio branch (see skip_audio_branch)."""
        if self.skip_audio_branch is not None:
            return bool(self.skip_audio_branch)
        return self.output_type == "text" and not self.return_logits

    @property
    def skips_text_after_eos(self) -> bool:
        """Whether decode steps after every row's text EOS skip the text tail (see skip_text_after_eos)."""
        if self.skip_text_after_eos is not None:
            return bool(self.skip_text_after_eos)
        return self.output_type == "both" and self.text.greedy and not self.return_logits

    @classmethod
    def from_official(cls, **kwargs) -> GenerationConfig:
        """From the official `KimiAudio.generate` keyword arguments (output_type, text_/audio_ temperature,
        top_k, repetition_penalty, repetition_window_size, max_new_tokens); defaults as the official ones.
        One deliberate difference: the official generate() ignores max_new_tokens in "both" mode (always
        1500 - prompt length); here an explicit max_new_tokens is honoured in both modes."""
        known = {"output_type", "max_new_tokens"} | {
            f"{s}_{k}" for s in ("text", "audio") for k in ("temperature", "top_k", "repetition_penalty",
                                                             "repetition_window_size")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown generate() arguments {unknown}")

        def params(s: str, default: SamplingParams) -> SamplingParams:
            return SamplingParams(
                temperature=float(kwargs.get(f"{s}_temperature", default.temperature)),
                top_k=int(kwargs.get(f"{s}_top_k", default.top_k)),
                repetition_penalty=float(kwargs.get(f"{s}_repetition_penalty", default.repetition_penalty)),
                window=int(kwargs.get(f"{s}_repetition_window_size", default.window)),
            )

        return cls(output_type=kwargs.get("output_type", "text"), text=params("text", SamplingParams.text_default()),
                   audio=params("audio", SamplingParams.audio_default()), max_new_tokens=kwargs.get("max_new_tokens"))

    def context_budget(self) -> int:
        return self.max_context_both if self.output_type == "both" else self.max_context_text

    def steps_for(self, prompt_length: int) -> int:
        """Loop iterations allowed for a prompt of `prompt_length` positions (BudgetError if it does not fit)."""
        limit = self.context_budget()
        name = f"max_context_{self.output_type}"
        room = limit - prompt_length
        if room <= 0:
            raise BudgetError(f"prompt of {prompt_length} positions does not fit the {self.output_type!r} context "
                              f"budget of {limit} positions ({name}); shorten the prompt (e.g. the audio)")
        if self.max_new_tokens is None or self.max_new_tokens == -1:
            return room
        if self.max_new_tokens > room:
            raise BudgetError(f"max_new_tokens {self.max_new_tokens} + prompt of {prompt_length} positions exceeds "
                              f"the {self.output_type!r} context budget of {limit} ({name}); at most {room} new tokens")
        return self.max_new_tokens


@dataclass
class GenerationResult:
    """One prompt's output. `text_ids`/`audio_ids` are what callers use (filtered; audio as raw semantic ids);
    the loop_* lists are the official `_generate_loop` return values and step_* the per-step stored ids."""

    text_ids: list[int]
    audio_ids: list[int]
    loop_text_tokens: list[int]
    loop_audio_tokens: list[int]
    step_text_tokens: list[int]
    step_audio_tokens: list[int]
    stop_reason: StopReason
    steps: int
    prompt_length: int
    text_eos_step: int | None = None
    step_text_logits: torch.Tensor | None = None  # [steps, V] fp32, with config.return_logits
    step_audio_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class TextDelta:
    """A new valid text id of prompt `row` (already filtered: < token_offset)."""

    row: int
    ids: list[int]


@dataclass(frozen=True)
class AudioTokens:
    """New raw semantic ids of prompt `row` (chunked; the last chunk is flushed before `Finished`)."""

    row: int
    ids: list[int]


@dataclass(frozen=True)
class Finished:
    row: int
    result: GenerationResult


Event = TextDelta | AudioTokens | Finished


class _Row:
    """Host-side bookkeeping of one prompt."""

    def __init__(self, index: int, length: int, steps: int):
        self.index, self.length, self.steps = index, length, steps
        self.text: list[int] = []
        self.audio: list[int] = []
        self.valid_text = 0
        self.valid_audio = 0
        self.text_done = False
        self.eos_step: int | None = None
        self.pending_audio: list[int] = []
        self.logits_t: list[torch.Tensor] = []
        self.logits_a: list[torch.Tensor] = []

    def result(self, specials: SpecialTokens, delay: int, reason: StopReason) -> GenerationResult:
        off = specials.token_offset
        loop_text = self.text[: self.valid_text]
        loop_audio = self.audio[delay: delay + self.valid_audio]
        return GenerationResult(
            text_ids=[t for t in loop_text if t < off],
            audio_ids=[a - off for a in loop_audio if a >= off],
            loop_text_tokens=loop_text, loop_audio_tokens=loop_audio,
            step_text_tokens=list(self.text), step_audio_tokens=list(self.audio),
            stop_reason=reason, steps=len(self.text), prompt_length=self.length, text_eos_step=self.eos_step,
            step_text_logits=torch.stack(self.logits_t) if self.logits_t else None,
            step_audio_logits=torch.stack(self.logits_a) if self.logits_a else None,
        )


def _stop_reason(row: _Row, t: int, a: int, i: int, config: GenerationConfig, sp: SpecialTokens,
                 audio_live: bool, cache_cap: int | None) -> StopReason | None:
    """The loop's stop rules after step i (text EOS / audio end before the budget, as the official order)."""
    if config.output_type == "text" and row.text_done and row.eos_step == i:
        return "text_eos"
    if config.output_type == "both" and audio_live and config.audio_stop and a in sp.audio_end_ids:
        return "audio_msg_end" if a == sp.msg_end else "audio_media_end"
    if i + 1 >= row.steps:
        return "budget"
    if cache_cap is not None and row.length + i >= cache_cap:
        return "max_cache_len"
    return None


def _check_prompts(prompts: Sequence[PromptBatch], vocab: int) -> None:
    if isinstance(prompts, PromptBatch):
        raise PromptError("generate() takes a list of PromptBatch (one per prompt), got a single PromptBatch")
    if len(prompts) == 0:
        raise PromptError("generate() needs at least one prompt")
    for k, p in enumerate(prompts):
        if not isinstance(p, PromptBatch):
            raise PromptError(f"prompt {k}: expected a PromptBatch, got {type(p).__name__}")
        if p.audio_ids.dim() != 1 or p.audio_ids.shape != p.text_ids.shape or len(p) == 0:
            raise PromptError(f"prompt {k}: streams must be non-empty 1-D and of equal length, got "
                              f"{tuple(p.audio_ids.shape)} and {tuple(p.text_ids.shape)}")
        lo = int(torch.minimum(p.audio_ids.min(), p.text_ids.min()))
        hi = int(torch.maximum(p.audio_ids.max(), p.text_ids.max()))
        if lo < 0 or hi >= vocab:
            raise PromptError(f"prompt {k}: ids span [{lo}, {hi}] outside the model vocabulary [0, {vocab})")
        if p.features and len(p.features) != len(p.spans):
            raise PromptError(f"prompt {k}: {len(p.features)} feature tensors for {len(p.spans)} audio spans")


def prompt_tensors(model: AudioLM, prompts: Sequence[PromptBatch], pad_id: int, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Right-padded prefill inputs: audio, text [B, L], continuous [B, L, Din] + mask [B, L] (None when no
    prompt has features) and lengths [B]. Features go on the positions of each prompt's spans."""
    B, L = len(prompts), max(len(p) for p in prompts)
    audio = torch.full((B, L), pad_id, dtype=torch.long)
    text = torch.full((B, L), pad_id, dtype=torch.long)
    have = any(p.features for p in prompts)
    cont = torch.zeros(B, L, model.config.kimia_adaptor_input_dim, dtype=dtype) if have else None
    mask = torch.zeros(B, L, dtype=torch.bool) if have else None
    for r, p in enumerate(prompts):
        n = len(p)
        audio[r, :n], text[r, :n] = p.audio_ids.cpu(), p.text_ids.cpu()
        for k, ((start, length), f) in enumerate(zip(p.spans, p.features)):
            f = f.reshape(-1, f.shape[-1])
            if f.shape[0] < length or f.shape[-1] != model.config.kimia_adaptor_input_dim:
                raise PromptError(f"prompt {r}: features of span {k} are {tuple(f.shape)}, need [>={length}, "
                                  f"{model.config.kimia_adaptor_input_dim}]")
            cont[r, start: start + length] = f[:length].to(device="cpu", dtype=dtype)
            mask[r, start: start + length] = True
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    to = (lambda x: None if x is None else x.to(device))
    return audio.to(device), text.to(device), to(cont), to(mask), lengths.to(device)


class Engine:
    """Cached, batched generation for one `AudioLM` and its special-token table.

    device / dtype default to the model's; when given and different, the model is moved (in place) once here.
    The KV cache takes the model's dtype; logits, softmax and sampling run in fp32.
    """

    def __init__(self, model: AudioLM, specials: SpecialTokens, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        w = model.model.embed_tokens.weight
        self.device = torch.device(device) if device is not None else w.device
        self.dtype = dtype or w.dtype
        if w.device != self.device or w.dtype != self.dtype:
            model = model.to(device=self.device, dtype=self.dtype)
            model.init_buffers(self.device)  # RoPE tables recomputed in fp32, not cast
        self.model = model.eval()
        self.specials = specials
        self.delay = int(specials.audio_delay)
        cfg_delay = model.config.kimia_mimo_audiodelaytokens
        if cfg_delay != self.delay:
            logger.warning("audio delay: special tokens say %d, model config %d; using %d", self.delay, cfg_delay,
                           self.delay)
        if specials.token_offset != model.config.kimia_token_offset:
            raise ConfigError(f"special tokens' offset {specials.token_offset} != model kimia_token_offset "
                              f"{model.config.kimia_token_offset}")

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[PromptBatch], config: GenerationConfig,
                 generator: torch.Generator | None = None) -> list[GenerationResult]:
        """Generate for every prompt (batched); results in prompt order."""
        out: list[GenerationResult | None] = [None] * len(prompts)
        for ev in self._loop(prompts, config, generator, emit=False, audio_chunk=0):
            if isinstance(ev, Finished):
                out[ev.row] = ev.result
        return out  # type: ignore[return-value]

    def stream(self, prompts: Sequence[PromptBatch], config: GenerationConfig, generator: torch.Generator | None = None,
               *, audio_chunk: int = 20, cancel: Callable[[int], bool] | None = None) -> Iterator[Event]:
        """Yield TextDelta per new text id, AudioTokens every `audio_chunk` new audio ids (and a final flush),
        and Finished(row, result) when a row stops. `row` is the index in `prompts`.
        cancel(row) -> True stops that row after the current step (stop_reason "cancelled"), freeing its place
        in the batch; the other rows go on unchanged."""
        if audio_chunk <= 0:
            raise ConfigError(f"audio_chunk must be positive, got {audio_chunk}")
        return self._loop(prompts, config, generator, emit=True, audio_chunk=audio_chunk, cancel=cancel)

    # ------------------------------------------------------------------ the loop
    def _loop(self, prompts: Sequence[PromptBatch], config: GenerationConfig, generator: torch.Generator | None,
              *, emit: bool, audio_chunk: int, cancel: Callable[[int], bool] | None = None) -> Iterator[Event]:
        _check_prompts(prompts, self.model.config.vocab_size)
        sp, delay = self.specials, self.delay
        rows = [_Row(k, len(p), config.steps_for(len(p))) for k, p in enumerate(prompts)]
        cap = max(r.length + r.steps - 1 for r in rows)  # the last sampled ids are never fed back
        max_pos = self.model.config.max_position_embeddings
        if cap > max_pos and (config.max_cache_len is None or config.max_cache_len > max_pos):
            raise BudgetError(f"generation needs up to {cap} positions but the model has max_position_embeddings "
                              f"{max_pos}; lower max_context_{config.output_type} or max_new_tokens")
        if config.max_cache_len is not None:
            too_long = [r.length for r in rows if r.length > config.max_cache_len]
            if too_long:
                raise BudgetError(f"prompt of {max(too_long)} positions exceeds max_cache_len {config.max_cache_len}")
            cap = min(cap, config.max_cache_len)
        hard_cap = config.max_cache_len
        state = _DeviceState(self, prompts, config, cap)
        active = list(rows)  # rows in device order
        i = 0
        while True:
            t_ids, a_ids, logits = state.step(i, generator)
            audio_live = config.output_type == "both" and i >= delay
            keep: list[int] = []
            for k, row in enumerate(active):
                t, a = t_ids[k], a_ids[k]
                row.text.append(t)
                row.audio.append(a)
                if logits is not None:
                    row.logits_t.append(logits[0][k])
                    if logits[1] is not None:
                        row.logits_a.append(logits[1][k])
                if not row.text_done:
                    if t == sp.text_eos:
                        row.text_done, row.eos_step = True, i
                    else:
                        row.valid_text += 1
                        if emit and t < sp.token_offset:
                            yield TextDelta(row.index, [t])
                if audio_live:
                    row.valid_audio += 1
                    if a >= sp.token_offset:
                        row.pending_audio.append(a - sp.token_offset)
                reason = _stop_reason(row, t, a, i, config, sp, audio_live, hard_cap)
                if reason is None and cancel is not None and cancel(row.index):
                    reason = "cancelled"
                if emit and row.pending_audio and (reason is not None or len(row.pending_audio) >= audio_chunk):
                    yield AudioTokens(row.index, row.pending_audio)
                    row.pending_audio = []
                if reason is None:
                    keep.append(k)
                else:
                    yield Finished(row.index, row.result(sp, delay, reason))
            if not keep:
                return
            if len(keep) < len(active):
                state.keep(keep)
                active = [active[k] for k in keep]
            i += 1


class _DeviceState:
    """Tensors of the active rows: KV cache, last stored ids, histories for the repetition windows."""

    def __init__(self, engine: Engine, prompts: Sequence[PromptBatch], config: GenerationConfig, cap: int):
        self.e, self.config, self.cap = engine, config, cap
        self.skip_audio = config.skips_audio
        sp, dev = engine.specials, engine.device
        self.blank = sp.text_blank
        self.prompts = prompts
        self.lengths: torch.Tensor | None = None
        self.cache: KVCache | None = None
        hist_len = max(config.steps_for(len(p)) for p in prompts)
        B = len(prompts)
        self.hist_t = torch.empty(B, hist_len, dtype=torch.long, device=dev)
        self.hist_a = torch.empty(B, hist_len, dtype=torch.long, device=dev)
        self.text_done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.host_done = [False] * B  # text_done on the host (decides the text-tail skip without a sync)
        self.skip_text_ok = config.skips_text_after_eos
        self.text_skipped_steps = 0
        self.last_t = self.last_a = None

    @torch.inference_mode()
    def _forward(self, i: int, skip_text: bool = False):
        e, m = self.e, self.e.model
        if i == 0:
            audio, text, cont, mask, lengths = prompt_tensors(m, self.prompts, e.specials.pad, e.device, e.dtype)
            self.lengths = lengths
            L = audio.shape[1]
            self.cache = m.allocate_cache(len(self.prompts), min(self.cap, L + _CACHE_BLOCK) if self.cap >= L else L,
                                          device=e.device, dtype=e.dtype)
            positions = torch.arange(L, device=e.device).expand(audio.shape[0], L)
            return m(audio, text, positions, continuous=cont, continuous_mask=mask, cache=self.cache,
                     logits_at=lengths - 1, skip_audio=self.skip_audio)
        positions = (self.lengths + (i - 1))[:, None]
        kv_len = int(self.max_len) + i  # = max position of this step + 1
        self._grow(kv_len)
        return m(self.last_a[:, None], self.last_t[:, None], positions, cache=self.cache, kv_len=kv_len,
                 skip_audio=self.skip_audio, skip_text=skip_text)

    def _grow(self, needed: int) -> None:
        c = self.cache
        if needed <= c.max_len:
            return
        new_len = min(max(needed, 2 * c.max_len), max(self.cap, needed))
        new = KVCache.allocate(self.e.model.config, c.batch_size, new_len, device=c.device, dtype=c.dtype)
        new.k[:, :, :, : c.max_len].copy_(c.k)
        new.v[:, :, :, : c.max_len].copy_(c.v)
        self.cache = new

    @torch.inference_mode()
    def step(self, i: int, generator: torch.Generator | None):
        """Forward (prefill at i == 0), sample both streams, apply the forcing rules; return host ids."""
        skip_text = i > 0 and self.skip_text_ok and all(self.host_done)
        out = self._forward(i, skip_text)
        if i == 0:
            self.max_len = int(self.lengths.max())
        cfg, sp = self.config, self.e.specials
        al = out.audio_logits[:, -1] if out.audio_logits is not None else None
        if skip_text:  # every row's text has ended: the text id is the forced blank, no logits needed
            tl = None
            t = torch.full((self.text_done.shape[0],), self.blank, dtype=torch.long, device=self.text_done.device)
            self.text_skipped_steps += 1
        else:
            tl = out.text_logits[:, -1]
            t = sample_with_params(tl, cfg.text, self.hist_t[:, :i] if i > 0 else None, generator)
            t = torch.where(self.text_done, torch.full_like(t, self.blank), t)
        self.text_done |= t == sp.text_eos
        if cfg.output_type == "text" or i < self.e.delay:
            a = torch.full_like(t, self.blank)  # forced: not sampled (no RNG draw)
        else:
            a = sample_with_params(al, cfg.audio, self.hist_a[:, :i] if i > 0 else None, generator)
        self.hist_t[:, i] = t
        self.hist_a[:, i] = a
        self.last_t, self.last_a = t, a
        ids = torch.stack([t, a]).tolist()  # the one host sync per step
        self.host_done = [d or x == sp.text_eos for d, x in zip(self.host_done, ids[0])]
        logits = (tl.float().cpu(), None if al is None else al.float().cpu()) if cfg.return_logits else None
        return ids[0], ids[1], logits

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        """Drop finished rows (compacts the cache once per finishing event, not per step)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.e.device)
        c = self.cache
        self.cache = KVCache(c.k.index_select(1, idx), c.v.index_select(1, idx), c.num_main_layers)
        self.lengths = self.lengths.index_select(0, idx)
        self.max_len = int(self.lengths.max())
        for name in ("hist_t", "hist_a", "text_done", "last_t", "last_a"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        self.host_done = [self.host_done[r] for r in rows]


@torch.inference_mode()
def reference_generate(model: AudioLM, specials: SpecialTokens, prompt: PromptBatch, config: GenerationConfig,
                       generator: torch.Generator | None = None) -> GenerationResult:
    """Slow batch-1 generation without a KV cache (tests only): every step runs the model over the whole
    sequence so far, then applies the same rules as the official loop, written out plainly."""
    _check_prompts([prompt], model.config.vocab_size)
    w = model.model.embed_tokens.weight
    sp, delay, blank = specials, int(specials.audio_delay), specials.text_blank
    n = len(prompt)
    steps = config.steps_for(n)
    audio, text, cont, mask, _ = prompt_tensors(model, [prompt], sp.pad, w.device, w.dtype)
    row = _Row(0, n, steps)
    for i in range(steps):
        L = audio.shape[1]
        c = m = None
        if cont is not None:
            c = torch.cat([cont, cont.new_zeros(1, L - cont.shape[1], cont.shape[2])], dim=1)
            m = torch.cat([mask, mask.new_zeros(1, L - mask.shape[1])], dim=1)
        out = model(audio, text, torch.arange(L, device=w.device)[None], continuous=c, continuous_mask=m)
        tl, al = out.text_logits[:, -1], out.audio_logits[:, -1]
        hist_t = torch.tensor([row.text], dtype=torch.long, device=w.device) if i > 0 else None
        hist_a = torch.tensor([row.audio], dtype=torch.long, device=w.device) if i > 0 else None
        t = int(sample_with_params(tl, config.text, hist_t, generator)[0])
        if row.text_done:
            t = blank
        elif t == sp.text_eos:
            row.text_done, row.eos_step = True, i
        else:
            row.valid_text += 1
        live = config.output_type == "both" and i >= delay
        a = int(sample_with_params(al, config.audio, hist_a, generator)[0]) if live else blank
        if live:
            row.valid_audio += 1
        row.text.append(t)
        row.audio.append(a)
        if config.return_logits:
            row.logits_t.append(tl[0].float().cpu())
            row.logits_a.append(al[0].float().cpu())
        reason = _stop_reason(row, t, a, i, config, sp, live, config.max_cache_len)
        if reason is not None:
            return row.result(sp, delay, reason)
        audio = torch.cat([audio, torch.tensor([[a]], device=w.device)], dim=1)
        text = torch.cat([text, torch.tensor([[t]], device=w.device)], dim=1)
    raise AssertionError("unreachable: the budget rule stops the loop")  # pragma: no cover


__all__ = [
    "AudioTokens", "Engine", "Event", "Finished", "GenerationConfig", "GenerationResult", "TextDelta",
    "prompt_tensors", "reference_generate",
]
