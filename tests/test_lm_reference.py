"""Parity of `AudioLM` + the official-folder loader with the reference `llm` fixtures.

Every fixture folder whose manifest names the component `llm` is checked: prefill logits of both heads for
each prompt, the first cached decode step, and — on every extra checkpoint listed in cases.json
(`extra_models`, e.g. `model_eos/`) — the per-step last-position logits of its recorded generate runs, fed
with the recorded per-step id streams through the static KV cache.
"""

from __future__ import annotations

import pytest
import torch

from kimia.checkpoints.official_lm import load_official_lm
from tests.reference import assert_close, fixture_params, require

KIND = "llm"


def _prefill_inputs(model, exp, prompt, audio=None):
    audio = exp[f"{prompt}.audio_input_ids"] if audio is None else audio
    text = exp[f"{prompt}.text_input_ids"]
    mask_ref = exp[f"{prompt}.is_continuous_mask"].bool()
    feats = [exp[k] for k in sorted(exp) if k.startswith("whisper_features_")]
    continuous, mask = model.scatter_continuous(audio, feats)
    # The helper must reproduce the reference continuous mask from the media markers alone.
    assert torch.equal(mask, mask_ref), f"{prompt}: continuous mask from media markers differs from the reference"
    positions = torch.arange(audio.shape[1])[None]
    return audio, text, positions, continuous, mask


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_prefill_and_decode1(fx):
    fx = require(fx, KIND)
    cases = fx.json("cases.json")
    exp = fx.tensors("expected.safetensors")
    model, config = load_official_lm(fx.path, dtype=torch.float32)
    assert config.kimia_token_offset == cases["kimia_token_offset"]
    assert config.kimia_media_begin == cases["special_token_ids"]["media_begin"]
    for prompt, meta in cases["prompts"].items():
        audio, text, positions, continuous, mask = _prefill_inputs(model, exp, prompt)
        n = audio.shape[1]
        assert n == meta["prompt_length"]
        cache = model.allocate_cache(1, n + 8)
        with torch.no_grad():
            out = model(audio, text, positions, continuous=continuous, continuous_mask=mask, cache=cache)
        tol = fx.tol("prefill_logits")
        assert_close(out.audio_logits, exp[f"{prompt}.prefill_audio_logits"], tol, f"{fx}:{prompt} prefill audio")
        assert_close(out.text_logits, exp[f"{prompt}.prefill_text_logits"], tol, f"{fx}:{prompt} prefill text")

        a_id, t_id, pos = exp[f"{prompt}.decode1_input"].tolist()
        assert (a_id, t_id, pos) == (meta["decode1_audio_input_id"], meta["decode1_text_input_id"], meta["decode1_position"])
        with torch.no_grad():
            step = model(torch.tensor([[a_id]]), torch.tensor([[t_id]]), torch.tensor([[pos]]), cache=cache)
        tol = fx.tol("decode1_logits")
        assert_close(step.audio_logits, exp[f"{prompt}.decode1_audio_logits"], tol, f"{fx}:{prompt} decode1 audio")
        assert_close(step.text_logits, exp[f"{prompt}.decode1_text_logits"], tol, f"{fx}:{prompt} decode1 text")


def _extra_model_runs(fx):
    cases = fx.json("cases.json")
    extra = cases.get("extra_models", {})
    runs = {name: run for name, run in cases["generate_runs"].items() if run.get("model") in extra}
    return cases, extra, runs


def _run_audio_prompt(cases, exp, run):
    """The stored prompt's audio stream, with the ct/ctd marker after the user audio set for the run's
    output_type (the prompt builder's rule: `ct` for text output, `ctd` for text+audio; KIMI_AUDIO.md §4)."""
    audio = exp[f"{run['prompt']}.audio_input_ids"].clone()
    ids = cases["special_token_ids"]
    ct, ctd = ids["kimia_speech_ct_id"], ids["kimia_speech_ctd_id"]
    want = ct if run["kwargs"].get("output_type", "text") == "text" else ctd
    audio[(audio == ct) | (audio == ctd)] = want
    return audio


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_extra_checkpoint_step_logits(fx):
    """Per-step logits of the recorded runs on the extra checkpoints (many cached decode steps)."""
    fx = require(fx, KIND)
    cases, extra, runs = _extra_model_runs(fx)
    assert runs, f"{fx}: cases.json lists no generate runs on an extra checkpoint ({sorted(extra)})"
    exp = fx.tensors("expected.safetensors")
    step_file = next(f["path"] for f in fx.manifest["files"] if f["path"].startswith("expected_") and
                     all(f"{r}.step_text_logits" in f.get("tensors", {}) for r in runs))
    steps = fx.tensors(step_file)
    tol = fx.tol("step_logits")
    models = {}
    for name, run in runs.items():
        sub = extra[run["model"]]["path"]
        if sub not in models:
            models[sub] = load_official_lm(fx.path / sub, dtype=torch.float32)[0]
        model = models[sub]
        audio = _run_audio_prompt(cases, exp, run)
        audio, text, positions, continuous, mask = _prefill_inputs(model, exp, run["prompt"], audio)
        n = audio.shape[1]
        n_steps = run["steps"]
        cache = model.allocate_cache(1, n + n_steps)
        got_text, got_audio = [], []
        with torch.no_grad():
            out = model(audio, text, positions, continuous=continuous, continuous_mask=mask, cache=cache, logits_at=-1)
            got_text.append(out.text_logits[0, -1])
            got_audio.append(out.audio_logits[0, -1])
            for i in range(1, n_steps):
                a = torch.tensor([[run["step_audio_tokens"][i - 1]]])
                t = torch.tensor([[run["step_text_tokens"][i - 1]]])
                out = model(a, t, torch.tensor([[n + i - 1]]), cache=cache)
                got_text.append(out.text_logits[0, -1])
                got_audio.append(out.audio_logits[0, -1])
        got_text, got_audio = torch.stack(got_text), torch.stack(got_audio)
        assert_close(got_text, steps[f"{name}.step_text_logits"], tol, f"{fx}:{name} step text logits")
        assert_close(got_audio, steps[f"{name}.step_audio_logits"], tol, f"{fx}:{name} step audio logits")
        # Greedy decisions are what the engine will see: they must be the recorded argmax streams.
        exact = fx.tol("step_token_streams")
        assert_close(got_text.argmax(-1), torch.tensor(run["step_text_argmax"]), exact, f"{fx}:{name} text argmax")
        assert_close(got_audio.argmax(-1), torch.tensor(run["step_audio_argmax"]), exact, f"{fx}:{name} audio argmax")
