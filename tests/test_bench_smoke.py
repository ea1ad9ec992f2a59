"""Smoke tests of the bench scripts: each `main(["--quick"])` runs on the tiny configs only (1 thread, 1 rep,
no warm-up, no idle wait) and prints its side-by-side table. No timing is asserted; the tests prove the
scripts run and that the configs they time are the reference's (parameter counts against REFERENCE_PERF.md).
"""

from __future__ import annotations

import re

import pytest
import torch

from bench import common, decode, detokenizer, encoders


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _table_rows(out: str, title: str) -> list[str]:
    assert title in out, out
    block = out.split(title, 1)[1].split("\n== ", 1)[0]
    return [line for line in block.splitlines() if line.startswith("(") and re.search(r"\d \[\d", line)]


def test_decode_quick(capsys):
    decode.main(["--quick"])
    out = capsys.readouterr().out
    rows = _table_rows(out, "REFERENCE_PERF §1")
    assert [r for r in rows if "decode steps/s" in r and "505.7" in r], out
    assert re.search(r"params 575,744 \(reference 575,744\), prompt 60 positions", out), out
    assert "tiny    1 ratio" in out and "probe after:" in out


def test_detokenizer_quick(capsys):
    detokenizer.main(["--quick"])
    out = capsys.readouterr().out
    rows = _table_rows(out, "REFERENCE_PERF §2")
    assert len([r for r in rows if r.startswith("(a) fixture 10 steps")]) == 9, out
    assert "params DiT 221,264 (ref 221,264)" in out, out
    assert "DiT calls 19 " in out, out  # 45 tokens at 10 steps: (9 Euler + 1 cache fill) + 9 Euler (final)
    assert "probe after:" in out


def test_encoders_quick(capsys):
    encoders.main(["--quick"])
    out = capsys.readouterr().out
    rows = _table_rows(out, "REFERENCE_PERF §3")
    assert any(r.startswith("(a) whisper-tiny") and "RTF" in r for r in rows), out
    assert any(r.startswith("(b) semantic-tiny") and "encoder+pool+VQ" in r for r in rows), out
    assert "output [1, 375, 256]" in out and "output [1, 375]" in out, out  # 30 s -> 375 tokens
    assert "extra encoder rows" in out


def test_reference_configs_match_reference_parameter_counts():
    """The ~100M LLM, ~50M DiT and base-shaped encoders are exactly the reference's sizes."""
    from kimia.detokenizer import DiT, DiTConfig
    from kimia.encoders.semantic import SemanticEncoder, SemanticTokenizerConfig
    from kimia.encoders.whisper import WhisperEncoder, WhisperEncoderConfig
    from kimia.lm import AudioLM, AudioLMConfig

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        lm = AudioLM(AudioLMConfig.from_name("tiny", **decode.CONFIGS["100m"]))
        dit = DiT(DiTConfig(**detokenizer.DIT_50M))
        whisper = WhisperEncoder(WhisperEncoderConfig(**encoders.WHISPER_BASE128))
        semantic = SemanticEncoder(SemanticTokenizerConfig(**encoders.SEMANTIC_BASE))
    assert count(lm) == decode.REFERENCE_S1["100m"]["params"]
    assert count(dit) == detokenizer.REFERENCE_PARAMS["50m"][0]
    assert count(whisper) == encoders.REFERENCE_S3["whisper-base128"]["params"]
    # the reference also counts the post-pooling position table (375 x 512) that the encoder never reads
    assert count(semantic) + 375 * 512 == encoders.REFERENCE_S3["semantic-base"]["params"]


def test_stats_and_speedup():
    s = common.Stats.of([2.0, 1.0, 4.0])
    assert (s.median, s.lo, s.hi) == (2.0, 1.0, 4.0)
    inv = s.inverse(8.0)
    assert (inv.median, inv.lo, inv.hi) == (4.0, 2.0, 8.0)
    assert common.Metric("t", s, reference=4.0).speedup() == 2.0  # half the reference time: 2x faster
    assert common.Metric("r", s, reference=4.0, higher_is_better=True).speedup() == 0.5
    assert common.Metric("t", s, reference=None).speedup() is None
    gate = common.Gate(timeout=0)
    runs = common.repeat(lambda: {"x": 1.0}, 2, gate, warmup=False)
    assert len(runs) == 2 and all(r.contended for r in runs)  # no idle gate: counted as contended
    assert common.Stats.metric(runs, "x").clean is None
    runs.append(common.Run(wall=1.0, metrics={"x": 3.0}, other_cpu=0.0, idle_start=True))
    st = common.Stats.metric(runs, "x")
    assert (st.median, st.clean.median, st.clean.n) == (1.0, 3.0, 1)
    assert st.inverse(6.0).clean.median == 2.0 and st.scaled(2.0).clean.median == 6.0


def test_shipped_quick_on_a_tiny_model_folder(tmp_path, capsys):
    from bench import shipped
    from tests.tiny_model import write_tiny_model

    folder = write_tiny_model(tmp_path / "tiny")
    shipped.main(["--quick", "--model", str(folder), "--max-new-tokens", "16", "--quantize", "none", "int8"])
    out = capsys.readouterr().out
    for name in ("first_audio", "reply", "rtf", "steps/s (both)", "steps/s (text)", "peak memory", "none (exact)",
                 "int8 (int8)", "int8 (int8) vs none (exact)"):
        assert name in out, out
