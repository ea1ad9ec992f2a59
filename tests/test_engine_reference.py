"""The generation engine against the official `_generate_loop` recordings of every `llm` fixture folder.

Each `generate_runs` entry of cases.json (its `model` key picks the checkpoint subfolder) is replayed from the
fixture's stored prompt streams and continuous features with the run's official keyword arguments: the two
loop lists, the filtered ids and, where recorded (the text-EOS runs), the per-step id streams, the step count,
the stop reason, the budget and the per-step logits of both heads.
"""

from __future__ import annotations

import pytest
import torch

from kimia.checkpoints.official_lm import load_official_lm
from kimia.engine import Engine, GenerationConfig
from kimia.prompt import PromptBatch
from kimia.tokens import SpecialTokens
from tests.reference import assert_close, fixture_params, require

KIND = "llm"



def fixture_prompt(exp: dict, specials: SpecialTokens, name: str, output_type: str) -> PromptBatch:
    """A stored prompt as a PromptBatch. The ct/ctd marker after the user audio follows the run's
    output_type (the official generate() rebuilds the prompt for it: ct for text, ctd for both; §4)."""
    audio = exp[f"{name}.audio_input_ids"][0].clone()
    text = exp[f"{name}.text_input_ids"][0].clone()
    mask = exp[f"{name}.is_continuous_mask"][0].bool()
    audio[(audio == specials.speech_ct) | (audio == specials.speech_ctd)] = (
        specials.speech_ct if output_type == "text" else specials.speech_ctd)
    feats = [exp[k][0] for k in sorted(exp) if k.startswith("whisper_features_")]
    pos = mask.nonzero()[:, 0].tolist()
    spans: list[tuple[int, int]] = []
    for p in pos:  # contiguous runs of the continuous mask, in order
        if spans and spans[-1][0] + spans[-1][1] == p:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((p, 1))
    assert len(spans) == len(feats), f"{name}: {len(spans)} continuous spans but {len(feats)} feature tensors"
    none = torch.zeros_like(mask)
    return PromptBatch(audio, text, mask, none, none, feats, spans)


def fixture_specials(fx) -> SpecialTokens:
    cases = fx.json("cases.json")
    sp = SpecialTokens.from_config(fx.path / "config.json")
    ids = cases["special_token_ids"]
    assert sp.as_official_dict() == {k: ids[k] for k in sp.as_official_dict()}, "special ids differ from cases.json"
    assert sp.token_offset == cases["kimia_token_offset"]
    return sp


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params(KIND))
def test_generate_runs_match_reference_loop(fx):
    fx = require(fx, KIND)
    cases = fx.json("cases.json")
    exp = fx.tensors("expected.safetensors")
    sp = fixture_specials(fx)
    extra = cases.get("extra_models", {})
    exact = fx.tol("generate_token_lists")
    streams_tol, logits_tol = fx.tol("step_token_streams"), fx.tol("step_logits")
    step_files = [f["path"] for f in fx.manifest["files"] if f["path"].startswith("expected_")]
    step_tensors = {}
    for f in step_files:
        step_tensors.update(fx.tensors(f))
    engines: dict[str, Engine] = {}
    runs = cases["generate_runs"]
    assert runs, f"{fx}: no generate_runs"
    for name, run in runs.items():
        sub = extra[run["model"]]["path"] if run.get("model") else "."
        if sub not in engines:
            engines[sub] = Engine(load_official_lm(fx.path / sub, dtype=torch.float32)[0], sp)
        config = GenerationConfig.from_official(**run["kwargs"])
        config.return_logits = True
        variants = [(config, f"{fx}:{name}")]
        if config.output_type == "text":  # the text-only fast path (no audio branch) must give the same run
            fast = GenerationConfig.from_official(**run["kwargs"])
            fast.return_logits, fast.skip_audio_branch = True, True
            variants.append((fast, f"{fx}:{name} [skip_audio_branch]"))
        for cfg, what in variants:
            _check_run(engines[sub], exp, sp, run, name, cfg, what, step_tensors, exact, streams_tol, logits_tol)
        if config.output_type == "both" and config.text.greedy:
            _check_text_skip(engines[sub], exp, sp, run, name, f"{fx}:{name} [skip_text_after_eos]")


def _check_text_skip(engine, exp, sp, run, name, what):
    """Spoken-answer fast path: after every row's text EOS the text tail is not run; ids are unchanged."""
    prompt = fixture_prompt(exp, sp, run["prompt"], "both")
    calls = []
    hook = engine.model.model.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        results = {}
        for skip in (False, True):
            calls.clear()
            cfg = GenerationConfig.from_official(**run["kwargs"])
            cfg.skip_text_after_eos = skip
            (results[skip],) = engine.generate([prompt], cfg)
            results[skip, "calls"] = len(calls)
    finally:
        hook.remove()
    a, b = results[False], results[True]
    for field in ("step_text_tokens", "step_audio_tokens", "loop_text_tokens", "loop_audio_tokens", "stop_reason"):
        assert getattr(a, field) == getattr(b, field), f"{what}: {field}"
    assert results[False, "calls"] == a.steps
    if a.text_eos_step is not None and a.text_eos_step + 1 < a.steps:
        assert results[True, "calls"] == a.text_eos_step + 1, f"{what}: the text tail ran after the text EOS"


def _check_run(engine, exp, sp, run, name, config, what, step_tensors, exact, streams_tol, logits_tol):
    prompt = fixture_prompt(exp, sp, run["prompt"], config.output_type)
    (r,) = engine.generate([prompt], config)
    if config.skips_audio:
        assert r.step_audio_logits is None, f"{what}: the audio branch ran"
    assert_close(torch.tensor(r.loop_text_tokens, dtype=torch.long),
                 torch.tensor(run["loop_text_tokens"], dtype=torch.long), exact, f"{what} loop_text_tokens")
    assert_close(torch.tensor(r.loop_audio_tokens, dtype=torch.long),
                 torch.tensor(run["loop_audio_tokens"], dtype=torch.long), exact, f"{what} loop_audio_tokens")
    if run.get("filtered_audio_ids") is not None:
        assert r.audio_ids == run["filtered_audio_ids"], f"{what}: filtered audio ids"
    else:
        assert r.audio_ids == [], f"{what}: text mode returns no audio"
    assert r.text_ids == [t for t in run["loop_text_tokens"] if t < sp.token_offset]
    if "filtered_text_ids" in run:
        assert r.text_ids == run["filtered_text_ids"], f"{what}: filtered text ids"
    if "loop_budget" in run:
        assert config.steps_for(len(prompt)) == run["loop_budget"], f"{what}: budget"
    if "steps" not in run:
        # Runs without per-step records: text mode ends at its budget, both mode on the audio end id.
        if config.output_type == "text":
            assert r.stop_reason == "budget" and r.steps == config.steps_for(len(prompt)), what
        else:
            assert r.stop_reason in ("audio_msg_end", "audio_media_end"), what
            assert r.loop_audio_tokens[-1] in sp.audio_end_ids, what
        return
    assert r.steps == run["steps"], f"{what}: steps {r.steps} != {run['steps']}"
    assert r.stop_reason == run["stop_reason"], f"{what}: stop {r.stop_reason} != {run['stop_reason']}"
    assert r.text_eos_step == run["text_eos_step"], f"{what}: text EOS step"
    assert len(r.loop_text_tokens) == run["valid_text_length"] and len(r.loop_audio_tokens) == run["valid_audio_length"]
    assert_close(torch.tensor(r.step_text_tokens), torch.tensor(run["step_text_tokens"]), streams_tol,
                 f"{what} step_text_tokens")
    assert_close(torch.tensor(r.step_audio_tokens), torch.tensor(run["step_audio_tokens"]), streams_tol,
                 f"{what} step_audio_tokens")
    assert_close(r.step_text_logits, step_tensors[f"{name}.step_text_logits"], logits_tol, f"{what} text logits")
    if not config.skips_audio:
        assert_close(r.step_audio_logits, step_tensors[f"{name}.step_audio_logits"], logits_tol,
                     f"{what} audio logits")
