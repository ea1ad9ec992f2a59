"""Sampling functions against the reference sampler fixtures, plus determinism and batching properties."""

from __future__ import annotations

import pytest
import torch

from kimia.errors import ConfigError
from kimia.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    sample,
    sample_with_params,
    sampling_distribution,
)
from tests.reference import assert_close, fixture_params, require


def _stream_params(case: dict) -> SamplingParams:
    p, s = case["params"], case["stream"]
    return SamplingParams(
        temperature=p[f"{s}_temperature"], top_k=p[f"{s}_top_k"],
        repetition_penalty=p[f"{s}_repetition_penalty"], window=p[f"{s}_repetition_window_size"],
    )


def _cases(fx):
    data = fx.json("cases.json")
    tensors = fx.tensors("cases.safetensors")
    assert data["cases"], "sampler fixture has no cases"
    return data["cases"], tensors


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("sampler"))
def test_repetition_penalty_matches_reference(fx):
    fx = require(fx, "sampler")
    cases, t = _cases(fx)
    for case in cases:
        name, params = case["name"], _stream_params(case)
        logits = t[f"{name}.logits"].reshape(1, -1)
        before = logits.clone()
        recent = t[f"{name}.recent_tokens"].tolist() if case["has_recent_tokens"] else []
        out = apply_repetition_penalty(logits, [recent], params.repetition_penalty, params.window)
        assert torch.equal(logits, before), f"{name}: input was modified"
        assert_close(out, t[f"{name}.logits_after_call"].reshape(1, -1), fx.tol("logits_after_call"), f"{name} logits_after_call")
        # the same through a [1, n] tensor of recent ids and through a flat list
        if recent:
            out_t = apply_repetition_penalty(logits, torch.tensor([recent]), params.repetition_penalty, params.window)
            out_l = apply_repetition_penalty(logits[0], recent, params.repetition_penalty, params.window)
            assert torch.equal(out_t, out) and torch.equal(out_l, out[0]), name


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("sampler"))
def test_window_boundary_case_present(fx):
    """The fixture must include the 'exactly window ids -> no penalty' case that this rule hinges on."""
    fx = require(fx, "sampler")
    cases, t = _cases(fx)
    hit = [c for c in cases if c["has_recent_tokens"] and _stream_params(c).repetition_penalty > 1.0
           and len(t[f"{c['name']}.recent_tokens"]) == _stream_params(c).window]
    assert hit, "no case with exactly `window` recent ids"
    for c in hit:
        assert torch.equal(t[f"{c['name']}.logits_after_call"], t[f"{c['name']}.logits"])


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("sampler"))
def test_greedy_ids_exact(fx):
    fx = require(fx, "sampler")
    cases, t = _cases(fx)
    greedy = [c for c in cases if "next_token" in c]
    assert greedy
    for case in greedy:
        name, params = case["name"], _stream_params(case)
        assert params.greedy
        logits = t[f"{name}.logits"].reshape(1, -1)
        recent = [t[f"{name}.recent_tokens"].tolist()] if case["has_recent_tokens"] else None
        for seed in (0, 1):
            g = torch.Generator().manual_seed(seed)
            ids = sample_with_params(logits, params, recent, g)
            assert_close(ids, torch.tensor([case["next_token"]]), fx.tol("greedy_ids"), f"{name} greedy id")


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("sampler"))
def test_stochastic_distributions(fx):
    fx = require(fx, "sampler")
    cases, t = _cases(fx)
    stochastic = [c for c in cases if f"{c['name']}.distribution_normalized" in t]
    assert stochastic
    for case in stochastic:
        name, params = case["name"], _stream_params(case)
        logits = t[f"{name}.logits"].reshape(1, -1)
        if case["has_recent_tokens"]:
            logits = apply_repetition_penalty(logits, [t[f"{name}.recent_tokens"].tolist()], params.repetition_penalty, params.window)
        probs = sampling_distribution(logits, params.temperature, params.top_k)
        assert probs.dtype == torch.float32 and probs.shape == logits.shape
        expected = t[f"{name}.distribution_normalized"]
        if f"{name}.topk_indices" in t:
            idx = t[f"{name}.topk_indices"]
            assert_close(probs.gather(1, idx), expected, fx.tol("distribution_normalized"), f"{name} top-k probs")
            outside = probs.clone()
            outside.scatter_(1, idx, 0.0)
            assert outside.abs().max().item() == 0.0, f"{name}: mass outside the top-k"
            # the draw equals the reference's multinomial over its own weights under the same generator state
            for seed in range(5):
                ours = sample(logits, params.temperature, params.top_k, torch.Generator().manual_seed(seed))
                ref_pos = torch.multinomial(t[f"{name}.multinomial_input"], 1, generator=torch.Generator().manual_seed(seed))
                assert ours.item() == idx[0, ref_pos.item()].item(), f"{name} seed {seed}"
        else:
            assert_close(probs, expected, fx.tol("distribution_normalized"), f"{name} full distribution")
            for seed in range(5):
                ours = sample(logits, params.temperature, params.top_k, torch.Generator().manual_seed(seed))
                ref = torch.multinomial(t[f"{name}.multinomial_input"], 1, generator=torch.Generator().manual_seed(seed))
                assert ours.item() == ref.item(), f"{name} seed {seed}"


def test_same_seed_same_sample_and_greedy_ignores_seed():
    logits = torch.randn(4, 97)
    a = sample(logits, 0.9, 10, torch.Generator().manual_seed(7))
    b = sample(logits, 0.9, 10, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    draws = {tuple(sample(logits, 1.5, 0, torch.Generator().manual_seed(s)).tolist()) for s in range(8)}
    assert len(draws) > 1, "different seeds never changed the draw"
    greedy = {tuple(sample(logits, 0.0, 10, torch.Generator().manual_seed(s)).tolist()) for s in range(4)}
    assert greedy == {tuple(logits.argmax(-1).tolist())}
    assert torch.equal(sample(logits, 1e-7, 3, None), logits.argmax(-1))
    one_hot = sampling_distribution(logits, 0.0, 5)
    assert torch.equal(one_hot, torch.nn.functional.one_hot(logits.argmax(-1), 97).float())


def test_sampling_frequencies_follow_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    probs = sampling_distribution(logits, 0.8, 3)[0]
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.bincount(sample(logits.expand(n, -1), 0.8, 3, g), minlength=5).float() / n
    assert counts[3:].sum() == 0
    assert torch.allclose(counts, probs, atol=0.03), (counts, probs)


def test_batched_rows_equal_single_rows():
    torch.manual_seed(3)
    logits = torch.randn(3, 50)
    temps, ks = [0.0, 0.7, 1.3], [5, 4, 0]
    recent = [[1, 2, 3, 4, 5], [7, 7, 8], [9, 10, 11, 12, 13, 14]]
    pen = apply_repetition_penalty(logits, recent, 1.2, 4)
    for b in range(3):
        assert torch.equal(pen[b], apply_repetition_penalty(logits[b], recent[b], 1.2, 4))
    assert torch.equal(pen[1], logits[1]), "row with only 3 <= window ids must not be penalised"
    probs = sampling_distribution(pen, temps, ks)
    for b in range(3):
        assert torch.allclose(probs[b], sampling_distribution(pen[b], temps[b], ks[b]))
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert (probs[0] > 0).sum() == 1 and (probs[1] > 0).sum() == 4 and (probs[2] > 0).sum() == 50
    ids = sample(pen, temps, ks, torch.Generator().manual_seed(0))
    assert ids.shape == (3,) and ids[0] == pen[0].argmax()
    assert probs[1, ids[1]] > 0


def test_penalty_counts_each_id_once_and_keeps_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, [[0, 0, 0, 1, 1]], 2.0, 4)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert torch.equal(apply_repetition_penalty(logits, [[0, 0, 0, 1, 1]], 1.0, 4), logits)


def test_default_params_and_validation():
    assert SamplingParams.text_default() == SamplingParams(0.0, 5, 1.0, 16)
    assert SamplingParams.audio_default() == SamplingParams(0.0, 5, 1.0, 64)
    with pytest.raises(ConfigError):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ConfigError):
        SamplingParams(repetition_penalty=0.0)
    with pytest.raises(ValueError):
        sample(torch.randn(2, 3, 4), 1.0, 0, None)
