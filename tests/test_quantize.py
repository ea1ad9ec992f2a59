"""Weight-only int8 LLM: rounding bound, fast CPU kernel == reference path, the swap, the model-folder setting."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kimia.errors import CheckpointError, ConfigError
from kimia.lm import AudioLM, AudioLMConfig
from kimia.quantize import Int8Linear, quantize_lm, quantize_rows
from tests.tiny_model import write_tiny_model


def test_rows_round_to_within_half_a_step():
    w = torch.randn(37, 53) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different scale
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (q.float() * s[:, None] - w).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-7)


@pytest.mark.parametrize("bias", [False, True])
def test_fast_kernel_equals_the_reference_path(bias):
    lin = nn.Linear(96, 200, bias=bias)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(3, 5, 96)
    ref = q.reference(x)
    # the reference is the dequantized matrix product
    want = x @ q.dequantized().T + (lin.bias if bias else 0)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    fast = q(x)
    assert fast.shape == ref.shape and fast.dtype == x.dtype
    # bfloat16 activations: about 3 significant digits
    rel = (fast - ref).norm() / ref.norm()
    assert rel < 1e-2, float(rel)
    q.fast = False
    assert torch.equal(q(x), ref)


def _tiny_lm() -> AudioLM:
    model = AudioLM(AudioLMConfig.from_name("tiny"))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def test_quantize_lm_swaps_decoder_and_head_linears_only():
    model = _tiny_lm()
    c = model.config
    emb = model.model.embed_tokens.weight.detach().clone()
    adaptor = model.model.vq_adaptor.layers[0]
    audio = torch.randint(c.kimia_token_offset, c.vocab_size, (2, 9))
    text = torch.randint(1, c.num_base_tokens, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        before = model(audio, text, pos)
    quantize_lm(model, "int8")
    swapped = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    per_layer = 7  # q, k, v, o, gate, up, down
    assert len(swapped) == per_layer * (c.num_hidden_layers + c.kimia_mimo_layers) + 2
    assert {"lm_head", "mimo_output"} <= swapped
    assert model.model.vq_adaptor.layers[0] is adaptor  # the adaptor stays exact
    assert torch.equal(model.model.embed_tokens.weight, emb)  # lookups stay exact (tied head copied, not moved)
    with torch.no_grad():
        after = model(audio, text, pos)
    for a, b in ((before.text_logits, after.text_logits), (before.audio_logits, after.audio_logits)):
        rel = (a - b).norm() / a.norm()
        assert rel < 0.05, float(rel)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_quantize_lm_rejects_unknown_modes():
    with pytest.raises(ConfigError, match="unknown quantization"):
        quantize_lm(_tiny_lm(), "int3")
    with pytest.raises(ConfigError, match="no linear layer"):
        quantize_lm(nn.Sequential(nn.Linear(2, 2)), "int8")
    assert quantize_lm(m := _tiny_lm(), None) is m


def test_model_folder_setting_applies_per_device(tmp_path):
    from kimia.model_folder import load_model_folder

    root = write_tiny_model(tmp_path / "m", detokenizer=False)
    plain = load_model_folder(root, load_detokenizer=False, device="cpu")
    assert plain.info["quantize"] is None and not any(isinstance(m, Int8Linear) for m in plain.lm.modules())
    doc = json.loads((root / "kimia.json").read_text())
    doc["quantize"] = {"cpu": "int8"}
    (root / "kimia.json").write_text(json.dumps(doc))
    auto = load_model_folder(root, load_detokenizer=False, device="cpu")
    assert auto.info["quantize"] == "int8" and isinstance(auto.lm.lm_head, Int8Linear)
    exact = load_model_folder(root, load_detokenizer=False, device="cpu", quantize="none")
    assert exact.info["quantize"] is None and isinstance(exact.lm.lm_head, nn.Linear)
    doc["quantize"] = {"cpu": 8}
    (root / "kimia.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="'quantize'"):
        load_model_folder(root, load_detokenizer=False, device="cpu")
