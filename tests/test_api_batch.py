"""KimiAudio's batched streaming (`generate_batch_stream`: per-row events, errors, cancellation), prompts of
many conversations built with one call per audio encoder, and the voice prompt from audio, on the tiny model
folder of test_api.py."""

from __future__ import annotations

import io

import pytest
import torch

from kimia.errors import PromptError
from tests.test_api import _asr, clip, model, tiny_folder  # noqa: F401 (fixtures)



# ---------------------------------------------------------------------------------------------- batched streaming
def _by_row(events):
    from kimia.api import AudioPiece, StreamEnd, TextPiece

    rows: dict[int, dict] = {}
    for e in events:
        r = rows.setdefault(e.row, {"text": "", "audio": [], "end": []})
        if isinstance(e, TextPiece):
            assert e.text == r["text"] + e.delta
            r["text"] = e.text
        elif isinstance(e, AudioPiece):
            r["audio"].append(e.pcm)
        elif isinstance(e, StreamEnd):
            r["end"].append(e)
    return rows


def test_batch_stream_rows_equal_single_answers(model, clip):
    """Per-row events of one batched decode (a bad conversation in the middle fails alone) == each
    conversation's own generate(); rows progress together (interleaved events)."""
    from kimia.api import AudioPiece, StreamEnd, StreamError, StreamStart, TextPiece

    convs = [_asr(clip), [{"role": "user", "message_type": "audio", "content": "/missing/x.wav"}],
             [{"role": "user", "message_type": "audio", "content": clip}],
             [{"role": "user", "message_type": "text", "content": "hello there"},
              {"role": "assistant", "message_type": "text", "content": "hi"},
              {"role": "user", "message_type": "audio", "content": clip}]]
    events = list(model.generate_batch_stream(convs, "both", seed=2, max_new_tokens=20, errors="yield"))
    kinds = [type(e) for e in events]
    assert kinds[:4].count(StreamStart) == 3 and kinds[:4].count(StreamError) == 1
    (err,) = [e for e in events if isinstance(e, StreamError)]
    assert err.row == 1 and "audio file not found" in str(err.error)
    rows = _by_row(events[4:])
    assert sorted(rows) == [0, 2, 3]
    for k in (0, 2, 3):
        wav, text = model.generate(convs[k], output_type="both", max_new_tokens=20, seed=2)
        (end,) = rows[k]["end"]
        assert end.text == rows[k]["text"] == text and end.steps == 20 and end.prompt_tokens > 0
        assert torch.equal(torch.cat(rows[k]["audio"])[None], wav) and torch.equal(end.wav, wav)
    first_end = next(i for i, e in enumerate(events) if isinstance(e, StreamEnd))
    assert {e.row for e in events[:first_end] if isinstance(e, (TextPiece, AudioPiece))} == {0, 2, 3}
    with pytest.raises(PromptError, match="conversation 1: message 0: audio file not found"):
        list(model.generate_batch_stream(convs, "text", max_new_tokens=4))


def test_batch_stream_cancel_stops_one_row_only(model, clip):
    from kimia.api import StreamEnd

    convs = [_asr(clip), [{"role": "user", "message_type": "audio", "content": clip}]]
    kw = dict(max_new_tokens=16, seed=9)  # greedy: the other row's ids do not depend on the batch's size
    base = {e.row: e for e in model.generate_batch_stream(convs, "text", **kw) if isinstance(e, StreamEnd)}
    asked = []

    def cancelled(r):  # the client of row 1 goes away after its 4th step
        asked.append(r)
        return r == 1 and asked.count(1) >= 4

    ends = {e.row: e for e in model.generate_batch_stream(convs, "text", cancelled=cancelled, **kw)
            if isinstance(e, StreamEnd)}
    assert base[1].steps > 4 and ends[1].stop_reason == "cancelled" and ends[1].steps == 4
    assert base[1].text.startswith(ends[1].text)
    assert ends[0].text == base[0].text and ends[0].steps == base[0].steps


def test_prompts_built_together_equal_one_by_one(model, tmp_path):
    """KimiAudio's builder on real (tiny) encoders: N conversations' audio go through ONE semantic-tokenizer
    call and ONE feature-extractor call, and the prompts equal building each conversation alone."""
    import numpy as np

    from kimia.audio import save_audio

    g = np.random.default_rng(3)
    clips = [str(save_audio(tmp_path / f"c{n}.wav", (0.2 * g.standard_normal(n)).astype("float32"), 16000))
             for n in (6400, 12000, 20480, 9000)]
    convs = [[{"role": "user", "message_type": "audio", "content": clips[0]}],
             [{"role": "user", "message_type": "text", "content": "hello"},
              {"role": "user", "message_type": "audio", "content": clips[1]},
              {"role": "assistant", "message_type": "audio-text", "content": [clips[2], "ok"]},
              {"role": "user", "message_type": "audio", "content": clips[3]}],
             [{"role": "user", "message_type": "audio", "content": clips[2]}]]
    b = model.prompt_builder
    calls = {"tok": [], "feat": []}
    real_tok, real_feat = b.audio_tokenizer, b.feature_extractor

    def tok(x):
        calls["tok"].append(len(x) if isinstance(x, list) else 1)
        return real_tok(x)

    def feat(x):
        calls["feat"].append(len(x) if isinstance(x, list) else 1)
        return real_feat(x)

    b.audio_tokenizer, b.feature_extractor = tok, feat
    try:
        many = b.build_many(convs, "both")
        assert calls == {"tok": [5], "feat": [4]}
        calls["tok"].clear(), calls["feat"].clear()
        singles = [b.build(c, "both") for c in convs]
        assert calls == {"tok": [1] * 5, "feat": [1] * 4}
    finally:
        b.audio_tokenizer, b.feature_extractor = real_tok, real_feat
    for m, s in zip(many, singles):
        for f in ("audio_ids", "text_ids", "continuous_mask"):
            assert torch.equal(getattr(m, f), getattr(s, f)), f
        assert m.spans == s.spans and len(m.features) == len(s.features)
        for x, y in zip(m.features, s.features):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- voice prompt
def test_speaker_prompt_from_audio(model, clip):
    """A reference voice from audio (24 kHz mel + semantic ids, 4 frames per token) prefills the
    detokenizer: the spoken answer changes, equals a manually prefilled detokenizer, and the next call without
    a prompt is back to the plain answer."""
    import soundfile as sf

    from kimia.audio import load_audio
    from kimia.detokenizer.mel import mel_frames
    from kimia.detokenizer.stream import StreamingDetokenizer

    msgs = [{"role": "user", "message_type": "audio", "content": clip}]
    kw = dict(output_type="both", max_new_tokens=20, seed=5)
    plain, text = model.generate(msgs, **kw)
    mel, ids = model.voice_prompt(clip)
    assert mel.shape[1] == 80 and mel.shape[0] == 4 * ids.shape[0] > 0
    assert torch.equal(ids, model.parts.semantic_tokenizer.tokenize(load_audio(clip))[0][: ids.shape[0]])
    assert torch.equal(mel, mel_frames(load_audio(clip, target_sr=24000))[: mel.shape[0]])
    with open(clip, "rb") as f:  # an open file is read once, not exhausted by the first of its two decodes
        from_stream = model.voice_prompt(io.BytesIO(f.read()))
    assert torch.equal(from_stream[0], mel) and torch.equal(from_stream[1], ids)
    voiced, vtext = model.generate(msgs, speaker_prompt=clip, **kw)
    assert vtext == text and voiced.shape == plain.shape and not torch.equal(voiced, plain)
    (end,) = [e for e in model.generate_stream(msgs, **kw) if e.__class__.__name__ == "StreamEnd"]
    d = model.detokenizer
    manual = StreamingDetokenizer(d.dit, d.vocoder, d.config, generator=torch.Generator().manual_seed(5))
    manual.prefill_voice(mel, ids)
    assert torch.equal(manual.detokenize(torch.tensor(end.audio_ids)).float()[None], voiced)
    wave, sr = sf.read(clip, dtype="float32")
    for prompt in ((wave, sr), (mel, ids)):
        assert torch.equal(model.generate(msgs, speaker_prompt=prompt, **kw)[0], voiced)
    assert torch.equal(model.generate(msgs, **kw)[0], plain)  # no prompt: unaffected by the earlier ones
    assert torch.equal(model.generate_batch([msgs, msgs], speaker_prompt=clip, **kw)[1][0], voiced)
    for bad, match in ((42, "speaker_prompt must be"), ((mel[:, :40], ids), "speaker_prompt \\(mel, ids\\)"),
                       ((wave[:600], sr), "too short for one semantic token")):
        with pytest.raises(PromptError, match=match):
            model.generate(msgs, speaker_prompt=bad, **kw)
