"""`kimia eval --chain`: the speech chain of a model folder measured link by link on a corpus' reference answers.

A real espeak-ng corpus (spoken_qa + speak, no judge at build time) and a tiny random model folder; the real
Whisper base judge hears every link. The recording itself must be heard well, the random DiT's resynthesis
not; the teacher-forced prompt must be exactly the one the LM training dataset builds from the corpus'
finetune conversation of the same answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kimia.data import cli as data_cli
from kimia.errors import ConfigError
from tests.tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chain") / "corpus"
    assert data_cli.main(["synth", "--out", str(out), "--hours", "0.004", "--seed", "3", "--jobs", "1",
                          "--engines", "espeak", "--tasks", "spoken_qa", "speak", "--output-voice", "espeak:en-us+m3",
                          "--eval-fraction", "0", "--no-judge", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from kimia.api import KimiAudio

    return KimiAudio(write_tiny_model(tmp_path_factory.mktemp("tiny") / "model"), device="cpu")


def test_links_are_heard_separately_and_the_lm_is_teacher_forced(corpus, model):
    from kimia.eval.chain import chain_rows, format_chain, measure_chain

    manifests = [corpus / "manifests" / "spoken_qa_train.jsonl", corpus / "manifests" / "speak_train.jsonl"]
    rows = chain_rows(manifests)
    assert {r["index"].split("-")[0] for r in rows} == {"spoken_qa", "speak"}
    rows = [next(r for r in rows if r["audio"]), next(r for r in rows if not r["audio"])]  # one of each
    transcripts: list[dict] = []
    res = measure_chain(model, rows, transcripts=transcripts)
    assert res["rows"] == 2 and len(transcripts) == 2
    assert res["original"]["words"] == sum(len(r["text"].split()) for r in rows)
    assert res["original"]["wer"] <= 35.0  # Whisper base hears espeak-ng's recording
    assert res["dit"]["wer"] >= 80.0  # but not a random DiT's resynthesis of its codes
    lm = res["lm"]
    assert lm["rows"] == 2 and lm["codes"] > 0 and 0.0 <= lm["accuracy"] <= 100.0
    assert lm["cross_entropy"] > 0 and lm["perplexity"] == pytest.approx(2.718281828 ** lm["cross_entropy"], rel=1e-2)
    assert all(set(t) >= {"original", "vocoder", "dit", "lm_accuracy", "lm_free_edit_rate"} for t in transcripts)
    assert res["lm_free"]["asked"] == 2  # a random model does not say the reference text
    assert res["lm_free"]["rows"] == 0 and res["lm_free"]["edit_rate"] is None
    table = format_chain(res, "tiny")
    assert "original" in table and "teacher-forced, 2 answers" in table and "none of 2 answers" in table


def test_teacher_forced_prompt_is_the_training_prompt(corpus, model):
    """The chain's prompt for an answer equals the one the LM training dataset builds from the finetune
    conversation of the same item (spoken question or text to read)."""
    from kimia.data.manifest import read_conversations
    from kimia.eval import chain
    from kimia.train.data import ManifestLMDataset

    rows = chain.chain_rows([corpus / "manifests" / "spoken_qa_train.jsonl", corpus / "manifests" / "speak_train.jsonl"])
    convs = [c for c in read_conversations(corpus / "finetune" / "train.jsonl") if c["task"] in ("spoken_qa", "speak")]
    by_target = {c["conversation"][-1]["content"][0]: c for c in convs}
    seen = []
    real_build = model.prompt_builder.build

    def spy(msgs, **kw):
        pb = real_build(msgs, **kw)
        seen.append(pb)
        return pb

    model.prompt_builder.build = spy
    try:
        for row in (next(r for r in rows if r["audio"]), next(r for r in rows if not r["audio"])):
            assert chain.teacher_forced(model, row) is not None
            ds = ManifestLMDataset([by_target[row["target"]]], model.prompt_builder)
            want = ds[0]
            got = seen[-2]  # the chain's build (the dataset's own build came after it)
            assert torch.equal(got.audio_ids, want.audio_ids) and torch.equal(got.text_ids, want.text_ids)
            assert torch.equal(got.audio_loss_mask, want.audio_loss_mask)
    finally:
        model.prompt_builder.build = real_build


def _levenshtein(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def test_free_running_compares_codes_where_the_text_is_the_reference(corpus, model):
    """The model's own greedy answer: with its text as the reference and its codes as the recording's, the
    edit distance is 0; codes substituted and dropped cost their Levenshtein distance; another text, or a row
    with history, is not compared."""
    from kimia.api import StreamEnd
    from kimia.eval.chain import _question, chain_rows, format_chain, free_running

    row = next(r for r in chain_rows([corpus / "manifests" / "spoken_qa_train.jsonl"]) if r["audio"])
    steps = 40
    probe = [e for e in model.generate_stream(_question(row), output_type="both", max_new_tokens=steps, seed=0)
             if isinstance(e, StreamEnd)][0]
    ref = [int(c) for c in probe.audio_ids]
    assert len(ref) >= 8 and probe.text.strip()
    own = {**row, "text": probe.text}
    assert free_running(model, own, ref, max_new_tokens=steps) == (0, len(ref))
    bad = [c + 1 if i in (1, 3, 5) else c for i, c in enumerate(ref)][:-1]
    assert free_running(model, own, bad, max_new_tokens=steps) == (_levenshtein(bad, ref), len(bad))
    assert _levenshtein(bad, ref) > 0
    assert free_running(model, {**row, "text": probe.text + " and more words"}, ref, max_new_tokens=steps) is None
    assert free_running(model, {**own, "history": [{"role": "user"}]}, ref, max_new_tokens=steps) is None
    heard = {"wer": 0.0, "errors": 0, "words": 1, "keys_heard": None}
    res = {"rows": 1, "original": heard, "vocoder": heard, "dit": heard, "lm": {"rows": 0, "codes": 0},
           "lm_free": {"asked": 1, "rows": 1, "codes": len(bad), "edit_rate": 12.5}}
    assert "1 of 1 answers say the reference text" in format_chain(res)


def test_cli_writes_the_chain_and_refuses_manifests_without_answers(corpus, tmp_path, capsys):
    from kimia.eval.cli import main

    folder = write_tiny_model(tmp_path / "model")
    out = tmp_path / "chain"
    assert main(["--chain", str(corpus / "manifests" / "speak_train.jsonl"), "--model", str(folder), "--limit", "1",
                 "--quantize", "none", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "speech chain" in printed and "(1 answers)" in printed
    res = json.loads((out / "chain.json").read_text())
    assert res["rows"] == 1 and (out / "transcripts.jsonl").read_text().count("\n") == 1

    no_answers = tmp_path / "asr.jsonl"
    no_answers.write_text(json.dumps({"index": "a", "audio_path": "x.wav", "answer": "hi"}) + "\n")
    assert main(["--chain", str(no_answers), "--model", str(folder)]) == 2
    assert "no row with target_audio_path" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    assert main(["--chain", str(broken), "--model", str(folder)]) == 2
    assert "malformed" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="does not exist"):
        from kimia.eval.chain import chain_rows

        chain_rows([tmp_path / "missing.jsonl"])


def test_two_chains_are_compared_answer_by_answer(tmp_path):
    """compare_chains pairs the answers both runs measured (by index): per heard link the answers said with
    fewer / more errors, per LM figure the better / worse rows, each with its sign test."""
    from kimia.eval.chain import compare_chains, write_chain
    from kimia.eval.report import sign_test

    def run(name, dit, acc):
        rows = [{"index": str(i), "text": "the cat sat on the mat", "original": "the cat sat on the mat",
                 "vocoder": "the cat sat on the mat", "dit": h, "lm_accuracy": a, "lm_free_edit_rate": None}
                for i, (h, a) in enumerate(zip(dit, acc))]
        link = {"wer": 0.0, "errors": 0, "words": 6 * len(rows), "keys_heard": None}
        result = {"rows": len(rows), "original": link, "vocoder": link, "dit": {**link, "wer": 50.0},
                  "lm": {"accuracy": 50.0}, "lm_free": {"rows": 0, "edit_rate": None}}
        return write_chain(result, rows, tmp_path / name).parent

    base = run("base", ["the cat", "the cat sat", "the cat sat on the mat", "a dog"], [0.5, 0.5, 0.5, 0.5])
    new = run("new", ["the cat sat on the mat", "the cat sat on the", "the cat", "a dog"], [0.6, 0.4, 0.7, 0.5])
    md = compare_chains(base, new)
    assert "on the 4 answers both chains measured" in md
    assert f"| dit errors | 4 | 2 | 1 | 1 | {sign_test(2, 1):.3g} |" in md  # 4 -> 0 and 3 -> 1 better, 0 -> 4 worse
    assert f"| original errors | 4 | 0 | 0 | 4 | {sign_test(0, 0):.3g} |" in md
    assert f"| lm code accuracy | 4 | 2 | 1 | 1 | {sign_test(2, 1):.3g} |" in md  # higher accuracy is better
    assert "lm free edit rate" not in md  # no row measured it
    assert "| dit WER | 50.0 | 50.0 |" in md
    with pytest.raises(ConfigError, match="not a speech chain run"):
        compare_chains(base, tmp_path / "nowhere")
    # the same from the command line (two --chain output folders), written to --out
    from kimia.eval.cli import main

    assert main(["--compare", str(base), str(new), "--out", str(tmp_path / "c.md")]) == 0
    assert (tmp_path / "c.md").read_text() == md
    assert main(["--compare", str(base), str(new), str(new)]) == 2
