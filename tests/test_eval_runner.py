"""Runner mechanics: manifests (official layout, bad rows, length window), resume after a kill, sharding,
merged predictions, metrics JSON, Markdown, plots, comparison and the CLI.

kimia/api.py did not exist when this was written, so inference goes through a deterministic test predictor
(`ScriptedPredictor`): the thing under test is the runner and the scoring, not the model.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia.errors import AudioError, ConfigError
from kimia.eval.cli import main as eval_main
from kimia.eval.datasets import load_manifest, resolve_data
from kimia.eval.recipes import Recipe, builtin_recipes, load_recipe
from kimia.eval.report import compare_runs, score_run
from kimia.eval.runner import finished_predictions, run_dataset

REPO = Path(__file__).resolve().parents[1]


def _wav(path: Path, seconds: float, sr: int = 16000, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).uniform(-0.3, 0.3, int(seconds * sr)).astype(np.float32)
    sf.write(path, x, sr, subtype="PCM_16")
    return str(path)


class ScriptedPredictor:
    """Answers from a fixed script {index: text}; counts calls and items; can stop like a kill."""

    def __init__(self, script: dict[str, str], stop_after_items: int | None = None, fail: set[str] = frozenset()):
        self.script, self.stop_after, self.fail = script, stop_after_items, fail
        self.calls, self.items = 0, []

    def predict_batch(self, items, recipe):
        if self.stop_after is not None and len(self.items) + len(items) > self.stop_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        for it in items:
            if it.index in self.fail:
                raise AudioError(str(it.audio_paths[0]), "decoder exploded")
        self.items += [it.index for it in items]
        return [self.script[it.index] for it in items]


def _asr_manifest(tmp_path: Path, n: int = 8) -> tuple[Path, dict[str, str]]:
    refs = [f"the quick brown fox number {i} jumps" for i in range(n)]
    rows = []
    for i, ref in enumerate(refs):
        rows.append({"index": f"u{i}", "audio_path": f"audio/u{i}.wav", "question": "", "answer": ref,
                     "subset": "clean" if i % 2 == 0 else "other"})
        _wav(tmp_path / "audio" / f"u{i}.wav", 0.3 + 0.1 * i, seed=i)
    m = tmp_path / "tiny-asr.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # u0..u3 perfect, the rest with one substitution ("jumps" -> "jumped") out of 7 words
    script = {f"u{i}": refs[i] if i < 4 else refs[i].replace("jumps", "jumped") for i in range(n)}
    return m, script


# --------------------------------------------------------------------------------------- manifests
def test_official_sample_layout_is_accepted_as_is(tmp_path):
    # Rows as the official kit's download scripts write them (index int, audio_path str or list, subset,
    # audio_content for audio QA, meta), audio paths relative to the manifest.
    lines = [
        '{"index": 0, "audio_path": "LibriSpeech/test-clean/1089/134686/1089-134686-0000.flac", '
        '"question": "Please transcribe the spoken content into written text.", "answer": "HE HOPED THERE '
        'WOULD BE STEW FOR DINNER TURNIPS AND CARROTS", "subset": "test-clean"}',
        '{"index": 1, "audio_path": ["mmau/a1.wav"], "question": "What is the instrument? Choices: (A) piano '
        '(B) violin. Answer with the option\'s letter from the given choices directly and only give the best '
        'option.", "answer": "(B) violin", "subset": "music", "meta": {"category": "music", "difficulty": "easy"}}',
        '{"index": "clotho_3", "audio_path": "clotho/x.wav", "question": "Is it raining?", "answer": "yes", '
        '"subset": "default", "audio_content": "rain falls on a roof"}',
    ]
    (tmp_path / "sample.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _wav(tmp_path / "LibriSpeech/test-clean/1089/134686/1089-134686-0000.flac", 0.5)
    _wav(tmp_path / "mmau/a1.wav", 0.5)
    _wav(tmp_path / "clotho/x.wav", 0.5)
    man = load_manifest(tmp_path / "sample.jsonl")
    assert man.bad == []
    assert [it.index for it in man.items] == ["0", "1", "clotho_3"]
    assert man.items[0].audio_paths == [tmp_path / "LibriSpeech/test-clean/1089/134686/1089-134686-0000.flac"]
    assert man.items[1].meta == {"category": "music", "difficulty": "easy"}
    assert man.items[2].record["audio_content"] == "rain falls on a roof"
    assert man.items[0].duration == pytest.approx(0.5)


def test_bad_rows_are_reported_and_counted(tmp_path):
    _wav(tmp_path / "ok.wav", 0.5)
    _wav(tmp_path / "short.wav", 0.05)
    _wav(tmp_path / "long.wav", 61.0, sr=8000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    rows = [
        {"index": 1, "audio_path": "ok.wav", "question": "", "answer": "fine", "subset": "s"},
        {"index": 2, "audio_path": "missing.wav", "answer": "x"},
        {"index": 3, "audio_path": "corrupt.wav", "answer": "x"},
        {"index": 4, "audio_path": "ok.wav", "answer": "  "},
        {"index": 5, "audio_path": "short.wav", "answer": "x"},
        {"index": 6, "audio_path": "long.wav", "answer": "x"},
        {"index": 1, "audio_path": "ok.wav", "answer": "dup"},
        {"audio_path": "ok.wav", "answer": "x"},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + "{not json\n"
    (tmp_path / "m.jsonl").write_text(text)
    man = load_manifest(tmp_path / "m.jsonl")
    assert [it.index for it in man.items] == ["1"]
    reasons = {b.index: b.reason for b in man.bad}
    assert "missing audio file" in reasons["2"]
    assert "unreadable audio" in reasons["3"]
    assert reasons["4"] == "empty answer"
    assert "duplicate" in reasons["1"]
    assert sorted(b.index for b in man.skipped) == ["5", "6"]
    assert len(man.errors) == 6  # missing, corrupt, empty, duplicate, no index, bad json


def test_resolve_data_names_and_groups(tmp_path):
    (tmp_path / "librispeech.jsonl").write_text("")
    (tmp_path / "fleurs-en").mkdir()
    (tmp_path / "fleurs-en" / "fleurs-en.jsonl").write_text("")
    assert resolve_data("librispeech", tmp_path) == [("librispeech", tmp_path / "librispeech.jsonl")]
    assert [n for n, _ in resolve_data("asr", tmp_path)] == ["librispeech", "fleurs-en"]
    with pytest.raises(ConfigError, match="not found"):
        resolve_data("aishell-1", tmp_path)


# -------------------------------------------------------------------------------------------- recipes
def test_builtin_recipes_load_and_render():
    names = builtin_recipes()
    assert {"asr", "mqa", "audio_qa", "captioning", "emotion", "sound_event", "sound_scene", "conversation"} <= set(names)
    asr = load_recipe("asr")
    msgs = asr.messages("", ["a.wav"])
    assert msgs[0] == {"role": "user", "message_type": "text", "content": asr.default_question}
    assert msgs[1] == {"role": "user", "message_type": "audio", "content": "a.wav"}
    assert asr.sampling["text_repetition_penalty"] == 1.1  # the kit's setting
    conv = load_recipe("conversation")
    assert conv.messages("ignored", ["q.wav"]) == [{"role": "user", "message_type": "audio", "content": "q.wav"}]
    with pytest.raises(ConfigError, match="unknown sampling"):
        Recipe(name="x", task="asr", metric="wer", sampling={"temprature": 1})
    # read instead of heard: the transcript alone, no audio message; an item without one is refused
    read = load_recipe("spoken_qa_text")
    assert read.messages("", ["q.wav"], {"audio_content": "What is two plus two?"}) == [
        {"role": "user", "message_type": "text", "content": "What is two plus two?"}]
    with pytest.raises(ConfigError, match="instead of the audio"):
        read.messages("", ["q.wav"], {"audio_content": ""})
    with pytest.raises(ConfigError, match="needs one"):
        Recipe(name="x", task="spoken_qa", metric="key_qa", prompt="", prompt_position="instead")
    with pytest.raises(ConfigError, match="prompt_position"):
        Recipe(name="x", task="spoken_qa", metric="key_qa", prompt_position="beside")
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_recipe("no-such-recipe")


# ------------------------------------------------------------------------------------ runner + reports
def test_run_writes_predictions_metrics_markdown_and_plots(tmp_path):
    m, script = _asr_manifest(tmp_path)
    man = load_manifest(m)
    pred = ScriptedPredictor(script)
    res = run_dataset(man, pred, load_recipe("asr"), tmp_path / "run", batch_size=3, progress=False)
    assert res.merged and res.predicted == 8 and pred.calls == 3
    merged = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in merged] == [f"u{i}" for i in range(8)]
    assert merged[0]["real_prompt"] == load_recipe("asr").default_question and "subset" in merged[0]
    result = score_run(tmp_path / "run", dataset="tiny-asr", model="scripted")
    perf = result["performance"]
    # 4 utterances of 7 words with 1 error each, out of 8 x 7 words; per subset 2 errors / 28 words
    assert perf["overall"]["errors"] == 4 and perf["overall"]["ref_words"] == 56
    assert perf["overall"]["wer"] == pytest.approx(round(400 / 56, 2))
    assert perf["clean"]["errors"] == 2 and perf["other"]["errors"] == 2
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["recipe"]["name"] == "asr" and saved["eval_method"] == "wer"
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| **overall** |" in md and "text_repetition_penalty: 1.1" in md
    for png in ("wer_by_subset.png", "wer_by_length.png"):
        assert (tmp_path / "run" / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_killed_run_resumes_without_recomputing(tmp_path):
    m, script = _asr_manifest(tmp_path)
    man = load_manifest(m)
    first = ScriptedPredictor(script, stop_after_items=5)
    with pytest.raises(KeyboardInterrupt):
        run_dataset(man, first, load_recipe("asr"), tmp_path / "run", batch_size=2, progress=False)
    assert first.items == ["u0", "u1", "u2", "u3"]  # two whole batches reached the disk
    assert set(finished_predictions(tmp_path / "run")) == {"u0", "u1", "u2", "u3"}
    assert not (tmp_path / "run" / "predictions.jsonl").exists()
    second = ScriptedPredictor(script)
    res = run_dataset(man, second, load_recipe("asr"), tmp_path / "run", batch_size=2, progress=False)
    assert second.items == ["u4", "u5", "u6", "u7"] and res.reused == 4 and res.merged
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 8
    # a third run has nothing left to do; another recipe in the same folder is refused
    third = ScriptedPredictor(script)
    assert run_dataset(man, third, load_recipe("asr"), tmp_path / "run", progress=False).reused == 8
    assert third.calls == 0
    with pytest.raises(ConfigError, match="another recipe"):
        run_dataset(man, third, load_recipe("asr").with_overrides(text_temperature=0.7), tmp_path / "run")


def test_sigkill_mid_run_then_resume(tmp_path):
    m, script = _asr_manifest(tmp_path)
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLOW_SCRIPT": json.dumps(script)}
    cmd = [sys.executable, "-m", "kimia.eval.cli", "--data", str(m), "--model", "slow", "--work-dir", str(work),
           "--predictor", "tests.test_eval_runner:slow_predictor", "--no-progress", "--no-plots"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = work / "slow" / "tiny-asr" / "shard_0_of_1.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not shard.exists() or len(shard.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = set(finished_predictions(shard.parent))
    assert 3 <= len(done_before) < 8, "the run should have been killed halfway"
    second = ScriptedPredictor(script)
    res = run_dataset(load_manifest(m), second, load_recipe("asr"), shard.parent, progress=False)
    assert set(second.items) == {f"u{i}" for i in range(8)} - done_before
    assert res.reused == len(done_before) and res.merged


def slow_predictor(_model):
    class Slow:
        def predict_batch(self, items, recipe):
            time.sleep(0.15)
            script = json.loads(os.environ["SLOW_SCRIPT"])
            return [script[it.index] for it in items]
    return Slow()


def test_sharding_splits_work_and_last_rank_merges(tmp_path, monkeypatch):
    m, script = _asr_manifest(tmp_path)
    man = load_manifest(m)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    p1 = ScriptedPredictor(script)
    r1 = run_dataset(man, p1, load_recipe("asr"), tmp_path / "run", progress=False)
    assert p1.items == ["u1", "u4", "u7"] and not r1.merged
    p0, p2 = ScriptedPredictor(script), ScriptedPredictor(script)
    assert not run_dataset(man, p0, load_recipe("asr"), tmp_path / "run", rank=0, world_size=3, progress=False).merged
    r2 = run_dataset(man, p2, load_recipe("asr"), tmp_path / "run", rank=2, world_size=3, progress=False)
    assert p0.items == ["u0", "u3", "u6"] and p2.items == ["u2", "u5"] and r2.merged
    merged = [json.loads(x)["index"] for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert merged == [f"u{i}" for i in range(8)]


def test_failed_items_are_bad_rows_not_crashes(tmp_path):
    m, script = _asr_manifest(tmp_path, n=4)
    man = load_manifest(m)
    pred = ScriptedPredictor(script, fail={"u2"})
    res = run_dataset(man, pred, load_recipe("asr"), tmp_path / "run", batch_size=4, progress=False)
    assert [f["index"] for f in res.failed] == ["u2"] and sorted(pred.items) == ["u0", "u1", "u3"]
    result = score_run(tmp_path / "run", dataset="tiny", model="m", plots=False)
    assert result["counts"] == {"scored": 3, "bad": 1, "skipped": 0}
    assert "decoder exploded" in (tmp_path / "run" / "report.md").read_text()


def _classification_run(tmp_path, answers, preds, recipe="emotion", name="emo"):
    rows = [{"index": i, "audio_path": "a.wav", "question": "", "answer": a, "subset": "s"} for i, a in enumerate(answers)]
    _wav(tmp_path / "a.wav", 0.3)
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    man = load_manifest(tmp_path / f"{name}.jsonl")
    pred = ScriptedPredictor({str(i): p for i, p in enumerate(preds)})
    run_dataset(man, pred, load_recipe(recipe), tmp_path / name, progress=False)
    return score_run(tmp_path / name, dataset=name, model="m")


def test_classification_accuracy_and_confusion_plot(tmp_path):
    res = _classification_run(tmp_path, ["happy", "sad", "sad", "angry"],
                              ["The speaker is happy.", "sad", "happy", "no idea"])
    assert res["performance"]["overall"] == {"correct": 2, "total": 4, "unparsed": 1, "accuracy": 50.0}
    assert (tmp_path / "emo" / "plots" / "confusion.png").is_file()


def test_multiple_choice_uses_options_from_the_question(tmp_path):
    q = "What is heard? (A) a dog (B) a cat (C) rain. Answer with the option's letter."
    rows = [{"index": i, "audio_path": "a.wav", "question": q, "answer": a, "subset": "s"}
            for i, a in enumerate(["A", "(C) rain", "B"])]
    _wav(tmp_path / "a.wav", 0.3)
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pred = ScriptedPredictor({"0": "(A)", "1": "It is rain.", "2": "A"})
    run_dataset(load_manifest(tmp_path / "mc.jsonl"), pred, load_recipe("mqa"), tmp_path / "mc", progress=False)
    res = score_run(tmp_path / "mc", dataset="mc", model="m", plots=False)
    assert res["performance"]["overall"]["correct"] == 2 and res["performance"]["overall"]["total"] == 3


def test_compare_runs_side_by_side(tmp_path):
    a = _classification_run(tmp_path, ["x", "y"], ["x", "y"], name="run_a")
    (tmp_path / "other").mkdir()
    b = _classification_run(tmp_path / "other", ["x", "y"], ["x", "x"], name="run_a")
    assert a["performance"]["overall"]["accuracy"] == 100.0 and b["performance"]["overall"]["accuracy"] == 50.0
    md = compare_runs([tmp_path / "run_a", tmp_path / "other" / "run_a" / "metrics.json"], tmp_path / "cmp.md",
                      tmp_path / "cmp.png")
    row = [ln for ln in md.splitlines() if ln.startswith("| run_a/overall")][0]
    assert "100.00" in row and "50.00" in row
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    # same model name and recipe in both: the columns are told apart by run folder; item 1 went wrong in b
    assert str(tmp_path / "other" / "run_a") in md.splitlines()[0]
    paired = [ln for ln in md.splitlines() if ln.startswith("| run_a | ")]
    assert len(paired) == 1 and paired[0].endswith("| 2 | 0 | 1 | 1 | 1 |")


def test_compare_runs_pairs_asr_items_by_index(tmp_path):
    m, script = _asr_manifest(tmp_path, n=6)  # u0-u3 right, u4 and u5 one substitution each
    worse = dict(script, u0=script["u0"].replace("fox", "box"), u1="", u4=script["u4"].replace("jumped", "jumps"))
    for name, sc in (("a", script), ("b", worse)):
        run_dataset(load_manifest(m), ScriptedPredictor(sc), load_recipe("asr"), tmp_path / name, progress=False)
        score_run(tmp_path / name, dataset="tiny", model=name, plots=False)
    md = compare_runs([tmp_path / "a", tmp_path / "b"])
    assert md.splitlines()[-1] == "| tiny | b vs a | 6 | 1 | 2 | 3 | 1 |"
    # both directions count the same items the other way round
    assert compare_runs([tmp_path / "b", tmp_path / "a"]).splitlines()[-1] == "| tiny | a vs b | 6 | 2 | 1 | 3 | 1 |"


def test_sign_test_matches_scipy_binomtest():
    from scipy.stats import binomtest

    from kimia.eval.report import sign_test

    for better, worse in [(9, 1), (1, 9), (32, 17), (5, 2), (0, 7), (3, 3), (40, 0), (120, 95)]:
        assert sign_test(better, worse) == pytest.approx(binomtest(better, better + worse).pvalue, rel=1e-9)
    assert sign_test(0, 0) == 1.0


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_run_reeval_and_list(tmp_path, monkeypatch, capsys):
    m, script = _asr_manifest(tmp_path, n=4)
    monkeypatch.setenv("SLOW_SCRIPT", json.dumps(script))
    argv = ["--data", str(m), "--model", "x", "--model-name", "scripted", "--work-dir", str(tmp_path / "w"),
            "--predictor", "tests.test_eval_runner:slow_predictor", "--no-progress", "--batch", "2"]
    assert eval_main(argv) == 0
    run = tmp_path / "w" / "scripted" / "tiny-asr"
    assert {"metrics.json", "report.md", "predictions.jsonl", "recipe.yaml"} <= {p.name for p in run.iterdir()}
    (run / "metrics.json").unlink()
    assert eval_main(["--data", str(m), "--reeval", "--model-name", "scripted", "--work-dir", str(tmp_path / "w"),
                      "--no-plots"]) == 0
    assert json.loads((run / "metrics.json").read_text())["performance"]["overall"]["wer"] == 0.0
    # --reeval of a run that never happened: a clear error, not a traceback
    assert eval_main(["--data", str(m), "--reeval", "--model-name", "other", "--work-dir", str(tmp_path / "w"),
                      "--no-plots"]) == 2
    assert "no stored predictions to score" in capsys.readouterr().err
    assert eval_main(["--list"]) == 0
    assert "asr" in capsys.readouterr().out
    assert eval_main(["--data", str(tmp_path / "nope.jsonl"), "--model", "x"]) == 2


def test_resume_refuses_predictions_of_another_model(tmp_path):
    """A run folder remembers which model made its predictions: a model folder rebuilt in place (new
    fingerprint) is not mixed into them, unless --force-reinfer starts over."""
    m, script = _asr_manifest(tmp_path)
    man = load_manifest(m)
    first = ScriptedPredictor(script, stop_after_items=5)
    first.fingerprint = "model-a"
    with pytest.raises(KeyboardInterrupt):
        run_dataset(man, first, load_recipe("asr"), tmp_path / "run", batch_size=2, progress=False)
    other = ScriptedPredictor(script)
    other.fingerprint = "model-b"
    with pytest.raises(ConfigError, match="another model"):
        run_dataset(man, other, load_recipe("asr"), tmp_path / "run", batch_size=2, progress=False)
    assert other.items == []
    same = ScriptedPredictor(script)
    same.fingerprint = "model-a"
    assert run_dataset(man, same, load_recipe("asr"), tmp_path / "run", batch_size=2, progress=False).reused == 4
    res = run_dataset(man, other, load_recipe("asr"), tmp_path / "run", batch_size=2, progress=False, force=True)
    assert res.reused == 0 and other.items == [f"u{i}" for i in range(8)]
    with pytest.raises(ConfigError, match="another model"):  # the folder now belongs to model-b
        run_dataset(man, same, load_recipe("asr"), tmp_path / "run", progress=False)


def test_folder_fingerprint_follows_content_not_mtimes(tmp_path):
    import shutil

    from kimia.eval.runner import folder_fingerprint

    rng = np.random.default_rng(0)
    src = tmp_path / "model"
    (src / "lm").mkdir(parents=True)
    (src / "kimia.json").write_text('{"format": "kimia-model"}')
    big = rng.integers(0, 255, 9 << 20, dtype=np.uint8)  # above the whole-file limit: sampled
    (src / "lm" / "weights.bin").write_bytes(big.tobytes())
    fp = folder_fingerprint(src)
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)  # new mtimes, same content
    os.utime(copy / "kimia.json", (1, 1))
    assert folder_fingerprint(copy) == fp
    (copy / "kimia.json").write_text('{"format": "kimia-modeL"}')  # same size, one byte differs
    assert folder_fingerprint(copy) != fp
    shutil.rmtree(copy)
    shutil.copytree(src, copy)
    retrained = rng.integers(0, 255, big.size, dtype=np.uint8)  # same size, every weight rewritten
    (copy / "lm" / "weights.bin").write_bytes(retrained.tobytes())
    assert folder_fingerprint(copy) != fp
    (copy / "lm" / "weights.bin").write_bytes(big.tobytes())
    (copy / "extra.json").write_text("{}")  # a file added
    assert folder_fingerprint(copy) != fp
