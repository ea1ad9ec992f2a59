"""Engine properties on the `llm` fixture checkpoints (random weights with scaled stop rows, so that runs end
at different steps for different reasons): batched greedy == single runs (mixed prompt lengths, stop times,
both output types, finished rows dropped from the batch), cached decode == the no-cache reference loop
(greedy and seeded sampling with repetition penalties, through KV-cache growth), seeded reproducibility,
budgets, streaming events == generate()."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kimia.engine as engine_mod
from kimia.checkpoints.official_lm import load_official_lm
from kimia.engine import (AudioTokens, Engine, Finished, GenerationConfig, TextDelta, reference_generate)
from kimia.errors import BudgetError, ConfigError, PromptError
from kimia.prompt import PromptBuilder
from kimia.sampling import SamplingParams
from kimia.tokens import SpecialTokens, TextTokenizer
from tests.reference import find_fixtures

SAMPLED = dict(text=SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.2, window=3),
               audio=SamplingParams(temperature=0.9, top_k=0, repetition_penalty=1.3, window=4))



def _folder():
    found = find_fixtures("llm")
    assert found, "no llm fixture folder (KIMIA_REFERENCE_FIXTURES)"
    return found[0]


@pytest.fixture(scope="module")
def setup():
    """(engines by checkpoint: base + every extra model, specials, prompt builder, fixture data)."""
    fx = _folder()
    cases = fx.json("cases.json")
    sp = SpecialTokens.from_config(fx.path / "config.json")
    engines = {".": Engine(load_official_lm(fx.path, dtype=torch.float32)[0], sp)}
    for name, meta in cases.get("extra_models", {}).items():
        engines[name] = Engine(load_official_lm(fx.path / meta["path"], dtype=torch.float32)[0], sp)
    tok = TextTokenizer.from_files(fx.path / "tiny_tiktoken.model", special_base=sp.bos)
    builder = PromptBuilder(tok, sp)
    exp = fx.tensors("expected.safetensors")
    feats = exp["whisper_features_A"][0]
    sem = [sp.token_offset + s for s in cases["audio_semantic_ids_A"]]
    return engines, sp, builder, sem, feats


def _prompts(setup, output_type):
    """Five prompts of different lengths and layouts (text+audio, audio only, short audio, multi-turn)."""
    _, sp, builder, sem, feats = setup
    g = torch.Generator().manual_seed(7)
    other = feats[torch.randperm(feats.shape[0], generator=g)] * 0.7
    audio = lambda ids, f: {"role": "user", "message_type": "audio", "content": None, "audio_tokens": ids,
                            "features": f}
    chats = [
        [{"role": "user", "message_type": "text", "content": "Please transcribe the spoken content into written text."},
         audio(sem, feats)],
        [audio(sem, feats)],
        [audio(sem[:7], feats[:7])],
        [{"role": "user", "message_type": "text", "content": "Answer briefly."}, audio(sem[::-1], other)],
        [audio(sem[3:], feats[3:]),
         {"role": "assistant", "message_type": "audio-text", "content": [None, "ok"], "audio_tokens": sem[:5]},
         audio(sem[:9], other[:9])],
    ]
    return [builder.build(c, output_type=output_type) for c in chats]


def _same(a, b, what):
    for f in ("text_ids", "audio_ids", "loop_text_tokens", "loop_audio_tokens", "step_text_tokens",
              "step_audio_tokens", "stop_reason", "steps", "prompt_length", "text_eos_step"):
        assert getattr(a, f) == getattr(b, f), f"{what}: {f} differs: {getattr(a, f)} vs {getattr(b, f)}"


@pytest.mark.parametrize("output_type", ["text", "both"])
def test_batched_greedy_equals_single_runs(setup, output_type):
    engines = setup[0]
    prompts = _prompts(setup, output_type)
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == len(lengths), lengths
    # A context budget just above the longest prompt gives every row its own budget (and stop step).
    config = GenerationConfig(output_type=output_type, max_context_text=max(lengths) + 12,
                              max_context_both=max(lengths) + 30, return_logits=True)
    reasons = set()
    for name, eng in engines.items():
        sizes: list[int] = []
        hook = eng.model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
        try:
            batched = eng.generate(prompts, config)
        finally:
            hook.remove()
        singles = [eng.generate([p], config)[0] for p in prompts]
        for k, (b, s) in enumerate(zip(batched, singles)):
            _same(b, s, f"{name} row {k}")
            torch.testing.assert_close(b.step_text_logits, s.step_text_logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(b.step_audio_logits, s.step_audio_logits, atol=1e-4, rtol=1e-4)
        reasons |= {r.stop_reason for r in batched}
        # Finished rows leave the batch: call j (prefill = 0) runs exactly the rows with more than j steps.
        steps = [r.steps for r in batched]
        batched_calls = sizes[: max(steps)]
        assert batched_calls == [sum(s > j for s in steps) for j in range(max(steps))], (batched_calls, steps)
        assert len(set(steps)) > 1, f"{name}: all rows stopped together ({steps}); the test needs mixed stops"
    assert "budget" in reasons and len(reasons) > 1, reasons  # early stops (EOS / audio end) and budget stops


@pytest.mark.parametrize("output_type", ["text", "both"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_cached_engine_equals_no_cache_reference(setup, output_type, sampled, monkeypatch):
    engines, sp = setup[0], setup[1]
    monkeypatch.setattr(engine_mod, "_CACHE_BLOCK", 3)  # force several cache reallocations
    prompts = _prompts(setup, output_type)
    config = GenerationConfig(output_type=output_type, max_new_tokens=24, return_logits=True,
                              **(SAMPLED if sampled else {}))
    for name, eng in engines.items():
        for k in (2, 4):
            g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
            (got,) = eng.generate([prompts[k]], config, generator=g1)
            ref = reference_generate(eng.model, sp, prompts[k], config, generator=g2)
            _same(got, ref, f"{name} prompt {k}")
            torch.testing.assert_close(got.step_text_logits, ref.step_text_logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got.step_audio_logits, ref.step_audio_logits, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_reproducible_and_seed_dependent(setup):
    eng = setup[0]["."]
    prompts = _prompts(setup, "both")[:3]
    config = GenerationConfig(output_type="both", max_new_tokens=24, **SAMPLED)
    run = lambda seed: eng.generate(prompts, config, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(3), run(3), run(4)
    for k in range(3):
        _same(a[k], b[k], f"row {k} same seed")
    assert any(x.step_text_tokens != y.step_text_tokens or x.step_audio_tokens != y.step_audio_tokens
               for x, y in zip(a, c)), "different seeds gave identical samples"
    # Greedy never touches the generator.
    greedy = GenerationConfig(output_type="both", max_new_tokens=24)
    g1 = eng.generate(prompts, greedy, generator=torch.Generator().manual_seed(1))
    g2 = eng.generate(prompts, greedy, generator=torch.Generator().manual_seed(2))
    for k in range(3):
        _same(g1[k], g2[k], f"greedy row {k}")


def test_budgets_and_cache_cap(setup):
    eng = setup[0]["."]
    p = _prompts(setup, "text")[0]
    n = len(p)
    with pytest.raises(BudgetError, match=rf"{n} positions.*budget of {n}"):
        eng.generate([p], GenerationConfig(max_context_text=n))
    with pytest.raises(BudgetError, match=r"max_new_tokens 9 .*at most 8"):
        eng.generate([p], GenerationConfig(max_context_text=n + 8, max_new_tokens=9))
    both = _prompts(setup, "both")[0]
    with pytest.raises(BudgetError, match="'both'"):
        eng.generate([both], GenerationConfig(output_type="both", max_context_both=len(both) - 1))
    with pytest.raises(BudgetError, match="max_cache_len"):
        eng.generate([p], GenerationConfig(max_cache_len=n - 1))
    # The default budget is context - prompt length; a cache cap ends the row with its own reason.
    (full,) = eng.generate([p], GenerationConfig(max_context_text=n + 10))
    assert full.steps == 10 and full.stop_reason == "budget"
    (capped,) = eng.generate([p], GenerationConfig(max_context_text=n + 10, max_cache_len=n + 4))
    assert capped.stop_reason == "max_cache_len" and capped.steps == 5
    assert capped.step_text_tokens == full.step_text_tokens[:5]
    with pytest.raises(BudgetError, match="max_position_embeddings"):
        eng.generate([p], GenerationConfig(max_context_text=eng.model.config.max_position_embeddings + n + 2))
    with pytest.raises(ConfigError):
        GenerationConfig(output_type="audio")
    with pytest.raises(ConfigError):
        GenerationConfig.from_official(text_temprature=0.5)
    with pytest.raises(ConfigError):
        GenerationConfig(max_new_tokens=0)


def test_bad_prompts_raise(setup):
    eng, sp = setup[0]["."], setup[1]
    p = _prompts(setup, "text")[1]
    with pytest.raises(PromptError, match="at least one"):
        eng.generate([], GenerationConfig())
    with pytest.raises(PromptError, match="list of PromptBatch"):
        eng.generate(p, GenerationConfig())
    bad = dataclasses.replace(p, audio_ids=p.audio_ids.clone())
    bad.audio_ids[0] = eng.model.config.vocab_size
    with pytest.raises(PromptError, match="outside the model vocabulary"):
        eng.generate([bad], GenerationConfig())
    with pytest.raises(PromptError, match="feature tensors"):
        eng.generate([dataclasses.replace(p, features=p.features * 2)], GenerationConfig())


@pytest.mark.parametrize("output_type", ["text", "both"])
def test_stream_events_concatenate_to_generate(setup, output_type):
    prompts = _prompts(setup, output_type)
    config = GenerationConfig(output_type=output_type, max_new_tokens=40)
    chunk = 4
    for name, eng in setup[0].items():
        results = eng.generate(prompts, config)
        text = {k: [] for k in range(len(prompts))}
        audio = {k: [] for k in range(len(prompts))}
        finished = {}
        for ev in eng.stream(prompts, config, audio_chunk=chunk):
            assert ev.row not in finished, f"{name}: event for row {ev.row} after its Finished"
            if isinstance(ev, TextDelta):
                assert len(ev.ids) == 1
                text[ev.row] += ev.ids
            elif isinstance(ev, AudioTokens):
                assert 0 < len(ev.ids) <= chunk
                audio[ev.row].append(ev.ids)
            else:
                assert isinstance(ev, Finished)
                finished[ev.row] = ev.result
        assert sorted(finished) == list(range(len(prompts)))
        for k, r in enumerate(results):
            _same(finished[k], r, f"{name} row {k}")
            assert text[k] == r.text_ids
            assert sum(audio[k], []) == r.audio_ids
            assert all(len(c) == chunk for c in audio[k][:-1]), "only the final flush may be short"
        if output_type == "both":
            assert any(audio.values()), "no audio was streamed"
    with pytest.raises(ConfigError):
        next(iter(setup[0]["."].stream(prompts, config, audio_chunk=0)))


def test_engine_device_and_dtype_resolution(setup):
    """Engine(dtype=...) moves a model once; float64 greedy decisions equal the float32 engine's."""
    sp = setup[1]
    fx = _folder()
    model = load_official_lm(fx.path, dtype=torch.float32)[0]
    eng64 = Engine(model, sp, device="cpu", dtype=torch.float64)
    assert eng64.model.lm_head.weight.dtype == torch.float64 and eng64.dtype == torch.float64
    prompts = _prompts(setup, "both")[:2]
    config = GenerationConfig(output_type="both", max_new_tokens=24, return_logits=True)
    got = eng64.generate(prompts, config)
    want = setup[0]["."].generate(prompts, config)
    for k, (a, b) in enumerate(zip(got, want)):
        _same(a, b, f"float64 row {k}")
        torch.testing.assert_close(a.step_text_logits.float(), b.step_text_logits, atol=1e-4, rtol=1e-4)


def test_text_mode_skips_the_audio_branch_with_identical_results(setup):
    """Text mode runs without the mimo layers (auto), batched and sampled, with the same ids and text logits."""
    engines = setup[0]
    prompts = _prompts(setup, "text")
    eng = engines["."]
    calls: list[bool] = []
    hook = eng.model.register_forward_pre_hook(lambda m, args, kw: calls.append(kw.get("skip_audio", False)),
                                               with_kwargs=True)
    try:
        for params in ({}, SAMPLED):
            full = GenerationConfig(output_type="text", max_new_tokens=10, skip_audio_branch=False, **params)
            fast = GenerationConfig(output_type="text", max_new_tokens=10, **params)
            assert fast.skips_audio and not full.skips_audio
            calls.clear()
            a = eng.generate(prompts, fast, torch.Generator().manual_seed(3))
            assert calls and all(calls)
            calls.clear()
            b = eng.generate(prompts, full, torch.Generator().manual_seed(3))
            assert calls and not any(calls)
            for k, (x, y) in enumerate(zip(a, b)):
                _same(x, y, f"row {k}")
    finally:
        hook.remove()
    logged = eng.generate(prompts[:1], GenerationConfig(output_type="text", max_new_tokens=6, return_logits=True,
                                                        skip_audio_branch=True))[0]
    full = eng.generate(prompts[:1], GenerationConfig(output_type="text", max_new_tokens=6, return_logits=True))[0]
    assert logged.step_audio_logits is None and full.step_audio_logits is not None
    assert torch.equal(logged.step_text_logits, full.step_text_logits)
    with pytest.raises(ConfigError, match="skip_audio_branch"):
        GenerationConfig(output_type="both", skip_audio_branch=True)
