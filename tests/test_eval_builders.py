"""Real-speech manifest builders on small hand-made trees with the Debian packages' layouts.

The asterisk tree holds real G.722 files (encoded here with PyAV) and a gzipped `core-sounds-en.txt`;
the pocketsphinx tree holds `<s> ... </s> (id)` transcription files with wavs beside some of them.
"""

import gzip
import json

import numpy as np
import pytest
import soundfile as sf

from kimia.errors import AudioError, ConfigError
from kimia.eval.builders import (build_asterisk, build_pocketsphinx, decode_g722, read_asterisk_transcripts,
                                 read_sphinx_transcription)
from kimia.eval.datasets import load_manifest


def _g722(path, seconds, freq=440.0):
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    x = (np.sin(2 * np.pi * freq * t) * 8000).astype(np.int16)
    with av.open(str(path), "w", format="g722") as c:
        s = c.add_stream("g722", rate=16000, layout="mono")
        for i in range(0, len(x), 1024):
            fr = av.AudioFrame.from_ndarray(x[None, i:i + 1024].copy(), format="s16", layout="mono")
            fr.sample_rate = 16000
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return x


TRANSCRIPTS = """; Core Asterisk Sounds in English

activated: Activated.
beep: [this is a simple beep tone]
agent-pass: Please enter your password followed by the pound key.
conf-x: Press 1 [pause] to mute.
no-audio-here: This prompt has no file.
digits/7: seven
"""


def test_asterisk_builder(tmp_path):
    sounds = tmp_path / "sounds" / "en_US_f_Allison"
    x = _g722(sounds / "activated.g722", 0.5)
    _g722(sounds / "beep.g722", 0.3)
    _g722(sounds / "agent-pass.g722", 1.0)
    _g722(sounds / "conf-x.g722", 0.4)
    _g722(sounds / "digits" / "7.g722", 0.2)
    docs = tmp_path / "doc"
    docs.mkdir()
    with gzip.open(docs / "core-sounds-en.txt.gz", "wt") as fh:
        fh.write(TRANSCRIPTS)
    out = build_asterisk(tmp_path / "out", sounds=tmp_path / "sounds", transcripts=docs)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by = {r["index"]: r for r in rows}
    # beep is not speech; no-audio-here has no file
    assert sorted(by) == ["asterisk-activated", "asterisk-agent-pass", "asterisk-conf-x", "asterisk-digits/7"]
    assert by["asterisk-conf-x"]["answer"] == "Press 1 to mute."
    assert by["asterisk-digits/7"]["subset"] == "digits" and by["asterisk-activated"]["subset"] == "core"
    assert by["asterisk-activated"]["question"] == "Please transcribe the spoken content into written text."
    wav, sr = sf.read(tmp_path / "out" / by["asterisk-activated"]["audio_path"], dtype="int16")
    assert sr == 16000 and len(wav) == len(x)
    # G.722 is lossy and delays the signal: compare spectra, the tone must dominate at 440 Hz
    spec = np.abs(np.fft.rfft(wav.astype(np.float64)))
    assert abs(np.argmax(spec) * 16000 / len(wav) - 440.0) < 5.0
    man = load_manifest(out)
    assert len(man.items) == 4 and man.bad == []


def test_asterisk_transcripts_and_errors(tmp_path):
    (tmp_path / "t.txt").write_text(TRANSCRIPTS)
    t = read_asterisk_transcripts(tmp_path / "t.txt")
    assert t["digits/7"] == "seven" and t["activated"] == "Activated." and len(t) == 6
    with pytest.raises(ConfigError, match="g722"):
        build_asterisk(tmp_path / "o", sounds=tmp_path / "empty", transcripts=tmp_path / "t.txt")
    (tmp_path / "bad.g722").write_bytes(b"")
    with pytest.raises(AudioError):
        decode_g722(tmp_path / "bad.g722")


def test_pocketsphinx_builder(tmp_path):
    data = tmp_path / "data"
    (data / "cards").mkdir(parents=True)
    (data / "librivox").mkdir()
    (data / "tidigits").mkdir()
    for name in ("001", "002"):
        sf.write(data / "cards" / f"{name}.wav", np.zeros(8000, np.int16), 16000)
    sf.write(data / "librivox" / "book-0870.wav", np.zeros(16000, np.int16), 16000)
    (data / "cards" / "cards.transcription").write_text(
        "<s> ten of clubs  </s> (001)\n<s> four queen of clubs  </s> (002)\n<s> no wav </s> (003)\n")
    (data / "librivox" / "transcription").write_text("<s> he was not an ill disposed young man </s> (book-0870)\n")
    (data / "tidigits" / "tidigits.lsn").write_text("one one one (man.ah.111a)\n")  # features only, no wav
    out = build_pocketsphinx(tmp_path / "out", data=data)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["subset"], r["answer"]) for r in rows] == [
        ("cards", "ten of clubs"), ("cards", "four queen of clubs"),
        ("librivox", "he was not an ill disposed young man")]
    man = load_manifest(out)
    assert len(man.items) == 3 and man.bad == []
    assert read_sphinx_transcription(data / "tidigits" / "tidigits.lsn") == [("man.ah.111a", "one one one")]
    with pytest.raises(ConfigError):
        build_pocketsphinx(tmp_path / "o", data=tmp_path / "missing")
