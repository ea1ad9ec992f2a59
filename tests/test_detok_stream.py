"""Streaming detokenizer: fixture parity of the streamed mels and waveform, and the properties of the
chunk algorithm (look-ahead, prefix cache, cross-fade, batching, voice prompt, position reset)."""

from __future__ import annotations

import functools

import pytest
import torch

from kimia.detokenizer.loader import load_detokenizer
from kimia.detokenizer.stream import StreamConfig, StreamingDetokenizer
from kimia.errors import ConfigError
from tests.reference import assert_close, fixture_params, require

KIND = "detokenizer"



@functools.lru_cache(maxsize=4)
def _modules(path):
    det = load_detokenizer(path)
    return det.dit, det.vocoder


def _stream(fx, noise=None, **cfg) -> StreamingDetokenizer:
    dit, voc = _modules(fx.path)
    return StreamingDetokenizer(dit, voc, StreamConfig(**cfg), noise_provider=noise)


def _seeded_noise(seed: int):
    """Noise of call i drawn from its own seeded generator (so runs with different chunking are comparable)."""

    def provider(i, shape):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))

    return provider


# short schedule for property tests: 3 calls, few frames, few steps (the tiny vocoder dominates run time)
FAST = dict(first_chunk_size=8, chunk_size=8, look_ahead_tokens=3, ode_steps=6)


def _tokens(n, seed=0, batch=None, vocab=1024):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,) if batch is None else (batch, n), generator=g)


# ----------------------------------------------------------------------------------------- parity
class _Recording(StreamingDetokenizer):
    """Observes each push (mel of the chunk and emitted samples) without changing it."""

    def push(self, tokens, is_final=False):
        wav = super().push(tokens, is_final)
        self.record.append((self.last_mel.clone(), wav.shape[-1], is_final))
        return wav


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_stream_matches_reference(fx):
    """`detokenize` (KimiAudio.detokenize_audio chunking) call by call against the captured reference run."""
    fx = require(fx, KIND)
    exp, info = fx.tensors(), fx.json("detok_info.json")
    keys = ("look_ahead_tokens", "max_kv_cache_tokens", "upsample_factor", "ode_steps", "ode_solver", "frame_size",
            "first_chunk_size", "chunk_size")
    dit, voc = _modules(fx.path)
    det = _Recording(dit, voc, StreamConfig(**{k: info[k] for k in keys}), noise_provider=lambda i, shape: exp[f"stream{i}.noise"])
    det.record = []
    wav = det.detokenize(exp["semantic_tokens"])
    calls = info["stream_calls"]
    assert len(det.record) == len(calls)
    for i, ((mel, samples, final), call) in enumerate(zip(det.record, calls)):
        assert_close(mel[0], exp[f"stream{i}.mel"], fx.tol("stream_mel"), f"stream call {i} mel")
        assert (samples, final) == (call["wav_samples_out"], call["is_final"]), f"call {i}"
    assert_close(wav, exp["stream_full_wav"], fx.tol("stream_full_wav"), "stream_full_wav")

    # every mechanism of the chunk algorithm ran during the fixture run
    non_final = sum(not c["is_final"] for c in calls)
    la = info["look_ahead_tokens"] * info["upsample_factor"]
    assert non_final >= 2, "fixture too short to exercise the cross-fade"
    assert det.stats.look_ahead_frames == non_final * la
    assert det.stats.prefix_calls == non_final
    assert det.stats.cached_attention_chunks == len(calls) - 1
    assert det.stats.crossfades == non_final - 1


# ----------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_disabling_each_mechanism_changes_output(fx):
    fx = require(fx, KIND)
    tokens = _tokens(22)
    base = _stream(fx, _seeded_noise(10), **FAST)
    ref = base.detokenize(tokens)
    assert base.stats.crossfades == 1 and base.stats.prefix_calls == 2 and base.stats.look_ahead_frames == 24
    assert ref.shape[-1] == 22 * 4 * 480
    for change in (dict(look_ahead_tokens=0), dict(prefix_cache=False), dict(crossfade=False), dict(ode_steps=3)):
        det = _stream(fx, _seeded_noise(10), **{**FAST, **change})
        out = det.detokenize(tokens)
        assert out.shape == ref.shape, change
        assert (out - ref).abs().max() > 1e-4, f"{change} did not change the output"
    assert det.stats.dit_calls == 3 * 2 + 2  # 3 chunks of 2 Euler steps + 2 cache fills


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_one_chunk_equals_offline(fx):
    fx = require(fx, KIND)
    tokens = _tokens(12, seed=3)
    det = _stream(fx, _seeded_noise(20), **{**FAST, "first_chunk_size": 12})
    streamed = det.detokenize(tokens)
    assert det.stats.chunks == 1
    offline = det.offline(tokens, noise=_seeded_noise(20)(0, (1, 48, 80)))
    torch.testing.assert_close(streamed, offline, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_batched_streams_equal_single_runs(fx):
    fx = require(fx, KIND)
    tokens = _tokens(20, seed=4, batch=2)

    def batched(i, shape):
        return torch.cat([_seeded_noise(100 * (b + 1))(i, (1, *shape[1:])) for b in range(shape[0])])

    out = _stream(fx, batched, **FAST).detokenize(tokens)
    assert out.shape == (2, 20 * 1920)
    for b in range(2):
        single = _stream(fx, _seeded_noise(100 * (b + 1)), **FAST).detokenize(tokens[b])
        torch.testing.assert_close(out[b], single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_voice_prompt_changes_output_and_reset_clears_it(fx):
    fx = require(fx, KIND)
    tokens = _tokens(10, seed=5)
    det = _stream(fx, _seeded_noise(30), **{**FAST, "prompt_chunk_frames": 16})
    plain = det.detokenize(tokens)
    g = torch.Generator().manual_seed(6)
    prompt_mel, prompt_tokens = torch.randn(36, 80, generator=g), _tokens(9, seed=7)  # 36 frames = 9 tokens
    calls = det.stats.prefix_calls
    det.prefill_voice(prompt_mel, prompt_tokens)
    assert det.position == 36 and det.stats.prefix_calls - calls == 3  # remainder of 4 frames + 2 chunks of 16
    voiced = det.detokenize(tokens)
    assert (voiced - plain).abs().max() > 1e-4
    torch.testing.assert_close(det.detokenize(tokens), voiced)  # the voice persists across utterances
    dit, voc = _modules(fx.path)
    other = StreamingDetokenizer(dit, voc, StreamConfig(**{**FAST, "prompt_chunk_frames": 16}),
                                 noise_provider=_seeded_noise(30), speaker_prompt=(prompt_mel, prompt_tokens))
    torch.testing.assert_close(other.detokenize(tokens), voiced)
    det.reset()
    torch.testing.assert_close(det.detokenize(tokens), plain)


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_cache_trim_and_position_reset(fx):
    fx = require(fx, KIND)
    tokens = _tokens(40, seed=8)
    det = _stream(fx, _seeded_noise(40), **{**FAST, "max_kv_cache_tokens": 40, "max_positions": 100})
    out = det.detokenize(tokens)
    assert out.shape[-1] == 40 * 1920
    assert det.stats.cache_trims >= 1 and det.stats.position_resets >= 1
    assert torch.isfinite(out).all()
    # a trimmed cache and a restarted position change what the later chunks attend to
    full = _stream(fx, _seeded_noise(40), **FAST).detokenize(tokens)
    assert (full - out).abs().max() > 1e-4


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_generator_determinism_and_bad_input(fx):
    fx = require(fx, KIND)
    dit, voc = _modules(fx.path)
    tokens = _tokens(6, seed=9)
    a = StreamingDetokenizer(dit, voc, StreamConfig(**FAST), generator=torch.Generator().manual_seed(1)).detokenize(tokens)
    b = StreamingDetokenizer(dit, voc, StreamConfig(**FAST), generator=torch.Generator().manual_seed(1)).detokenize(tokens)
    torch.testing.assert_close(a, b)
    det = _stream(fx, _seeded_noise(0), **FAST)
    with pytest.raises(ConfigError, match="semantic ids"):
        det.push(torch.tensor([0, 5000]))
    with pytest.raises(ConfigError, match="integer ids"):
        det.push(torch.zeros(3))
    det.push(_tokens(8, batch=2))
    with pytest.raises(ConfigError, match="batch"):
        det.push(_tokens(8, batch=3))
    with pytest.raises(ConfigError, match="ode_solver"):
        StreamConfig(ode_solver="heun")
    # a non-final chunk shorter than the look-ahead is buffered, then flushed by the final push
    det.reset()
    assert det.push(_tokens(2), is_final=False).shape == (0,)
    assert det.push(_tokens(2), is_final=True).shape == (4 * 4 * 480,)


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_converted_model_folder_streams_identically(fx, tmp_path):
    from kimia.detokenizer.loader import convert_official_detokenizer

    fx = require(fx, KIND)
    convert_official_detokenizer(fx.path, tmp_path / "native")
    assert (tmp_path / "native" / "audio_detokenizer" / "model.safetensors").is_file()
    tokens = _tokens(10, seed=11)
    native = load_detokenizer(tmp_path / "native", config=StreamConfig(**FAST), noise_provider=_seeded_noise(50))
    official = _stream(fx, _seeded_noise(50), **FAST)
    torch.testing.assert_close(native.detokenize(tokens), official.detokenize(tokens), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_mel_normalisation_is_undone_on_output(fx):
    """normalize_mel: the DiT works in normalised space and the emitted mel is x * std + mean."""
    import dataclasses

    from kimia.detokenizer.dit import DiT

    fx = require(fx, KIND)
    dit, voc = _modules(fx.path)
    norm = DiT(dataclasses.replace(dit.cfg, normalize_mel=True, mel_mean=-3.0, mel_std=2.5))
    norm.load_state_dict(dit.state_dict())
    tokens = _tokens(8, seed=12)
    plain = _stream(fx, _seeded_noise(60), **FAST)
    scaled = StreamingDetokenizer(norm, voc, StreamConfig(**FAST), noise_provider=_seeded_noise(60))
    plain.push(tokens, is_final=False)
    scaled.push(tokens, is_final=False)
    torch.testing.assert_close(scaled.last_mel, plain.last_mel * 2.5 - 3.0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_bfloat16_stream_tracks_float32(fx):
    fx = require(fx, KIND)
    tokens = _tokens(12, seed=13)
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        det = load_detokenizer(fx.path, dtype=dtype, config=StreamConfig(**FAST), noise_provider=_seeded_noise(70))
        outs.append(det.detokenize(tokens))
        assert outs[-1].dtype == torch.float32 and det.last_mel.dtype == dtype
    rel = ((outs[0] - outs[1]).norm() / outs[0].norm()).item()
    assert rel < 0.05, rel


@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_feed_in_pieces_equals_detokenize(fx):
    fx = require(fx, KIND)
    tokens = _tokens(24, seed=14)
    whole = _stream(fx, _seeded_noise(80), **FAST).detokenize(tokens)
    det = _stream(fx, _seeded_noise(80), **FAST)
    pieces, start = [], 0
    for k in (1, 5, 2, 9, 3, 4):  # 24 ids in irregular groups, as a generation loop would produce them
        pieces.append(det.feed(tokens[start : start + k]))
        start += k
    assert sum(p.shape[-1] for p in pieces) > 0, "nothing was emitted before finish()"
    pieces.append(det.finish())
    torch.testing.assert_close(torch.cat(pieces), whole)
    assert det.sample_rate == 24000
