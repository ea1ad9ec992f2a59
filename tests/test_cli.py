"""The `kimia` command line: demo on a fresh install, transcribe/chat on a tiny model folder, clean errors."""

from __future__ import annotations

import io

import pytest
import soundfile as sf

from kimia.cli import main
from tests.tiny_model import write_tiny_model



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from kimia.audio import example_path, load_audio, save_audio

    wave = load_audio(example_path())[:16000]  # 1 s of the bundled question
    return save_audio(tmp_path_factory.mktemp("clips") / "q.wav", wave, 16000)


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("kimia: error: ")
    return lines[0]


def test_demo_answers_the_bundled_question_in_text_and_speech(tiny, tmp_path, capsys):
    from kimia.api import KimiAudio
    from kimia.audio import example_path

    out = tmp_path / "answer.wav"
    assert main(["demo", "--model", str(tiny), "--out", str(out), "--seed", "3", "--max-new-tokens", "24"]) == 0
    cap = capsys.readouterr()
    assert "demo_question.flac" in cap.err and "real-time factor" in cap.err
    wav, sr = sf.read(out)
    assert sr == 24000 and wav.size > 0
    model = KimiAudio(tiny, device="cpu")
    ref, text = model.generate([{"role": "user", "message_type": "audio", "content": str(example_path("demo_question.flac"))}],
                               output_type="both", seed=3, max_new_tokens=24)
    assert cap.out == f"answer: {text}\n"
    assert wav.size == ref.shape[-1]


def test_default_model_is_the_shipped_one_or_a_clear_error(monkeypatch, tmp_path):
    from kimia import api
    from kimia.errors import ConfigError

    monkeypatch.delenv(api.MODEL_ENV, raising=False)
    monkeypatch.setattr(api, "models_dir", lambda: tmp_path / "models")
    with pytest.raises(ConfigError, match="kimia-small"):
        api.resolve_model_path(None)
    (tmp_path / "models" / "kimia-small").mkdir(parents=True)
    (tmp_path / "models" / "kimia-small" / "kimia.json").write_text("{}")
    assert api.resolve_model_path(None) == tmp_path / "models" / "kimia-small"
    assert api.available_models() == ["kimia-small"]
    monkeypatch.setenv(api.MODEL_ENV, str(tmp_path))
    assert api.resolve_model_path(None) == tmp_path


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "transcribe" in out and "serve" in out


def test_transcribe_matches_the_api(tiny, clip, tmp_path, capsys):
    from kimia.api import ASR_INSTRUCTION, KimiAudio

    out_file = tmp_path / "t.txt"
    assert main(["transcribe", str(clip), "--model", str(tiny), "--max-new-tokens", "10", "--out", str(out_file)]) == 0
    printed = capsys.readouterr().out
    model = KimiAudio(tiny, load_detokenizer=False, device="cpu")
    _, text = model.generate([{"role": "user", "message_type": "text", "content": ASR_INSTRUCTION},
                              {"role": "user", "message_type": "audio", "content": str(clip)}], max_new_tokens=10)
    assert printed == text + "\n"
    assert out_file.read_text(encoding="utf-8") == text + "\n"


def test_transcribe_corrupt_file_is_one_line_exit_2(tiny, tmp_path, capsys):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    assert main(["transcribe", str(bad), "--model", str(tiny), "-q"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "broken.wav" in line
    assert main(["transcribe", str(tmp_path / "missing.flac"), "--model", str(tiny)]) == 2
    assert "missing.flac" in _one_line_error(capsys.readouterr().err)


def test_bad_model_folder_is_one_line_exit_2(clip, tmp_path, capsys):
    assert main(["transcribe", str(clip), "--model", str(tmp_path / "nope")]) == 2
    assert "model folder not found" in _one_line_error(capsys.readouterr().err)


def test_chat_one_turn_writes_24k_answer(tiny, clip, tmp_path, capsys):
    out = tmp_path / "answer.wav"
    rc = main(["chat", "--model", str(tiny), "--audio", str(clip), "--output-type", "both", "--out", str(out),
               "--max-new-tokens", "16", "--seed", "1"])
    assert rc == 0
    info = sf.info(str(out))
    assert info.samplerate == 24000 and info.frames > 0 and info.frames % 1920 == 0


def test_chat_interactive_loop(tiny, clip, monkeypatch, capsys):
    from kimia.api import KimiAudio

    seen = []
    original = KimiAudio.generate_stream

    def recording(self, messages, **kw):  # observe the history each turn sends (the real method runs)
        seen.append([dict(m) for m in messages])
        return original(self, messages, **kw)

    monkeypatch.setattr(KimiAudio, "generate_stream", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"hello\n{clip}\n\nnever read\n"))
    assert main(["chat", "--model", str(tiny), "--max-new-tokens", "6"]) == 0
    assert "error" not in capsys.readouterr().err
    assert len(seen) == 2  # the empty line ended the loop
    assert [m["message_type"] for m in seen[1]] == ["text", "text", "audio"]  # user, assistant answer, user audio
    assert seen[1][1]["role"] == "assistant" and seen[1][2]["content"] == str(clip)
