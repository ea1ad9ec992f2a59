"""Streaming detokenizer: semantic ids (12.5 Hz) -> 24 kHz PCM, chunk by chunk, as the release does it.

`StreamingDetokenizer` is the state object of one (or a batch of N) audio stream(s). Each `push` runs the
release's chunk algorithm (KIMI_AUDIO.md §6.3):

1. tokens are repeated x4 (12.5 -> 50 Hz mel frames); the look-ahead frames withheld from the previous
   chunk are prepended, so they are regenerated at the same positions;
2. the chunk is denoised from noise with the Euler solver; every DiT call attends over the prefix KV
   cache of the emitted audio plus the chunk itself;
3. unless final, the last `look_ahead_tokens * 4` frames are dropped (kept as tokens for the next chunk)
   and one extra DiT call on the clean kept mel at t = 0.999 produces the K/V that join the prefix cache;
   positions advance by the kept length, the cache keeps its newest `max_kv_cache_tokens` frames, and the
   stream state restarts (or returns to the voice prompt) before positions would run out;
4. the vocoder re-synthesises [previous mel tail ; new mel] and the overlap is cross-faded with a
   periodic Hamming window (the release's gains sum to 1.08 in the middle; kept for parity).

Counters in `stats` record which of these mechanisms ran, so tests can prove they were exercised.
Randomness comes from an explicit `torch.Generator` or an injectable noise provider.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kimia.detokenizer.dit import DiT, to_timestep
from kimia.detokenizer.solver import SOLVERS, draw_noise, euler_solve, make_t_span, solver_steps
from kimia.errors import ConfigError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000
# (call index since reset, shape (B, T, 80)) -> fp32 noise
NoiseProvider = Callable[[int, tuple[int, int, int]], torch.Tensor]


@dataclass
class StreamConfig:
    """Streaming parameters; defaults are the release factory's (`get_audio_detokenizer`)."""

    look_ahead_tokens: int = 12
    max_kv_cache_tokens: int = 900
    max_prompt_chunk: int = 10
    prompt_chunk_frames: int = 150
    upsample_factor: int = 4
    ode_steps: int = 30
    ode_solver: str = "neural_ode_euler"
    frame_size: int = 480  # samples per mel frame at 24 kHz
    first_chunk_size: int = 30  # tokens, offline `detokenize`
    chunk_size: int = 30
    max_positions: int = 4096
    prefix_t: float = 0.999
    # ablation switches (the release has all three on)
    prefix_cache: bool = True
    crossfade: bool = True

    def __post_init__(self) -> None:
        if self.ode_solver not in SOLVERS:
            raise ConfigError(f"unknown ode_solver {self.ode_solver!r}; expected one of {SOLVERS}")
        for name in ("upsample_factor", "frame_size", "first_chunk_size", "chunk_size", "ode_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"StreamConfig.{name} must be positive, got {getattr(self, name)}")
        if self.look_ahead_tokens < 0 or self.max_kv_cache_tokens < 0:
            raise ConfigError("look_ahead_tokens and max_kv_cache_tokens must be >= 0")


@dataclass
class StreamStats:
    """What the stream did since construction (never reset; tests read deltas)."""

    chunks: int = 0
    dit_calls: int = 0
    look_ahead_frames: int = 0  # frames denoised and withheld for regeneration
    prefix_calls: int = 0  # t=0.999 cache-fill calls (chunks + voice prompt)
    cached_attention_chunks: int = 0  # chunks that attended over a non-empty prefix cache
    cache_trims: int = 0
    crossfades: int = 0
    position_resets: int = 0
    vocoder_calls: int = 0


class StreamingDetokenizer:
    """Chunked flow-matching DiT + vocoder for B independent streams that share one chunk schedule."""

    def __init__(
        self,
        dit: DiT,
        vocoder: nn.Module,
        config: StreamConfig | None = None,
        *,
        generator: torch.Generator | None = None,
        noise_provider: NoiseProvider | None = None,
        speaker_prompt: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """speaker_prompt: optional (mel [T, 80], semantic ids [T/4]) voice prompt, see `prefill_voice`."""
        self.dit = dit.eval()
        self.vocoder = vocoder.eval()
        self.config = config or StreamConfig()
        self.generator = generator
        self.noise_provider = noise_provider
        p = next(dit.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_positions = min(self.config.max_positions, dit.cfg.max_positions)
        vcfg = getattr(vocoder, "config", None)
        hop = getattr(vcfg, "hop_size", self.config.frame_size)
        if hop != self.config.frame_size:
            raise ConfigError(f"vocoder hop_size {hop} != detokenizer frame_size {self.config.frame_size}")
        self.sample_rate = int(getattr(vcfg, "sampling_rate", SAMPLE_RATE))
        self.stats = StreamStats()
        cfg = dit.cfg
        self._mel_mean = torch.as_tensor(cfg.mel_mean, dtype=torch.float32) if cfg.normalize_mel else None
        self._mel_std = torch.as_tensor(cfg.mel_std, dtype=torch.float32) if cfg.normalize_mel else None
        self._t_span = make_t_span(self.config.ode_steps)
        self._windows: dict[int, torch.Tensor] = {}
        self._cache = None
        self._batch = None
        self._voice = None  # (batch, position, cache snapshot) after prefill_voice
        self.last_mel: torch.Tensor | None = None  # de-normalised mel [B, T, 80] of the last chunk
        self.reset()
        if speaker_prompt is not None:
            self.prefill_voice(*speaker_prompt)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything, including a prefilled voice prompt."""
        self._voice = None
        self._reset_stream()

    def _reset_stream(self) -> None:
        """Start a new utterance; a prefilled voice prompt stays (its cache is restored)."""
        self._pending = None  # look-ahead tokens [B, la] to regenerate
        self._fed = None  # raw ids [B, m] given to `feed` and not pushed yet
        self._pre_mel = None
        self._pre_wav = None
        self._calls = 0
        self._reset_dit_state()

    def _reset_dit_state(self) -> None:
        if self._voice is not None:
            batch, pos, snap = self._voice
            self._ensure_batch(batch)
            self._cache.restore(snap)
            self.position = pos
        else:
            self.position = 0
            if self._cache is not None:
                self._cache.reset()

    def _ensure_batch(self, batch: int) -> None:
        if self._cache is not None and self._batch == batch:
            return
        if self._cache is not None and (self._cache.length or self._pre_wav is not None or self._pending is not None):
            raise ConfigError(f"stream holds state for batch {self._batch}; got a push of batch {batch} (reset first)")
        la = self.config.look_ahead_tokens
        chunk_frames = (max(self.config.chunk_size, self.config.first_chunk_size) + la) * self.config.upsample_factor
        self._cache = self.dit.new_cache(batch, self.config.max_kv_cache_tokens + chunk_frames, self.device, self.dtype)
        self._batch = batch

    @property
    def batch(self) -> int | None:
        return self._batch

    # ------------------------------------------------------------------ inputs
    def _tokens(self, tokens: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
        tokens = torch.as_tensor(tokens)
        if tokens.dim() not in (1, 2) or tokens.is_floating_point():
            raise ConfigError(f"{what}: expected integer ids of shape [n] or [B, n], got {tuple(tokens.shape)} {tokens.dtype}")
        single = tokens.dim() == 1
        tokens = tokens[None] if single else tokens
        vocab = self.dit.cfg.semantic_vocab_size
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ConfigError(f"{what}: semantic ids must be in [0, {vocab}), got [{int(tokens.min())}, {int(tokens.max())}]")
        return tokens.long().to(self.device).repeat_interleave(self.config.upsample_factor, dim=1), single

    def _noise(self, batch: int, frames: int) -> torch.Tensor:
        shape = (batch, frames, self.dit.cfg.input_size)
        if self.noise_provider is not None:
            noise = torch.as_tensor(self.noise_provider(self._calls, shape), dtype=torch.float32)
            if noise.dim() == 2:
                noise = noise[None]
            if tuple(noise.shape) != shape:
                raise ConfigError(f"noise provider returned {tuple(noise.shape)} for call {self._calls}, expected {shape}")
            return noise.to(self.device, self.dtype)
        return draw_noise(shape, self.generator, self.device, self.dtype)

    # ------------------------------------------------------------------ DiT
    def _positions(self, batch: int, frames: int) -> torch.Tensor:
        self.dit.check_positions(self.position + frames - 1)
        return torch.arange(self.position, self.position + frames, device=self.device)[None].expand(batch, frames)

    def _commit(self, frames: int) -> None:
        self._cache.commit(frames)
        self.position += frames
        if self._cache.length > self.config.max_kv_cache_tokens:
            self._cache.trim(self.config.max_kv_cache_tokens)
            self.stats.cache_trims += 1

    def _fill_prefix(self, mel: torch.Tensor, tokens: torch.Tensor, rate: int = 1) -> None:
        """One DiT call on clean mel at t = prefix_t whose K/V join the prefix cache."""
        B, T, _ = mel.shape
        ts = to_timestep(self.config.prefix_t, B, self.device)
        self.dit(mel, tokens, ts, self._positions(B, T), self._cache, cond_rate=rate)
        self.stats.dit_calls += 1
        self.stats.prefix_calls += 1
        self._commit(T)

    def _denoise(self, tokens: torch.Tensor, noise: torch.Tensor, look_ahead: int) -> torch.Tensor:
        """Solve one chunk; update cache/positions; return kept normalised mel [B, T - look_ahead, 80]."""
        B, T = tokens.shape
        use_cache = self.config.prefix_cache
        cache = self._cache if use_cache else None
        if cache is not None and cache.length:
            self.stats.cached_attention_chunks += 1
        pos = self._positions(B, T)
        # chunks are whole upsampled tokens (look-ahead included), so the condition is constant per token
        r = self.config.upsample_factor
        emb = self.dit.condition_tokens(tokens[:, ::r])

        def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return self.dit(x, tokens, to_timestep(t, B, self.device), pos, cache, token_emb=emb, cond_rate=r)

        x = euler_solve(velocity, noise, self._t_span, self.config.ode_solver)
        self.stats.dit_calls += solver_steps(self.config.ode_solver, self.config.ode_steps)
        if look_ahead > 0:
            self._pending = tokens[:, -look_ahead:]
            self.stats.look_ahead_frames += look_ahead
            kept = x[:, :-look_ahead]
            if use_cache:
                self._fill_prefix(kept, tokens[:, :-look_ahead], r)
            else:
                self.position += kept.shape[1]
        else:
            kept = x
            if use_cache:  # the release keeps the last solver call's K/V here
                self._commit(T)
            else:
                self.position += T
        return kept

    def _denormalise(self, mel: torch.Tensor) -> torch.Tensor:
        if self._mel_mean is None:
            return mel
        return mel * self._mel_std.to(mel) + self._mel_mean.to(mel)

    def _normalise(self, mel: torch.Tensor) -> torch.Tensor:
        if self._mel_mean is None:
            return mel
        return (mel - self._mel_mean.to(mel)) / self._mel_std.to(mel)

    # ------------------------------------------------------------------ vocoder
    def _vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, T, 80] -> wav [B, T * frame_size]."""
        self.stats.vocoder_calls += 1
        vdtype = next(self.vocoder.parameters()).dtype
        wav = self.vocoder(mel.transpose(1, 2).to(vdtype))
        return wav.reshape(mel.shape[0], -1)

    def _window(self, n: int, like: torch.Tensor) -> torch.Tensor:
        w = self._windows.get(n)
        if w is None or w.device != like.device or w.dtype != like.dtype:
            w = torch.hamming_window(n, periodic=True, dtype=torch.float32).to(like)
            self._windows[n] = w
        return w

    def _stitch(self, mel: torch.Tensor, is_final: bool) -> torch.Tensor:
        fs = self.config.frame_size
        n = mel.shape[1]
        if self._pre_mel is None:
            wav = self._vocode(mel)
            if is_final:
                return wav
            half = fs * n // 2
            self._pre_wav = wav[:, -half:]
            self._pre_mel = mel[:, (-n) // 2 :]
            return wav[:, :half]
        wav = self._vocode(torch.cat([self._pre_mel, mel], dim=1))
        if is_final:
            return wav
        prev = self._pre_wav.shape[1]
        g = 2 * prev if wav.shape[1] > 2 * prev else wav.shape[1] // 2
        out = wav[:, :g].clone()
        h = g // 2
        if self.config.crossfade and h > 0:
            w = self._window(g, out)
            out[:, :h] = self._pre_wav[:, :h] * w[g - h :] + out[:, :h] * w[:h]
            self.stats.crossfades += 1
        rest = wav.shape[1] - g
        rest_frames = rest // fs
        self._pre_wav = wav[:, wav.shape[1] - rest :]
        self._pre_mel = mel[:, -rest_frames:]  # (release slicing: 0 keeps the whole chunk)
        return out

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def push(self, tokens: torch.Tensor, is_final: bool = False) -> torch.Tensor:
        """Feed semantic ids [n] or [B, n] (raw codebook ids); returns fp32 PCM [S] or [B, S] at 24 kHz.

        A non-final chunk no longer than the look-ahead is only buffered (returns 0 samples).
        `is_final=True` flushes everything and starts a new utterance.
        """
        up, single = self._tokens(tokens, "push")
        B = up.shape[0]
        self._ensure_batch(B)
        if self._pending is not None:
            up = torch.cat([self._pending, up], dim=1)
            self._pending = None
        la = 0 if is_final else self.config.look_ahead_tokens * self.config.upsample_factor
        if up.shape[1] == 0 or (not is_final and up.shape[1] <= la):
            self._pending = up if up.shape[1] else None
            out = torch.zeros(B, 0)
            if is_final:
                out = self._flush_tail()
            return out[0] if single else out
        noise = self._noise(B, up.shape[1])
        self._calls += 1
        self.stats.chunks += 1
        mel = self._denormalise(self._denoise(up, noise, la))
        self.last_mel = mel
        wav = self._stitch(mel, is_final).float()
        if is_final:
            self._reset_stream()
        elif self.position + 2 * mel.shape[1] > self.max_positions:
            logger.info("detokenizer positions exhausted at %d: restarting the prefix state", self.position)
            self.stats.position_resets += 1
            self._reset_dit_state()
        out = wav.cpu()
        return out[0] if single else out

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Incremental input for a generation loop: ids [k] or [B, k] as they are produced (any k).

        Ids are buffered and pushed in the `detokenize` schedule (first_chunk_size, then chunk_size
        tokens); a full chunk is held until one more id arrives, because a last chunk must be pushed as
        final. So `feed`* + `finish()` gives exactly `detokenize(all ids)`. Returns the PCM ready now
        ([S] or [B, S], possibly empty).
        """
        tokens = torch.as_tensor(tokens)
        single = tokens.dim() == 1
        tokens = (tokens[None] if single else tokens).cpu()
        self._tokens(tokens, "feed")  # validate early
        self._fed = tokens if self._fed is None else torch.cat([self._fed, tokens], dim=1)
        self._fed_single = single
        out = [torch.zeros(tokens.shape[0], 0)]
        while True:
            size = self.config.first_chunk_size if self._calls == 0 else self.config.chunk_size
            if self._fed.shape[1] <= size:
                break
            chunk, self._fed = self._fed[:, :size], self._fed[:, size:]
            out.append(self.push(chunk, is_final=False))
        wav = torch.cat(out, dim=1)
        return wav[0] if single else wav

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """End the utterance started with `feed`: push the buffered ids as the final chunk."""
        fed = self._fed if self._fed is not None else torch.zeros(self._batch or 1, 0, dtype=torch.long)
        single = self._fed is None or self._fed_single
        self._fed = None
        wav = self.push(fed, is_final=True)
        return wav[0] if single else wav

    def _flush_tail(self) -> torch.Tensor:
        """Final push with no new frames: emit the held-back wav tail as it is."""
        tail = self._pre_wav if self._pre_wav is not None else torch.zeros(self._batch, 0)
        self._reset_stream()
        return tail.float().cpu()

    @torch.inference_mode()
    def prefill_voice(self, mel: torch.Tensor, tokens: torch.Tensor, chunk_frames: int | None = None) -> None:
        """Voice prompt: reference mel [T, 80] (or [B, T, 80]) and its semantic ids [T/4] (or [B, T/4]).

        The mel is padded/truncated to the upsampled token length, processed in chunks of `chunk_frames`
        (at most `max_prompt_chunk` full chunks, the older remainder first) at t = 0.999, and kept as the
        state every new utterance starts from until `reset()`.
        """
        up, _ = self._tokens(tokens, "prefill_voice tokens")
        mel = torch.as_tensor(mel, dtype=torch.float32)
        if mel.dim() == 2:
            mel = mel[None]
        if mel.dim() != 3 or mel.shape[-1] != self.dit.cfg.input_size:
            raise ConfigError(f"prefill_voice mel must be [T, 80] or [B, T, 80], got {tuple(mel.shape)}")
        B = max(up.shape[0], mel.shape[0])
        up, mel = up.expand(B, -1), mel.expand(B, -1, -1)
        T = up.shape[1]
        mel = torch.nn.functional.pad(mel, (0, 0, 0, max(0, T - mel.shape[1])))[:, :T]
        mel = self._normalise(mel.to(self.device)).to(self.dtype)
        self.reset()
        self._ensure_batch(B)
        chunk = chunk_frames or self.config.prompt_chunk_frames
        n_chunks = min(T // chunk, self.config.max_prompt_chunk)
        start = T - n_chunks * chunk
        with torch.inference_mode():
            if start > 0:
                self._fill_prefix(mel[:, :start], up[:, :start])
            for i in range(n_chunks):
                s = start + i * chunk
                self._fill_prefix(mel[:, s : s + chunk], up[:, s : s + chunk])
        self._voice = (B, self.position, self._cache.snapshot())

    @torch.inference_mode()
    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whole utterance the way `KimiAudio.detokenize_audio` drives the stream: chunks of
        `first_chunk_size`, then `chunk_size` tokens, the last one final. [n] -> [S], [B, n] -> [B, S]."""
        tokens = torch.as_tensor(tokens)
        single = tokens.dim() == 1
        tokens = tokens[None] if single else tokens
        self._reset_stream()
        n, first, size = tokens.shape[1], self.config.first_chunk_size, self.config.chunk_size
        pieces = [self.push(tokens[:, :first], is_final=n <= first)]
        for i in range(first, n, size):
            pieces.append(self.push(tokens[:, i : i + size], is_final=i + size >= n))
        wav = torch.cat(pieces, dim=1)
        return wav[0] if single else wav

    @torch.inference_mode()
    def offline(self, tokens: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Non-streaming reference path: one solve over the whole sequence (no cache, no stitching),
        then one vocoder call. tokens [B, n]; noise [B, 4n, 80] (drawn if None). Returns [B, S]."""
        up, single = self._tokens(tokens, "offline")
        B, T = up.shape
        noise = draw_noise((B, T, self.dit.cfg.input_size), self.generator) if noise is None else noise
        noise = noise.reshape(B, T, -1).to(self.device, self.dtype)
        pos = torch.arange(T, device=self.device)[None].expand(B, T)

        r = self.config.upsample_factor

        def velocity(t, x):
            return self.dit(x, up, to_timestep(t, B, self.device), pos, cond_rate=r)

        mel = self._denormalise(euler_solve(velocity, noise, self._t_span, self.config.ode_solver))
        wav = self._vocode(mel).float().cpu()
        return wav[0] if single else wav
