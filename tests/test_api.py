"""Model-folder loading and the KimiAudio API (official-compatible surface) on tiny random model folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kimia.errors import CheckpointError, ConfigError
from kimia.model_folder import load_model_folder, resolve_device, resolve_dtype, resolve_model_folder
from tests.tiny_model import write_glm_tokenizer, write_official_layout, write_tiny_model


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def official_folder(tmp_path_factory):
    return write_official_layout(tmp_path_factory.mktemp("official"))


# ---------------------------------------------------------------------------------------------- folder loading
def test_device_and_dtype_resolution():
    dev = resolve_device()
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert dev.type == expected
    assert resolve_dtype(torch.device("cpu")) == torch.float32
    assert resolve_dtype(torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype(dev, "float13")


def test_native_folder_loads_every_component(tiny_folder):
    m = load_model_folder(tiny_folder, device="cpu")
    assert m.paths.layout == "native"
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    assert m.lm.model.embed_tokens.weight.dtype == torch.float32
    assert m.specials.token_offset == m.lm_config.kimia_token_offset == m.tokenizer.n_vocab
    assert 4 * m.feature_extractor.encoder.cfg.d_model == m.lm_config.kimia_adaptor_input_dim
    assert m.detokenizer is not None
    # the semantic tokenizer's ids land inside the LLM's audio range
    ids = m.semantic_tokenizer(torch.randn(16000) * 0.1)
    assert ids.max() < m.lm_config.vocab_size - m.lm_config.kimia_token_offset


def test_official_layout_from_reference_fixtures(official_folder):
    m = load_model_folder(official_folder, device="cpu")
    assert m.paths.layout == "official"
    assert m.paths.semantic_tokenizer.name == "glm-4-voice-tokenizer"  # found beside the folder
    assert m.lm_config.vocab_size == 1730 and m.specials.media_begin == m.lm_config.kimia_media_begin
    assert m.paths.whisper.name == "whisper-large-v3" and m.paths.detokenizer.name == "audio_detokenizer"


def test_official_layout_semantic_tokenizer_given_explicitly(official_folder, tmp_path):
    glm = write_glm_tokenizer(tmp_path / "elsewhere", seed=7)
    p = resolve_model_folder(official_folder, semantic_tokenizer_path=glm)
    assert p.semantic_tokenizer == glm


def test_official_layout_without_semantic_tokenizer_names_the_paths(official_folder, tmp_path):
    lonely = tmp_path / "Kimi-Audio"
    shutil.copytree(official_folder, lonely, symlinks=True)
    with pytest.raises(CheckpointError, match="glm-4-voice-tokenizer") as e:
        resolve_model_folder(lonely)
    assert str(lonely / "glm-4-voice-tokenizer") in str(e.value)


def test_fixture_semantic_tokenizer_too_large_for_llm(official_folder):
    from tests.reference import fixture_root

    with pytest.raises(ConfigError, match="audio ids"):
        load_model_folder(official_folder, device="cpu", load_detokenizer=False,
                          semantic_tokenizer_path=fixture_root() / "semantic_tokenizer")


def test_missing_component_is_named(tiny_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / "whisper")
    with pytest.raises(CheckpointError, match=r"Whisper encoder not found at .*whisper"):
        load_model_folder(broken)
    shutil.rmtree(broken / "vocoder")
    with pytest.raises(CheckpointError, match="vocoder not found"):
        resolve_model_folder(broken, whisper_path=tiny_folder / "whisper")
    # without the detokenizer the vocoder is not needed
    resolve_model_folder(broken, whisper_path=tiny_folder / "whisper", load_detokenizer=False)
    with pytest.raises(CheckpointError, match="model folder not found"):
        resolve_model_folder(tmp_path / "nowhere")


def test_corrupt_manifest_and_weights(tiny_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    (bad / "kimia.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="kimia.json"):
        resolve_model_folder(bad)
    shutil.copyfile(tiny_folder / "kimia.json", bad / "kimia.json")
    (bad / "whisper" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model_folder(bad, load_detokenizer=False)
    doc = json.loads((tiny_folder / "kimia.json").read_text())
    del doc["components"]["lm"]
    (bad / "kimia.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="lm"):
        resolve_model_folder(bad)
