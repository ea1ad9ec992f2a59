"""Builders of evaluation manifests from real speech that Debian ships (evaluation only, never training).

- `build_asterisk`: the Asterisk core prompts read by one professional speaker (Allison). Audio from
  `asterisk-core-sounds-en-g722` (`/usr/share/asterisk/sounds/en*/**.g722`, G.722 at 16 kHz, decoded
  with PyAV and written as 16-bit wav), transcripts from `asterisk-core-sounds-en`
  (`/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt[.gz]`, lines `name: transcript`). Entries
  whose transcript is only a bracketed description ("[beep tone]") are not speech and are left out; other
  bracketed notes are removed from the reference. Subset = the prompt's folder (`core`, `digits`, ...).
- `build_pocketsphinx`: `pocketsphinx-testdata` (`/usr/share/pocketsphinx/test/data`): every
  transcription file (`<s> words </s> (utterance-id)` lines) whose utterances have a `.wav` beside it
  (cards, librivox). Subset = the folder name. The wav files are referenced in place, not copied.

Both write `<out>/<name>.jsonl` in the official kit's layout, with the kit's English ASR question.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

from kimia.errors import AudioError, ConfigError
from kimia.eval.normalizers import normalize

logger = logging.getLogger(__name__)

__all__ = ["build_asterisk", "build_pocketsphinx", "read_asterisk_transcripts", "read_sphinx_transcription",
           "decode_g722", "BUILDERS", "ASR_QUESTION_EN"]

ASR_QUESTION_EN = "Please transcribe the spoken content into written text."
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds")
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en")
SPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")

_BRACKETS = re.compile(r"\[[^\]]*\]|\([^)]*\)")
_SPHINX_LINE = re.compile(r"^(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^()]+)\)\s*$")


def _open_text(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
            return fh.read()
    return path.read_text(encoding="utf-8", errors="replace")


def read_asterisk_transcripts(path: Path) -> dict[str, str]:
    """`name: transcript` lines -> {name: transcript}; `;` comments and blank lines ignored."""
    out: dict[str, str] = {}
    for line in _open_text(path).splitlines():
        line = line.strip()
        if not line or line.startswith(";") or ":" not in line:
            continue
        name, text = line.split(":", 1)
        name, text = name.strip(), text.strip()
        if name and " " not in name:
            out[name] = text
    return out


def decode_g722(path: Path):
    """Decode a raw G.722 file to int16 samples at 16 kHz (numpy [S]); raises AudioError."""
    try:
        import av
        import numpy as np
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("the asterisk builder needs PyAV (pip install av) to decode G.722") from exc
    try:
        with av.open(str(path), format="g722") as container:
            frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
    except Exception as exc:  # PyAV raises its own error classes for corrupt input
        raise AudioError(str(path), f"cannot decode G.722: {exc}") from exc
    if not frames:
        raise AudioError(str(path), "no audio in the G.722 file")
    return np.concatenate(frames).astype(np.int16)


def _find_transcripts(root: Path) -> Path:
    for name in ("core-sounds-en.txt", "core-sounds-en.txt.gz"):
        if (root / name).is_file():
            return root / name
    raise ConfigError(f"no core-sounds-en.txt[.gz] under {root} (apt-get install asterisk-core-sounds-en)")


def _find_sounds(root: Path) -> Path:
    """The folder that holds the .g722 prompts: root itself, or root/en, root/en_US_f_Allison, ..."""
    if any(root.glob("*.g722")):
        return root
    for cand in [root / "en", *sorted(root.glob("en*"))]:
        if cand.is_dir() and any(cand.glob("*.g722")):
            return cand
    raise ConfigError(f"no .g722 prompts under {root} (apt-get install asterisk-core-sounds-en-g722)")


def build_asterisk(out_dir: str | Path, *, sounds: str | Path = ASTERISK_SOUNDS,
                   transcripts: str | Path = ASTERISK_TRANSCRIPTS, name: str = "asterisk-en", min_words: int = 0) -> Path:
    """Decode the G.722 prompts to wav under `out_dir/audio/` and write `out_dir/<name>.jsonl`; with
    `min_words`, only prompts whose reference has at least that many words (after normalisation)."""
    import soundfile as sf
    out_dir = Path(out_dir)
    sounds_dir = _find_sounds(Path(sounds))
    tpath = Path(transcripts)
    texts = read_asterisk_transcripts(tpath if tpath.is_file() else _find_transcripts(tpath))
    rows, skipped = [], 0
    for key in sorted(texts):
        src = sounds_dir / f"{key}.g722"
        ref = re.sub(r"\s+", " ", _BRACKETS.sub(" ", texts[key])).strip()
        if not src.is_file() or not re.search(r"\w", ref):
            skipped += 1
            continue
        if min_words and len(normalize(ref, "en").split()) < min_words:
            continue
        try:
            pcm = decode_g722(src)
        except AudioError as exc:
            logger.warning("asterisk: %s", exc)
            skipped += 1
            continue
        rel = Path("audio") / f"{key}.wav"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(out_dir / rel, pcm, 16000, subtype="PCM_16")
        rows.append({"index": f"asterisk-{key}", "audio_path": rel.as_posix(), "question": ASR_QUESTION_EN,
                     "answer": ref, "subset": key.split("/")[0] if "/" in key else "core",
                     "meta": {"lang": "en", "source": "asterisk-core-sounds-en", "original": texts[key]}})
    if not rows:
        raise ConfigError(f"no asterisk prompt had both audio under {sounds_dir} and a speech transcript")
    logger.info("asterisk: %d prompts, %d left out (no audio or not speech)", len(rows), skipped)
    return _write(out_dir / f"{name}.jsonl", rows)


def read_sphinx_transcription(path: Path) -> list[tuple[str, str]]:
    """`<s> words </s> (utt-id)` lines -> [(utt-id, words)]; sentence markers and fillers dropped."""
    out = []
    for line in _open_text(path).splitlines():
        m = _SPHINX_LINE.match(line.strip())
        if not m:
            continue
        words = [w for w in m.group(1).split() if w not in ("<s>", "</s>", "<sil>") and not w.startswith("++")]
        if words:
            out.append((m.group(2).strip(), " ".join(words)))
    return out


def build_pocketsphinx(out_dir: str | Path, *, data: str | Path = SPHINX_DATA,
                       name: str = "pocketsphinx-en") -> Path:
    """Manifest of every transcribed utterance of the pocketsphinx test data that has a wav file."""
    data = Path(data)
    if not data.is_dir():
        raise ConfigError(f"{data} does not exist (apt-get install pocketsphinx-testdata)")
    rows = []
    files = sorted(p for p in data.rglob("*") if p.is_file() and (p.name == "transcription"
                                                                  or p.suffix in (".transcription", ".lsn")))
    for tfile in files:
        for utt, words in read_sphinx_transcription(tfile):
            wav = tfile.parent / f"{Path(utt).name}.wav"
            if not wav.is_file():
                continue
            rows.append({"index": f"sphinx-{tfile.parent.name}-{Path(utt).name}", "audio_path": str(wav.resolve()),
                         "question": ASR_QUESTION_EN, "answer": words, "subset": tfile.parent.name,
                         "meta": {"lang": "en", "source": "pocketsphinx-testdata"}})
    if not rows:
        raise ConfigError(f"no transcribed wav utterances under {data}")
    logger.info("pocketsphinx: %d utterances from %d transcription files", len(rows), len(files))
    return _write(Path(out_dir) / f"{name}.jsonl", rows)


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


BUILDERS = {"asterisk": build_asterisk, "pocketsphinx": build_pocketsphinx}
