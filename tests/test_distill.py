"""`kimia train distill`: speech paired with a teacher's text answer to its words (behaviour alignment).

A tiny random model folder is the teacher; the manifest is written by hand with the fields a `kimia data synth`
corpus writes. Each record's answer must be exactly what the teacher says, asked one by one, to the row's words
as text; the records must be what the lm recipe reads; a second run must add nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia.errors import ConfigError
from tests.tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("teacher") / "model")


@pytest.fixture(scope="module")
def teacher(teacher_folder):
    from kimia.api import KimiAudio

    return KimiAudio(teacher_folder, load_detokenizer=False, device="cpu")


def _corpus(root: Path) -> Path:
    (root / "audio").mkdir(parents=True)
    (root / "manifests").mkdir()
    t = np.arange(16000) / 16000.0
    sf.write(str(root / "audio" / "a.wav"), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    rows = [
        {"index": "asr-1", "split": "train", "audio_path": "../audio/a.wav", "audio_content": "what is two plus two"},
        {"index": "asr-2", "split": "train", "audio_path": "../audio/a.wav", "audio_content": "the cat sat down"},
        {"index": "qa-3", "split": "train", "audio_path": "../audio/a.wav", "audio_content": "count to three"},
        {"index": "asr-4", "split": "eval", "audio_path": "../audio/a.wav", "audio_content": "held out words"},
        {"index": "snd-5", "split": "train", "audio_path": "../audio/a.wav", "audio_content": ""},  # a sound: no words
        {"index": "dlg-6", "split": "train", "audio_path": ["../audio/a.wav"], "audio_content": "two turns"},
    ]
    man = root / "manifests" / "mixed_train.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return man


def test_distill_answers_each_rows_words_as_the_teacher_does_and_resumes(teacher, tmp_path):
    from kimia.train.data import read_manifests
    from kimia.train.distill import distill, distill_rows

    man = _corpus(tmp_path / "corpus")
    rows = distill_rows([man])
    assert [r["index"] for r in rows] == ["asr-1", "asr-2", "qa-3"]  # train rows with one audio file and words
    assert [r["index"] for r in distill_rows([man], split=None)] == ["asr-1", "asr-2", "qa-3", "asr-4"]
    out = tmp_path / "distill.jsonl"
    stats = distill(teacher, rows, out, batch=2, max_new_tokens=8)
    assert stats == {"written": 3, "skipped_done": 0, "empty": 0}
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == ["asr-1", "asr-2", "qa-3"]
    wav = str((tmp_path / "corpus" / "audio" / "a.wav").resolve())
    for rec, row in zip(recs, rows):
        user, answer = rec["conversation"]
        assert user == {"role": "user", "message_type": "audio", "content": wav}
        _, said = teacher.generate([{"role": "user", "message_type": "text", "content": row["audio_content"]}],
                                   output_type="text", max_new_tokens=8)
        assert answer == {"role": "assistant", "message_type": "text", "content": said.strip()} and said.strip()
        assert rec["task"] == "distill" and rec["task_type"] == "understanding"
    # what the lm recipe reads (data.manifests, ids computed from the audio): the audio turn becomes audio ids
    from kimia.train.data import AudioCache, ManifestLMDataset

    off = teacher.kimia_token_offset
    cache = AudioCache(token_offset=off, semantic=lambda w: teacher.parts.semantic_tokenizer.tokenize(w).reshape(-1))
    ex = ManifestLMDataset(read_manifests([out]), teacher.prompt_builder, audio=cache)[0]
    assert int((ex.audio_ids >= off).sum()) > 0
    before = out.read_text()
    assert distill(teacher, rows, out, batch=2, max_new_tokens=8) == {"written": 0, "skipped_done": 3, "empty": 0}
    assert out.read_text() == before


def test_distill_cli_and_errors(teacher, teacher_folder, tmp_path):
    from kimia.train.cli import main
    from kimia.train.distill import distill, distill_rows

    man = _corpus(tmp_path / "corpus")
    out = tmp_path / "d.jsonl"
    assert main(["distill", "--teacher", str(teacher_folder), "--manifests", str(man), "--out", str(out),
                 "--limit", "2", "--device", "cpu", "--max-new-tokens", "8"]) == 0
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == ["asr-1", "asr-2"]
    # --teacher-lm: another LM folder answers (the folder's Whisper / tokenizers stay)
    other = write_tiny_model(tmp_path / "other", seed=7, detokenizer=False)
    swapped = tmp_path / "swapped.jsonl"
    assert main(["distill", "--teacher", str(teacher_folder), "--teacher-lm", str(other / "lm"), "--manifests",
                 str(man), "--out", str(swapped), "--device", "cpu", "--max-new-tokens", "8"]) == 0
    from kimia.api import KimiAudio

    lm = KimiAudio(other, load_detokenizer=False, device="cpu")
    recs = [json.loads(x) for x in swapped.read_text().splitlines()]
    got = {r["index"]: r["conversation"][1]["content"] for r in recs}
    said = {r["index"]: lm.generate([{"role": "user", "message_type": "text", "content": r["audio_content"]}],
                                    output_type="text", max_new_tokens=8)[1].strip() for r in distill_rows([man])}
    assert got == {k: v for k, v in said.items() if v}  # an empty answer makes no record
    first = {json.loads(x)["index"]: json.loads(x)["conversation"][1]["content"] for x in out.read_text().splitlines()}
    assert any(got.get(k) != v for k, v in first.items())  # not the teacher folder's own LM
    with pytest.raises(ConfigError, match="no nope row"):
        distill_rows([man], split="nope")
    out.write_text("not json\n")
    with pytest.raises(ConfigError, match="not a distill record"):
        distill(teacher, distill_rows([man]), out)
    with pytest.raises(ConfigError, match="batch and max_new_tokens"):
        distill(teacher, distill_rows([man]), tmp_path / "x.jsonl", batch=0)
