"""`kimia eval` end to end with a tiny random KimiAudio model folder (tests/tiny_model.py).

The predictor must send the recipe's messages, output type and sampling to KimiAudio: its answers are
compared with direct `KimiAudio.generate` calls on the same messages. A run killed after its first batch
resumes without asking the model again for the finished items, and writes every report.
"""

import json

import numpy as np
import pytest
import soundfile as sf

from kimia.eval.datasets import load_manifest
from kimia.eval.recipes import load_recipe
from kimia.eval.report import score_run
from kimia.eval.runner import KimiAudioPredictor, finished_predictions, folder_fingerprint, run_dataset
from tests.tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", detokenizer=False)
    return KimiAudioPredictor(str(folder), device="cpu")


class Counting:
    """Wraps the real predictor: counts the items it was asked for, can stop like a kill after N batches."""

    def __init__(self, inner, stop_after_batches=None):
        self.inner, self.stop, self.batches, self.items = inner, stop_after_batches, 0, []
        self.fingerprint = inner.fingerprint  # the run folder remembers the model that made its predictions

    def predict_batch(self, items, recipe):
        if self.stop is not None and self.batches >= self.stop:
            raise KeyboardInterrupt("simulated kill")
        self.batches += 1
        self.items += [it.index for it in items]
        return self.inner.predict_batch(items, recipe)


def test_tiny_model_run_resume_and_reports(predictor, tmp_path):
    rows = []
    for i in range(3):
        x = np.random.default_rng(i).uniform(-0.3, 0.3, int(16000 * (0.4 + 0.2 * i))).astype(np.float32)
        sf.write(tmp_path / f"a{i}.wav", x, 16000)
        rows.append({"index": i, "audio_path": f"a{i}.wav", "question": "", "answer": "hello world",
                     "subset": "s"})
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    man = load_manifest(tmp_path / "tiny.jsonl")
    recipe = load_recipe("asr").with_overrides(max_new_tokens=3)
    run = tmp_path / "run"

    first = Counting(predictor, stop_after_batches=1)
    with pytest.raises(KeyboardInterrupt):
        run_dataset(man, first, recipe, run, batch_size=2, progress=False)
    assert first.items == ["0", "1"] and set(finished_predictions(run)) == {"0", "1"}
    second = Counting(predictor)
    res = run_dataset(man, second, recipe, run, batch_size=2, progress=False)
    assert second.items == ["2"] and res.reused == 2 and res.merged
    stored = json.loads((run / "model.json").read_text())["fingerprint"]
    assert stored == folder_fingerprint(predictor._path) == predictor.fingerprint

    merged = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in merged] == [0, 1, 2]
    # the predictor's answer is KimiAudio's answer to the recipe's messages and sampling (one item checked:
    # each generate re-encodes the audio, which is the slow part on a loaded CPU)
    it = man.items[2]
    msgs = recipe.messages(it.question, [str(p) for p in it.audio_paths])
    assert msgs[0]["content"] == "Please transcribe the spoken content into written text."
    assert msgs[1] == {"role": "user", "message_type": "audio", "content": str(tmp_path / "a2.wav")}
    _, text = predictor.model.generate(msgs, output_type="text", **recipe.sampling)
    assert merged[2]["prediction"] == text
    result = score_run(run, dataset="tiny", model="tiny-random")
    assert result["counts"]["scored"] == 3 and result["performance"]["overall"]["ref_words"] == 6
    assert (run / "report.md").is_file() and (run / "plots" / "wer_by_subset.png").is_file()


def test_read_instead_of_heard_sends_the_transcript_alone(predictor, tmp_path):
    """`spoken_qa_text` asks the same items as text (their audio_content), never the audio: the answers are
    KimiAudio's answers to that one text message, and `real_prompt` records what was sent."""
    rows = []
    for i, q in enumerate(("What is two plus two?", "Count from one to three.")):
        sf.write(tmp_path / f"q{i}.wav", np.zeros(8000, np.float32), 16000)  # silence: must not be what is asked
        rows.append({"index": f"q{i}", "audio_path": f"q{i}.wav", "question": "", "answer": "four",
                     "key": "four", "audio_content": q, "subset": "s"})
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    man = load_manifest(tmp_path / "qa.jsonl")
    recipe = load_recipe("spoken_qa_text").with_overrides(max_new_tokens=4)
    run_dataset(man, predictor, recipe, tmp_path / "run", batch_size=2, progress=False)
    merged = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    for it, rec in zip(man.items, merged):
        msgs = recipe.messages(it.question, [str(p) for p in it.audio_paths], it.prompt_fields)
        assert msgs == [{"role": "user", "message_type": "text", "content": rec["audio_content"]}]
        assert rec["real_prompt"] == rec["audio_content"]
        _, text = predictor.model.generate(msgs, output_type="text", **recipe.sampling)
        assert rec["prediction"] == text
    assert score_run(tmp_path / "run", dataset="qa", model="tiny")["eval_method"] == "key_qa"


def test_spoken_answers_are_heard_by_an_independent_recognizer(tmp_path):
    """`spoken_answer`: text + speech per item, the wav written, Whisper base's transcript stored, WER of the
    transcript against the model's own text, key checks, first-audio time and real-time factor reported."""
    from kimia.eval.speech import parse_spoken

    folder = write_tiny_model(tmp_path / "tiny")
    rows = []
    for i in range(2):
        x = np.random.default_rng(i).uniform(-0.3, 0.3, 16000).astype(np.float32)
        sf.write(tmp_path / f"q{i}.wav", x, 16000)
        rows.append({"index": i, "audio_path": f"q{i}.wav", "question": "", "answer": "It is five.", "key": "five",
                     "subset": "arith"})
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    man = load_manifest(tmp_path / "qa.jsonl")
    recipe = load_recipe("spoken_answer").with_overrides(max_new_tokens=20)
    pred = KimiAudioPredictor(str(folder), device="cpu")
    assert pred.model.detokenizer is None  # loaded lazily, only for a spoken-answer recipe
    run = tmp_path / "run"
    res = run_dataset(man, pred, recipe, run, batch_size=1, progress=False)
    assert res.merged and pred.model.detokenizer is not None
    merged = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    for rec in merged:
        p = parse_spoken(rec["prediction"])
        assert set(p) == {"text", "transcript", "audio_path", "audio_s", "first_audio_s", "gen_s"}
        if p["audio_s"]:
            wav, sr = sf.read(p["audio_path"])
            assert sr == 24000 and abs(wav.size / sr - p["audio_s"]) < 1e-3
    # sampled speech (audio temperature 0.8) is seeded per item: a second run says exactly the same
    again = tmp_path / "again"
    run_dataset(man, pred, recipe, again, batch_size=1, progress=False)
    lines = (again / "predictions.jsonl").read_text().splitlines()
    second = {r["index"]: r["prediction"] for r in map(json.loads, lines)}
    for rec in merged:
        a, b = parse_spoken(rec["prediction"]), parse_spoken(second[rec["index"]])
        assert a["text"] == b["text"] and a["audio_s"] == b["audio_s"]
        if a["audio_s"]:
            assert sf.read(a["audio_path"])[0].tolist() == sf.read(b["audio_path"])[0].tolist()
    result = score_run(run, dataset="qa", model="tiny-random", plots=False)
    overall = result["performance"]["overall"]
    assert overall["utterances"] == 2 and {"wer", "key_in_text", "key_in_speech", "rtf",
                                            "first_audio_s_median"} <= set(overall)
    # scoring from stored predictions: a transcript equal to the text is 0 % WER, a silent one 100 %
    from kimia.eval.speech import score_spoken

    recs = [{"index": 0, "key": "five", "prediction": json.dumps({"text": "It is five.", "transcript": "it is five",
                                                                  "audio_s": 1.0, "gen_s": 0.5,
                                                                  "first_audio_s": 0.2})},
            {"index": 1, "key": "five", "prediction": json.dumps({"text": "Two words.", "transcript": "",
                                                                  "audio_s": 0.0, "gen_s": 0.1})}]
    perf, _ = score_spoken({"s": recs})
    assert perf["overall"]["wer"] == 40.0 and perf["overall"]["key_in_text"] == 50.0
    assert perf["overall"]["key_in_speech"] == 50.0 and perf["overall"]["rtf"] == 0.6 and perf["overall"]["silent"] == 1


def test_spoken_wer_counts_words_as_said():
    """A recognizer may write a spoken number as digits: "Five, four, three." heard as "5, 4, 3" is no error.
    The kit normaliser (kept as wer_kit) joins number words into one number and so counts it wrong."""
    from kimia.data.judge import said_contains, said_errors
    from kimia.eval.speech import score_spoken

    assert said_errors("Five, four, three, two, one.", "5, 4, 3, 2, 1")[:2] == (0, 5)
    assert said_errors("Eight times six is forty eight.", "8 times 6 is 48.")[:2] == (0, 6)
    assert said_errors("Orange comes first.", "The ring comes first.")[:2] == (2, 3)
    recs = [{"index": 0, "key": "five, four", "prediction": json.dumps(
        {"text": "Five, four, three, two, one.", "transcript": "5, 4, 3, 2, 1", "audio_s": 1.0, "gen_s": 0.5})}]
    overall = score_spoken({"s": recs})[0]["overall"]
    assert overall["wer"] == 0.0 and overall["wer_kit"] > 0
    assert overall["key_in_speech"] == 100.0 and overall["key_in_text"] == 100.0  # the key is found as said too
    assert said_contains("54", "It is fifty-four.") and said_contains("fifty four", "54")
    assert not said_contains("54", "5, 4") and not said_contains("four", "fourteen") and not said_contains("", "a")
    # per answer: a hallucinated run of words ruins the pooled WER, not the median or the half-heard share
    recs += [{"index": i, "key": "", "prediction": json.dumps({"text": t, "transcript": h, "audio_s": 1.0, "gen_s": 0.5})}
             for i, (t, h) in enumerate([("Bees make honey.", "Please make honey."),
                                         ("Two, three.", "2, 3, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8"),
                                         ("Orange comes first.", "The ring comes first.")], 1)]
    overall = score_spoken({"s": recs})[0]["overall"]
    assert overall["wer"] == round(100 * (0 + 1 + 16 + 2) / (5 + 3 + 2 + 3), 2)
    assert overall["wer_median"] == 50.0 and overall["half_heard"] == 50.0  # per answer: 0, 1/3, 8, 2/3


def test_key_qa_scores_the_answer_key():
    from kimia.eval.report import score_records

    recs = [{"index": 0, "answer": "Five times three is fifteen.", "key": "fifteen", "prediction": "It is fifteen."},
            {"index": 1, "answer": "Two plus two is four.", "key": "four", "prediction": "Two plus two is fourteen."}]
    perf, _, _ = score_records(recs, load_recipe("spoken_qa"))
    assert perf["overall"]["score"] == 50.0


def test_question_score_counts_each_question_once_across_voices():
    from kimia.eval.report import markdown_report, score_records

    # one question said in three voices (2 of 3 right) in two subsets, another said once (wrong), a third once
    # (right): items 3 / 5 = 60 %; questions (2/3 + 0 + 1) / 3 = 55.56 %
    add, count, day = ("What is two plus two?", "four"), ("Count from one to three.", "one, two, three"), \
        ("Which day comes after Monday?", "tuesday")
    said = [("arithmetic", add, "Two plus two is four."), ("counting", count, "One, two."),
            ("arithmetic", add, "It is four"), ("facts", day, "Tuesday."),
            ("facts", ("what is two plus two", "four"), "Five.")]
    recs = [{"index": i, "subset": sub, "audio_content": q, "answer": k, "key": k, "prediction": p}
            for i, (sub, (q, k), p) in enumerate(said)]
    perf, details, _ = score_records(recs, load_recipe("spoken_qa"))
    assert [d["score"] for d in sorted(details, key=lambda d: d["index"])] == [100.0, 0.0, 100.0, 100.0, 0.0]
    assert perf["overall"]["score"] == 60.0
    assert perf["overall"]["questions"] == 3  # the fifth item says the first question (normalised text)
    assert perf["overall"]["question_score"] == round(100 * (2 / 3 + 0 + 1) / 3, 2)
    md = markdown_report({"model": "m", "dataset": "d", "task": "spoken_qa", "eval_method": "key_qa",
                          "performance": perf, "counts": {"scored": 5, "bad": 0, "skipped": 0}, "recipe": {}})
    assert "question_score" in md and "55.56" in md
    # records without the said text (a generic eval-kit set) get no per-question figure
    bare = [{k: v for k, v in r.items() if k != "audio_content"} for r in recs]
    assert "questions" not in score_records(bare, load_recipe("spoken_qa"))[0]["overall"]


def test_spoken_answers_are_heard_outside_the_model_process():
    """Once CTranslate2 (its own OpenMP runtime) has run in a process, every later answer of the model there is
    slower (first audio 0.70 -> 0.97 s median, measured), so the speech eval's recognizer runs in a process of its
    own: the process that times the answers never loads it, and the transcript still comes back."""
    import subprocess
    import sys

    from kimia.audio import example_path
    from kimia.data.judge import wer

    code = ("import sys, soundfile as sf\n"
            "from kimia.eval.speech import hear\n"
            "audio, sr = sf.read(sys.argv[1], dtype='float32')\n"
            "assert sr == 16000\n"
            "print(hear(audio))\n"
            "print('ctranslate2' in sys.modules, 'faster_whisper' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(example_path("demo_question.flac"))], capture_output=True,
                         text=True, timeout=300, check=True).stdout.strip().splitlines()
    assert wer("What is five times three?", out[0]) <= 0.2, out
    assert out[-1] == "False False", out
