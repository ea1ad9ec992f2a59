"""Model-folder loading and the KimiAudio API (official-compatible surface) on tiny random model folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kimia.errors import CheckpointError, ConfigError
from kimia.model_folder import load_model_folder, resolve_device, resolve_dtype, resolve_model_folder
from tests.reference import fixture_params, require
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
    from tests.reference import find_fixtures

    with pytest.raises(ConfigError, match="audio ids"):
        load_model_folder(official_folder, device="cpu", load_detokenizer=False,
                          semantic_tokenizer_path=find_fixtures("semantic_tokenizer")[0].path)


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


def test_whisper_padding_comes_from_the_manifest(tiny_folder, tmp_path):
    """kimia.json "whisper_padding" decides how the folder's features are made: the official 30 s padding
    unless the model was trained on clip-length features; an unknown mode is refused naming the field."""
    assert load_model_folder(tiny_folder, load_detokenizer=False).feature_extractor.padding == "segment"
    clip = tmp_path / "clip"
    shutil.copytree(tiny_folder, clip)
    doc = json.loads((tiny_folder / "kimia.json").read_text())
    (clip / "kimia.json").write_text(json.dumps({**doc, "whisper_padding": "clip"}))
    m = load_model_folder(clip, load_detokenizer=False)
    wave = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 0.1
    a = m.feature_extractor(wave)
    b = load_model_folder(tiny_folder, load_detokenizer=False).feature_extractor(wave)
    assert m.feature_extractor.padding == "clip" and a.shape == b.shape and not torch.allclose(a, b, atol=1e-4)
    (clip / "kimia.json").write_text(json.dumps({**doc, "whisper_padding": "30s"}))
    with pytest.raises(CheckpointError, match="whisper_padding"):
        resolve_model_folder(clip)


# ---------------------------------------------------------------------------------------------- KimiAudio
ASR = "Please transcribe the spoken content into written text."


@pytest.fixture(scope="module")
def model(tiny_folder):
    from kimia.detokenizer.stream import StreamConfig
    from kimia_infer.api.kimia import KimiAudio

    m = KimiAudio(model_path=str(tiny_folder), load_detokenizer=True, device="cpu")
    # small chunks so a short answer crosses several chunk boundaries (streaming bookkeeping); same rules
    m.detokenizer.config = StreamConfig(first_chunk_size=8, chunk_size=6, look_ahead_tokens=2)
    return m


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    import numpy as np

    from kimia.audio import save_audio

    g = np.random.default_rng(0)
    t = np.arange(12000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * g.standard_normal(t.size)
    return str(save_audio(tmp_path_factory.mktemp("clips") / "clip.wav", wave.astype("float32"), 16000))


def _asr(path):
    return [{"role": "user", "message_type": "text", "content": ASR}, {"role": "user", "message_type": "audio", "content": path}]


def test_official_import_path_generates_text(model, clip):
    from kimia.engine import GenerationConfig, reference_generate
    from kimia_infer.api.kimia import KimiAudio

    assert isinstance(model, KimiAudio)
    sampling_params = {"audio_temperature": 0.8, "audio_top_k": 10, "text_temperature": 0.0, "text_top_k": 5,
                       "audio_repetition_penalty": 1.0, "audio_repetition_window_size": 64,
                       "text_repetition_penalty": 1.1, "text_repetition_window_size": 16}
    wav, text = model.generate(_asr(clip), **sampling_params, output_type="text", max_new_tokens=12)
    assert wav is None and isinstance(text, str)
    # oracle: the cache-free reference loop on the same prompt
    prompt = model.prompt_builder.build(_asr(clip), output_type="text")
    cfg = GenerationConfig.from_official(output_type="text", max_new_tokens=12, text_repetition_penalty=1.1)
    ref = reference_generate(model.parts.lm, model.specials, prompt, cfg)
    assert text == model.tokenizer.decode(ref.text_ids)


def test_both_returns_24k_wav_of_token_length(model, clip):
    from kimia.api import StreamEnd

    wav, text = model.generate([{"role": "user", "message_type": "audio", "content": clip}], output_type="both",
                               max_new_tokens=24, seed=5)
    (end,) = [e for e in model.generate_stream([{"role": "user", "message_type": "audio", "content": clip}],
                                               output_type="both", max_new_tokens=24, seed=5) if isinstance(e, StreamEnd)]
    n = len(end.audio_ids)
    assert n > 0
    assert wav.dtype == torch.float32 and wav.dim() == 2 and wav.shape[0] == 1
    assert wav.shape[1] == n * 24000 * 4 // 50  # 12.5 Hz tokens -> 4 mel frames of 480 samples at 24 kHz
    assert torch.isfinite(wav).all()
    # the answer's codes detokenized again with its seed: the same waveform (the eval chain resynthesises codes
    # this way, with the same noise for every model); another seed draws other noise
    torch.manual_seed(123)  # not what a seeded call reads
    assert torch.equal(model.detokenize_audio(end.audio_ids, seed=5), wav)
    assert not torch.equal(model.detokenize_audio(end.audio_ids, seed=6), wav)


@pytest.mark.parametrize("output_type,sampling", [
    ("both", {}),
    ("both", {"audio_temperature": 0.8, "audio_top_k": 10, "text_temperature": 0.7, "text_top_k": 5}),
    ("text", {"text_temperature": 1.0, "text_top_k": 0}),
])
def test_stream_pieces_concatenate_to_generate(model, clip, output_type, sampling):
    from kimia.api import AudioPiece, StreamEnd, TextPiece

    msgs = [{"role": "user", "message_type": "audio", "content": clip}]
    wav, text = model.generate(msgs, output_type=output_type, max_new_tokens=26, seed=11, **sampling)
    events = list(model.generate_stream(msgs, output_type=output_type, max_new_tokens=26, seed=11, **sampling))
    assert isinstance(events[-1], StreamEnd) and sum(isinstance(e, StreamEnd) for e in events) == 1
    pieces = [e for e in events if isinstance(e, TextPiece)]
    assert "".join(p.delta for p in pieces) == text == events[-1].text
    assert all(p.text.endswith(p.delta) for p in pieces)
    audio = [e.pcm for e in events if isinstance(e, AudioPiece)]
    if output_type == "text":
        assert wav is None and not audio and events[-1].wav is None
    else:
        assert len(audio) >= 2  # several chunks really streamed
        assert all(e.sample_rate == 24000 for e in events if isinstance(e, AudioPiece))
        assert torch.equal(torch.cat(audio), wav[0])
        assert torch.equal(events[-1].wav, wav)


def test_same_seed_same_output(model, clip):
    kw = dict(output_type="both", max_new_tokens=20, audio_temperature=1.0, audio_top_k=0, text_temperature=1.0,
              text_top_k=0)
    msgs = [{"role": "user", "message_type": "audio", "content": clip}]
    w1, t1 = model.generate(msgs, seed=3, **kw)
    w2, t2 = model.generate(msgs, seed=3, **kw)
    w3, t3 = model.generate(msgs, seed=4, **kw)
    assert t1 == t2 and torch.equal(w1, w2)
    assert t1 != t3 or not torch.equal(w1, w3)


def test_batched_equals_singles_under_greedy(model, clip):
    convs = [
        _asr(clip),
        [{"role": "user", "message_type": "audio", "content": clip}],
        [{"role": "user", "message_type": "text", "content": "hello there"},
         {"role": "assistant", "message_type": "text", "content": "hi"},
         {"role": "user", "message_type": "audio", "content": clip}],
    ]
    for output_type in ("text", "both"):
        batched = model.generate_batch(convs, output_type=output_type, max_new_tokens=16, seed=2)
        singles = [model.generate(c, output_type=output_type, max_new_tokens=16, seed=2) for c in convs]
        for (wb, tb), (ws, ts) in zip(batched, singles):
            assert tb == ts
            assert (wb is None and ws is None) or torch.equal(wb, ws)


def test_bad_messages_raise_prompt_error(model, clip, tmp_path):
    from kimia.errors import PromptError

    bad = [
        [{"role": "system", "message_type": "text", "content": "be nice"}],
        [{"role": "user", "message_type": "video", "content": clip}],
        [{"role": "user", "message_type": "audio", "content": str(tmp_path / "missing.wav")}],
        [{"role": "user", "message_type": "text", "content": 42}],
        [],
        "just a string",
    ]
    for msgs in bad:
        with pytest.raises(PromptError):
            model.generate(msgs)
    with pytest.raises(PromptError, match="conversation 1"):
        model.generate_batch([_asr(clip), bad[0]])
    with pytest.raises(PromptError, match="speaker_prompt"):
        model.generate(_asr(clip), output_type="both", max_new_tokens=8, speaker_prompt="voice.wav")


def test_budgets(tiny_folder, model, clip):
    from kimia.api import Budgets, KimiAudio
    from kimia.errors import BudgetError

    with pytest.raises(BudgetError, match="max_new_tokens"):
        model.generate(_asr(clip), max_new_tokens=10_000)
    small = KimiAudio(tiny_folder, load_detokenizer=False, device="cpu",
                      budgets=Budgets(max_context_text=20, max_audio_seconds=0.5, max_batch=1))
    with pytest.raises(BudgetError, match="max_context_text"):
        small.generate([{"role": "user", "message_type": "text", "content": ASR}])
    with pytest.raises(BudgetError, match="max_audio_seconds"):
        small.generate([{"role": "user", "message_type": "audio", "content": clip}])
    with pytest.raises(BudgetError, match="max_batch"):
        small.generate_batch([_asr(clip), _asr(clip)])
    wav, _ = small.generate([{"role": "user", "message_type": "text", "content": "hi"}], output_type="both",
                            max_new_tokens=8)
    assert wav is None  # no detokenizer loaded
    with pytest.raises(ConfigError):
        Budgets(max_context_both=0)


# ---------------------------------------------------------------------------------------------- fixture parity
@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("llm"))
def test_official_fixture_runs_through_the_api(fx, tmp_path):
    """The reference generate() runs of the `llm` fixture, replayed through KimiAudio on an official-layout folder
    (precomputed audio tokens and Whisper features, as the fixture fed them)."""
    from kimia.api import KimiAudio, StreamEnd

    fx = require(fx, "llm")
    cases = fx.json("cases.json")
    feats = fx.tensors()["whisper_features_A"]
    off = cases["kimia_token_offset"]
    audio_A = {"role": "user", "message_type": "audio", "audio_tokens": [a + off for a in cases["audio_semantic_ids_A"]],
               "features": feats, "content": None}
    root = write_official_layout(tmp_path, llm_dir=fx.path)
    models: dict[str, KimiAudio] = {}
    for name, run in cases["generate_runs"].items():
        sub = run.get("model")
        if sub not in models:
            models[sub] = KimiAudio(root, device="cpu", **({"lm_path": fx.path / sub} if sub else {}))
        m = models[sub]
        msgs = [dict(audio_A) if msg["message_type"] == "audio" else msg for msg in cases["prompts"][run["prompt"]]["messages"]]
        kw = dict(run["kwargs"])
        text_ids = run.get("filtered_text_ids", [t for t in run["loop_text_tokens"] if t < off])
        (end,) = [e for e in m.generate_stream(msgs, seed=0, **kw) if isinstance(e, StreamEnd)]
        assert end.text == m.tokenizer.decode(text_ids), name
        wav, text = m.generate(msgs, seed=0, **kw)
        assert text == end.text, name
        if kw["output_type"] == "both":
            assert end.audio_ids == run["filtered_audio_ids"], name
            m.detokenizer.generator = torch.Generator().manual_seed(0)
            m.detokenizer.reset()
            assert torch.equal(wav, m.detokenize_audio(run["filtered_audio_ids"])), name
            assert wav.shape[1] == 1920 * len(run["filtered_audio_ids"])
        else:
            assert wav is None
