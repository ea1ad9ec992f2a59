"""Prompt builder against every case of the reference prompt fixtures; errors; batching by collate."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import soundfile as sf
import torch

from kimia.errors import PromptError
from kimia.prompt import PromptBatch, PromptBuilder, collate
from kimia.tokens import SpecialTokens, TextTokenizer
from tests.reference import assert_close, fixture_params, require

FEAT_DIM = 8


class DictTokenizer:
    """Tokenizer stand-in built from the fixture's stored text ids (text -> ids)."""

    def __init__(self, table: dict[str, list[int]], n_vocab: int):
        self.table, self.n_vocab, self.special_tokens = table, n_vocab, {}

    def encode(self, text: str) -> list[int]:
        return list(self.table[text])

    def decode(self, ids):  # pragma: no cover - unused by the builder
        raise NotImplementedError


class AudioStubs:
    """Stand-ins for the two audio encoders (not under test here): a waveform carries its audio name as a
    constant level; the tokenizer returns the fixture's semantic ids for that name and the extractor a
    [1, N, D] tensor filled with the name's index, so order and lengths of the features can be checked."""

    def __init__(self, semantic: dict[str, list[int]]):
        self.names = sorted(semantic)
        self.semantic = semantic
        self.calls: list[str] = []

    def wave(self, name: str, n: int = 3200) -> torch.Tensor:
        return torch.full((n,), 0.1 * (self.names.index(name) + 1))

    def name_of(self, wave: torch.Tensor) -> str:
        assert wave.dim() == 1 and wave.dtype == torch.float32
        return self.names[int(round(float(wave.median()) / 0.1)) - 1]

    def tokenize(self, wave: torch.Tensor) -> torch.Tensor:
        name = self.name_of(wave)
        self.calls.append(name)
        return torch.tensor([self.semantic[name]])

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        name = self.name_of(wave)
        return torch.full((1, len(self.semantic[name]), FEAT_DIM), float(self.names.index(name)))


def _load(fx):
    data = fx.json("prompt_cases.json")
    sp = SpecialTokens.from_official_dict(data["special_token_ids"], token_offset=data["kimia_token_offset"],
                                          audio_delay=data["kimia_text_audiodelaytokens"])
    assert data["cases"]
    return data, sp


def _tokenizers(fx, data, sp):
    table = {t: ids for c in data["cases"] for t, ids in c["text_token_ids"].items()}
    yield "stored-ids", DictTokenizer(table, sp.token_offset)
    yield "tiny-tiktoken", TextTokenizer.from_files(fx.path / "tiny_tiktoken.model", special_base=sp.bos)


def _with_audio(messages, make):
    out = copy.deepcopy(messages)
    for m in out:
        if m["message_type"] == "audio":
            m.update(make(m["content"]))
        elif m["message_type"] == "audio-text":
            name, text = m["content"]
            upd = make(name)
            m["content"] = [upd.pop("content", None), text]
            m.update(upd)
    return out


def _check_case(case, got: PromptBatch, stubs: AudioStubs | None, what: str, tol):
    for key, attr in (("audio_ids", "audio_ids"), ("text_ids", "text_ids"), ("is_continuous", "continuous_mask"),
                      ("audio_loss_mask", "audio_loss_mask"), ("text_loss_mask", "text_loss_mask")):
        actual = getattr(got, attr)
        if actual.dtype == torch.bool:
            actual = actual.long()
        assert_close(actual, torch.tensor(case[key], dtype=torch.long), tol, f"{what}: {key}")
    assert len(got.spans) == len(case["whisper_feature_lengths"])
    assert [n for _, n in got.spans] == case["whisper_feature_lengths"]
    if stubs is not None:
        assert [f.shape for f in got.features] == [(n, FEAT_DIM) for n in case["whisper_feature_lengths"]]
        assert [stubs.names[int(f[0, 0])] for f in got.features] == case["whisper_feature_sources"]
    for start, n in got.spans:
        assert bool(got.continuous_mask[start:start + n].all())
    assert int(got.continuous_mask.sum()) == sum(case["whisper_feature_lengths"])


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("prompt"))
def test_prompt_cases_with_audio_encoders(fx):
    fx = require(fx, "prompt")
    data, sp = _load(fx)
    tol = fx.tol("all_streams")
    for tname, tok in _tokenizers(fx, data, sp):
        stubs = AudioStubs(data["audio_semantic_ids"])
        builder = PromptBuilder(tok, sp, audio_tokenizer=stubs.tokenize, feature_extractor=stubs.features)
        for case in data["cases"]:
            msgs = _with_audio(case["messages"], lambda name: {"content": stubs.wave(name)})
            got = builder.build(msgs, output_type=case["output_type"], add_assistant_start=case["add_assistant_start_msg"])
            _check_case(case, got, stubs, f"{case['name']} [{tname}]", tol)


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("prompt"))
def test_prompt_cases_with_precomputed_audio_tokens(fx):
    """`audio_tokens` (already offset, as the finetune data stores them) instead of an audio tokenizer."""
    fx = require(fx, "prompt")
    data, sp = _load(fx)
    tok = next(_tokenizers(fx, data, sp))[1]
    builder = PromptBuilder(tok, sp)
    sem = data["audio_semantic_ids"]
    for case in data["cases"]:
        msgs = _with_audio(case["messages"], lambda name: {"content": None, "audio_tokens": [i + sp.token_offset for i in sem[name]]})
        got = builder.build(msgs, output_type=case["output_type"], add_assistant_start=case["add_assistant_start_msg"])
        _check_case(case, got, None, case["name"], fx.tol("all_streams"))
        assert got.features == []


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("prompt"))
def test_prompt_cases_from_files_and_resampled_arrays(fx, tmp_path):
    fx = require(fx, "prompt")
    data, sp = _load(fx)
    tok = next(_tokenizers(fx, data, sp))[1]
    stubs = AudioStubs(data["audio_semantic_ids"])
    builder = PromptBuilder(tok, sp, audio_tokenizer=stubs.tokenize, feature_extractor=stubs.features)
    paths = {}
    for name in stubs.names:
        paths[name] = tmp_path / f"{name}.wav"
        sf.write(str(paths[name]), stubs.wave(name).numpy(), 16000, subtype="FLOAT")
    for case in data["cases"]:
        got = builder.build(_with_audio(case["messages"], lambda n: {"content": str(paths[n])}), case["output_type"],
                            case["add_assistant_start_msg"])
        _check_case(case, got, stubs, f"{case['name']} [files]", fx.tol("all_streams"))
        # an 8 kHz numpy waveform given as (array, rate) is resampled to 16 kHz first
        got8 = builder.build(_with_audio(case["messages"], lambda n: {"content": (stubs.wave(n, 1600).numpy(), 8000)}),
                             case["output_type"], case["add_assistant_start_msg"])
        assert torch.equal(got8.audio_ids, got.audio_ids)


def _builder():
    sp = SpecialTokens.release()
    table = {"hi": [1, 2], "a long transcript": list(range(10, 30))}
    semantic = {"A": [5, 6, 7]}
    stubs = AudioStubs(semantic)
    return PromptBuilder(DictTokenizer(table, sp.token_offset), sp, audio_tokenizer=stubs.tokenize,
                         feature_extractor=stubs.features), stubs, sp


@pytest.mark.parametrize("messages, match", [
    ([], "empty message list"),
    ("hello", "list of message dicts"),
    ([{"role": "system", "message_type": "text", "content": "hi"}], "no system role"),
    ([{"role": "bot", "message_type": "text", "content": "hi"}], "unknown role 'bot'"),
    ([{"role": "user", "message_type": "image", "content": "x.png"}], "unknown message_type 'image'"),
    ([{"role": "user", "message_type": "text", "content": 42}], "text content must be a str"),
    ([{"role": "user", "message_type": "audio", "content": None}], "needs content"),
    ([{"role": "user", "message_type": "audio", "content": {"x": 1}}], "audio content must be"),
    ([{"role": "assistant", "message_type": "audio-text", "content": "just text"}], "audio-text content"),
    ([{"role": "user", "message_type": "audio", "content": "/nonexistent/a.wav"}], "audio file not found"),
    ([{"role": "user", "message_type": "audio", "audio_tokens": [5, 6]}], "semantic id \\+ offset"),
    (["not a dict"], "must be a dict"),
])
def test_prompt_errors(messages, match):
    builder, _, _ = _builder()
    with pytest.raises(PromptError, match=match):
        builder.build(messages)


def test_transcript_longer_than_audio_plus_delay_is_rejected():
    builder, stubs, sp = _builder()
    ok = [{"role": "assistant", "message_type": "audio-text", "content": [stubs.wave("A"), "hi"]}]
    assert len(builder.build(ok)) == 1 + sp.audio_delay + 3 + 1 + 1
    bad = [{"role": "assistant", "message_type": "audio-text", "content": [stubs.wave("A"), "a long transcript"]}]
    with pytest.raises(PromptError, match="transcript has 20 tokens .* at most 9"):
        builder.build(bad)


def test_other_build_errors():
    builder, stubs, sp = _builder()
    msg = {"role": "user", "message_type": "audio", "content": stubs.wave("A")}
    with pytest.raises(PromptError, match="output_type"):
        builder.build([msg], output_type="audio")
    with pytest.raises(PromptError, match="do not match the 3 audio tokens"):
        builder.build([dict(msg, features=torch.zeros(4, FEAT_DIM))])
    no_audio = PromptBuilder(builder.tokenizer, sp)
    with pytest.raises(PromptError, match="audio tokenizer"):
        no_audio.build([msg])
    with pytest.raises(PromptError, match="besides audio_tokens"):
        builder.build([{"role": "user", "message_type": "audio", "audio_tokens": [sp.token_offset + 1]}])


def test_assistant_audio_gets_audio_loss_and_features_follow_span_order():
    builder, stubs, sp = _builder()
    msgs = [{"role": "user", "message_type": "text", "content": "hi"},
            {"role": "assistant", "message_type": "audio", "content": stubs.wave("A")}]
    got = builder.build(msgs, output_type="both", add_assistant_start=False)
    a = got.audio_ids.tolist()
    mb = a.index(sp.media_begin)
    assert a[mb + 4] == sp.media_end and a[mb + 5] == sp.speech_ctd and a[-1] == sp.msg_end
    assert got.audio_loss_mask.nonzero().flatten().tolist() == [mb + 1, mb + 2, mb + 3, mb + 4]
    assert not got.text_loss_mask.any()
    assert got.spans == [(mb + 1, 3)]


def test_collate_pads_left_and_right():
    builder, stubs, sp = _builder()
    p1 = builder.build([{"role": "user", "message_type": "audio", "content": stubs.wave("A")}])
    p2 = builder.build([{"role": "user", "message_type": "text", "content": "hi"},
                        {"role": "user", "message_type": "audio", "content": stubs.wave("A")}])
    assert len(p2) == len(p1) + 2
    for side in ("left", "right"):
        c = collate([p1, p2], pad_id=sp.pad, side=side)
        L = len(p2)
        assert c.audio_ids.shape == (2, L) and c.lengths.tolist() == [len(p1), len(p2)]
        sl = slice(2, L) if side == "left" else slice(0, len(p1))
        pad = slice(0, 2) if side == "left" else slice(len(p1), L)
        assert torch.equal(c.audio_ids[0, sl], p1.audio_ids) and torch.equal(c.text_ids[0, sl], p1.text_ids)
        assert (c.audio_ids[0, pad] == sp.pad).all() and (c.text_ids[0, pad] == sp.pad).all()
        assert not c.attention_mask[0, pad].any() and c.attention_mask[0, sl].all() and c.attention_mask[1].all()
        assert c.positions[0, sl].tolist() == list(range(len(p1))) and c.positions[1].tolist() == list(range(L))
        assert torch.equal(c.continuous_mask[0, sl], p1.continuous_mask) and not c.continuous_mask[0, pad].any()
        assert torch.equal(c.continuous_mask[1], p2.continuous_mask)
        for (row, start, n), f in zip(c.spans, c.features):
            assert c.continuous_mask[row, start:start + n].all() and f.shape[0] == n
        assert [r for r, _, _ in c.spans] == [0, 1]
        if side == "left":
            assert c.spans[0][1] == p1.spans[0][0] + 2
            assert (c.audio_ids[:, -1] == sp.assistant_msg_start).all()
    with pytest.raises(PromptError):
        collate([], pad_id=sp.pad)
    with pytest.raises(PromptError):
        collate([p1], pad_id=sp.pad, side="middle")


def test_multichannel_array_is_mixed_down():
    builder, stubs, _ = _builder()
    w = stubs.wave("A").numpy()
    stereo = np.stack([w, w])  # [C, S]
    got = builder.build([{"role": "user", "message_type": "audio", "content": stereo, "sample_rate": 16000}])
    ref = builder.build([{"role": "user", "message_type": "audio", "content": torch.from_numpy(w)}])
    assert torch.equal(got.audio_ids, ref.audio_ids)
    assert torch.equal(got.features[0], ref.features[0])


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("llm"))
def test_llm_fixture_prompts_on_shrunk_vocabulary(fx):
    """The same builder on the tiny LLM's shrunk vocabulary (specials at 285.., audio at 706..), ids from the
    model folder's config and the fixture's rank file, reproduces the prompts the reference fed that model."""
    fx = require(fx, "llm")
    cases = fx.json("cases.json")
    sp = SpecialTokens.from_config(fx.path)
    tok = TextTokenizer.from_files(fx.path / "tiny_tiktoken.model", special_base=sp.bos)
    expected = fx.tensors("expected.safetensors")
    stubs = AudioStubs({"A": cases["audio_semantic_ids_A"]})
    builder = PromptBuilder(tok, sp, audio_tokenizer=stubs.tokenize)
    assert cases["prompts"]
    for name, p in cases["prompts"].items():
        msgs = _with_audio(p["messages"], lambda n: {"content": stubs.wave(n)})
        got = builder.build(msgs, output_type=p["output_type"])
        assert len(got) == p["prompt_length"]
        tol = fx.tol("streams")
        assert_close(got.audio_ids[None], expected[f"{name}.audio_input_ids"], tol, f"{name} audio stream")
        assert_close(got.text_ids[None], expected[f"{name}.text_input_ids"], tol, f"{name} text stream")
        assert_close(got.continuous_mask[None].to(torch.uint8), expected[f"{name}.is_continuous_mask"], tol, f"{name} mask")


class BatchedStubs:
    """The stubs behind list-taking encoders (like kimia's), counting calls and waveforms per call."""

    def __init__(self, stubs: AudioStubs):
        self.stubs, self.calls = stubs, {"tokenize": [], "features": []}

    def _call(self, name, fn, audio):
        items = audio if isinstance(audio, list) else [audio]
        self.calls[name].append(len(items))
        out = [fn(w) for w in items]
        return out if isinstance(audio, list) else out[0]

    def tokenize(self, audio):
        return self._call("tokenize", self.stubs.tokenize, audio)

    def features(self, audio):
        return self._call("features", self.stubs.features, audio)


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("prompt"))
def test_build_many_equals_one_by_one_with_one_call_per_encoder(fx):
    """Every fixture case (grouped by build options) built together == built alone, with one call of each
    encoder over all the waveforms; a bad conversation in the middle is returned as its error or raised."""
    fx = require(fx, "prompt")
    data, sp = _load(fx)
    tok = next(_tokenizers(fx, data, sp))[1]
    stubs = AudioStubs(data["audio_semantic_ids"])
    enc = BatchedStubs(stubs)
    single = PromptBuilder(tok, sp, audio_tokenizer=stubs.tokenize, feature_extractor=stubs.features)
    many = PromptBuilder(tok, sp, audio_tokenizer=enc.tokenize, feature_extractor=enc.features, batched_encoders=True)
    groups: dict[tuple, list] = {}
    for case in data["cases"]:
        groups.setdefault((case["output_type"], case["add_assistant_start_msg"]), []).append(case)
    bad = [{"role": "user", "message_type": "audio", "content": "/nonexistent/a.wav"}]
    for (output_type, start), cases in groups.items():
        convs = [_with_audio(c["messages"], lambda name: {"content": stubs.wave(name)}) for c in cases]
        n_audio = sum(m["message_type"] in ("audio", "audio-text") for c in convs for m in c)
        n_feat = sum(m["message_type"] == "audio" for c in convs for m in c)
        enc.calls = {"tokenize": [], "features": []}
        got = many.build_many(convs[:1] + [bad] + convs[1:], output_type, start, errors="return")
        assert enc.calls["tokenize"] == ([n_audio] if n_audio else [])
        assert enc.calls["features"] == ([n_feat] if n_feat else [])
        assert isinstance(got[1], PromptError) and "audio file not found" in str(got[1])
        del got[1]
        for case, conv, g in zip(cases, convs, got):
            ref = single.build(conv, output_type, start)
            _check_case(case, g, stubs, f"{case['name']} [build_many]", fx.tol("all_streams"))
            for f in ("audio_ids", "text_ids", "continuous_mask", "audio_loss_mask", "text_loss_mask"):
                assert torch.equal(getattr(g, f), getattr(ref, f)), (case["name"], f)
            assert g.spans == ref.spans and all(torch.equal(a, b) for a, b in zip(g.features, ref.features))
        with pytest.raises(PromptError, match="conversation 1: message 0: audio file not found"):
            many.build_many([convs[0], bad], output_type, start)


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("llm"))
def test_speech_targets_match_the_official_generation_layout(fx):
    """Training targets for spoken answers (`speech_targets=True`) lay the assistant turn out exactly as the
    official loop generated it in "both" mode: the fixture's per-step streams of every both-mode run with a
    text EOS, with the audio stop id written as msg_end and loss on what the model must produce."""
    fx = require(fx, "llm")
    cases = fx.json("cases.json")
    sp = SpecialTokens.from_config(fx.path / "model_eos" if (fx.path / "model_eos").is_dir() else fx.path)
    runs = [r for r in cases["generate_runs"].values()
            if r["kwargs"].get("output_type") == "both" and r.get("text_eos_step") is not None]
    assert runs, "no both-mode run with a text EOS in the fixture"
    for run in runs:
        step_t, step_a = list(run["step_text_tokens"]), list(run["step_audio_tokens"])
        assert step_a[-1] in sp.audio_end_ids
        # A random model samples text-range ids in the audio stream too; as a training target every audio
        # position must hold a semantic id, so those are mapped into the audio range (same positions).
        audio = [a if a >= sp.token_offset else sp.token_offset + k for k, a in enumerate(step_a[sp.audio_delay:-1])]
        transcript = step_t[:run["text_eos_step"]]
        tok = DictTokenizer({"T": transcript, "Q": [1, 2, 3]}, n_vocab=sp.token_offset)
        builder = PromptBuilder(tok, sp)
        msgs = [{"role": "user", "message_type": "text", "content": "Q"},
                {"role": "assistant", "message_type": "audio-text", "content": [None, "T"], "audio_tokens": audio}]
        got = builder.build(msgs, output_type="both", add_assistant_start=False, speech_targets=True)
        start = int((got.audio_ids == sp.assistant_msg_start).nonzero()[0, 0]) + 1
        exp_a = step_a[:sp.audio_delay] + audio + [sp.msg_end]
        assert got.audio_ids[start:].tolist() == exp_a
        assert got.text_ids[start:].tolist() == step_t
        n_text = run["text_eos_step"] + 1  # transcript + EOS
        assert got.text_loss_mask[start:].tolist() == [k < n_text for k in range(len(step_t))]
        assert got.audio_loss_mask[start:].tolist() == [k >= sp.audio_delay for k in range(len(step_a))]
        assert not got.text_loss_mask[:start].any() and not got.audio_loss_mask[:start].any()
        # As history (the default, the official inference layout) the same message has no EOS and no loss.
        hist = builder.build(msgs, output_type="both", add_assistant_start=False)
        assert sp.text_eos not in hist.text_ids.tolist()
        assert not hist.text_loss_mask.any() and not hist.audio_loss_mask.any()


def test_speech_target_transcript_must_fit_with_its_eos():
    sp = SpecialTokens.release()
    tok = DictTokenizer({"T": list(range(10, 17))}, n_vocab=sp.token_offset)
    msgs = [{"role": "assistant", "message_type": "audio-text", "content": [None, "T"],
             "audio_tokens": [sp.token_offset + 1]}]
    PromptBuilder(tok, sp).build(msgs, add_assistant_start=False)  # 7 tokens fit 1 + 6 as history
    with pytest.raises(PromptError, match="with its EOS"):
        PromptBuilder(tok, sp).build(msgs, add_assistant_start=False, speech_targets=True)
