"""Tests of the synthetic corpus builder (`kimia data synth`): real engines, the real Whisper judge, resume,
reproducibility, balance and summary/manifest consistency on a tiny corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from kimia.data import cli as data_cli
from kimia.data.engines import available_engines, get_engine
from kimia.data.judge import JUDGE_SAMPLE_RATE, RULES, Judge, decide, token_budget, wer
from kimia.data.manifest import EVAL_KIT_FIELDS, read_conversations, read_manifest
from kimia.data.sounds import plan_sound, render_sound
from kimia.data.synth import (SynthConfig, SynthInterrupted, build_corpus, make_item, plan, resolve_output_voice,
                              split_transcript, synth_item)
from kimia.data.texts import normalize_text, number_words, split_of, spoken_question

TINY_HOURS = 0.006  # ~4 s of input audio per task


def test_every_installed_engine_speaks():
    ok, missing = available_engines()
    assert "espeak" in ok, "espeak-ng must be installed (scripts/setup-system.sh installs it)"
    for name in ok:
        eng = get_engine(name)
        voice = eng.voices()[0]
        audio, sr = eng.synth("Good morning.", voice)
        assert audio.dtype == np.float32 and np.isfinite(audio).all(), name
        assert 0.2 < audio.size / sr < 5.0, (name, audio.size / sr)
        assert np.sqrt(np.mean(audio**2)) > 1e-3, f"{name} produced near silence"


def test_normalisation_reads_numbers_and_symbols():
    assert normalize_text("What is 7 + 5?") == normalize_text("what is seven plus five")
    assert normalize_text("4x2 is 8.") == "four times two is eight"
    assert normalize_text("5-4-3") == "five four three" and normalize_text("7 - 2") == "seven minus two"
    assert number_words(21) == "twenty one" and number_words(300) == "three hundred"
    assert wer("the cat sat", "The cat, sat!") == 0.0
    assert decide("what is seven plus five", "what is 7 plus 9", RULES["spoken_qa"], "seven five").ok is False


def test_split_transcript_assigns_words_to_clips():
    refs = ["the birch canoe slid", "what is seven plus five", "good night"]
    parts = split_transcript(refs, "The birch canoe slid. What is 7 plus 5? Good night.")
    assert parts == [normalize_text(r) for r in refs]
    # a clip that was not heard at all gets nothing; its neighbours keep their words
    parts = split_transcript(refs, "the birch canoe slid good night")
    assert parts[1] == "" and parts[0] == "the birch canoe slid" and parts[2] == "good night"


def test_judge_accepts_real_speech_and_rejects_wrong_text():
    """Real faster-whisper (Whisper base) on two real espeak-ng clips, packed in one window."""
    eng = get_engine("espeak")
    voice = next(v for v in eng.voices() if v.name == "en-us+m3")
    refs = ["Please open the window and close the door.", "What is seven plus five?"]
    gap = np.zeros(12800, np.float32)
    clips = []
    for r in refs:
        a, sr = eng.synth(r, voice, speed=0.9)
        clips += [soxr.resample(a, sr, 16000).astype(np.float32), gap]
    hyp = Judge("base").transcribe(np.concatenate(clips))
    parts = split_transcript(refs, hyp)
    assert decide(refs[0], parts[0], RULES["asr"]).ok, (hyp, parts)
    assert decide(refs[1], parts[1], RULES["spoken_qa"], "seven five").ok, (hyp, parts)
    assert not decide("A completely different sentence about dogs.", parts[0], RULES["asr"]).ok


def test_plan_is_reproducible_and_balanced(tmp_path):
    cfg = SynthConfig(out=tmp_path, hours=0.02, seed=3, engines=("espeak",), judge=False)
    out_voice = resolve_output_voice("kokoro:jm_kumo", ["espeak"])
    a, b = plan(cfg, ["espeak"], out_voice), plan(cfg, ["espeak"], out_voice)
    assert a == b
    other = plan(SynthConfig(out=tmp_path, hours=0.02, seed=4, engines=("espeak",)), ["espeak"], out_voice)
    assert [i["clips"][0].get("text") for i in a] != [i["clips"][0].get("text") for i in other]
    budget = cfg.hours * 3600 / len(cfg.tasks)
    for task in cfg.tasks:
        est = [i["est_seconds"] for i in a if i["task"] == task]
        assert budget <= sum(est) < budget + max(est), task  # each task stops at its share of the hours
    # an item's spec depends only on (task, k, seed, engines): a longer run extends, never reshuffles
    longer = plan(SynthConfig(out=tmp_path, hours=0.04, seed=3, engines=("espeak",)), ["espeak"], out_voice)
    ids = {i["id"]: i for i in longer}
    assert all(ids[i["id"]] == i for i in a)


def test_wordnet_widens_the_read_speech_pool(tmp_path):
    from kimia.data.texts import fortune_sentences, sentence_pool, wordnet_sentences
    from kimia.errors import ConfigError

    wn = wordnet_sentences()
    assert len(wn) > 20000  # WordNet 3.0's usage examples that pass the filter (~33k)
    assert all(4 <= len(s.split()) <= 18 and s[0].isupper() and s[-1] in ".?!" for s in wn)
    joined = sentence_pool(("fortune", "wordnet"))
    assert set(wn) | set(fortune_sentences()) == set(joined)
    out_voice = resolve_output_voice("espeak:en-us+m3", ["espeak"])
    texts = {src: [i["clips"][0]["text"] for i in plan(SynthConfig(out=tmp_path, hours=0.3, engines=("espeak",),
                                                                   tasks=("asr",), text_sources=src),
                                                       ["espeak"], out_voice)]
             for src in (("fortune",), ("fortune", "wordnet"))}
    wn_only = set(wn) - set(fortune_sentences())
    assert not any(t in wn_only for t in texts[("fortune",)])  # the default corpus is the one it always was
    assert sum(t in wn_only for t in texts[("fortune", "wordnet")]) > 0.5 * len(texts[("fortune", "wordnet")])
    with pytest.raises(ConfigError, match="unknown text source"):
        SynthConfig(out=tmp_path, hours=0.1, engines=("espeak",), text_sources=("fortune", "gutenberg"))


def test_a_missing_wordnet_is_named_with_its_package(tmp_path, monkeypatch):
    from kimia.data import texts
    from kimia.errors import ConfigError

    monkeypatch.setattr(texts, "WORDNET_DIRS", (str(tmp_path / "no-wordnet"),))
    cached = (texts.wordnet_sentences, texts.sentence_pool, texts.wordnet_meanings)
    for f in cached:
        f.cache_clear()
    try:
        with pytest.raises(ConfigError, match="wordnet-base"):
            SynthConfig(out=tmp_path, hours=0.1, engines=("espeak",), text_sources=("fortune", "wordnet"))
        with pytest.raises(ConfigError, match="meaning task needs WordNet.*wordnet-base"):
            SynthConfig(out=tmp_path, hours=0.1, engines=("espeak",), tasks=("asr", "meaning"))
    finally:
        for f in cached:
            f.cache_clear()  # the next caller reads the real WordNet again


def test_meaning_task_asks_what_common_words_mean(tmp_path):
    """The meaning task: a spoken question about a common WordNet noun, answered in text by the definition of
    its most frequent sense; split by the word; its manifest rows are what `kimia train distill` reads."""
    from kimia.data.texts import wordnet_meanings
    from kimia.train.distill import distill_rows

    meanings = dict(wordnet_meanings())
    assert len(meanings) > 1500 and all(w.isalpha() and w.islower() for w in meanings)
    assert "medical" in meanings["doctor"] and "hair" in meanings["beard"]  # the first sense's definition
    assert "rare" not in meanings  # adjectives are not asked about; "zygote" is too rare to be kept
    assert "zygote" not in meanings
    out_voice = resolve_output_voice("espeak:en-us+m3", ["espeak"])
    items = [make_item("meaning", k, 0, ["espeak"], out_voice, 0.3) for k in range(60)]
    split = {}
    for it in items:
        (clip,) = it["clips"]
        word = it["key"]
        assert clip["kind"] == "input" and word in clip["text"].rstrip("?.").split()
        assert it["answer"] == f"{word.capitalize()} means {meanings[word]}."
        assert split.setdefault(word, it["split"]) == it["split"] == split_of(word, 0.3)
    assert {"train", "eval"} == {it["split"] for it in items}
    cfg = SynthConfig(out=tmp_path / "c", hours=TINY_HOURS, seed=1, jobs=1, engines=("espeak",), judge=False,
                      progress=False, tasks=("meaning",), eval_fraction=0.0)
    build_corpus(cfg)
    conv = read_conversations(tmp_path / "c" / "finetune" / "train.jsonl")
    assert conv and all([m["message_type"] for m in c["conversation"]] == ["audio", "text"] for c in conv)
    rows = distill_rows([tmp_path / "c" / "manifests" / "meaning_train.jsonl"])
    assert len(rows) == len(conv)
    assert [c["conversation"][1]["content"] for c in conv] == [r["answer"] for r in rows]
    assert all(r["audio_content"] != r["answer"] and r["key"] in r["audio_content"] for r in rows)


def test_split_is_by_sentence():
    rng = random.Random(0)
    qs = [spoken_question(rng).question for _ in range(400)]
    splits = {q: split_of(q, 0.2) for q in qs}
    assert {"train", "eval"} <= set(splits.values())
    assert all(split_of(q.upper() + "!", 0.2) == s for q, s in splits.items())  # same sentence, same split


def test_same_item_same_audio(tmp_path):
    out_voice = resolve_output_voice("espeak:en-us+m3", ["espeak"])
    item = make_item("spoken_qa", 2, 7, ["espeak"], out_voice, 0.1)
    r1, r2 = synth_item(item, str(tmp_path / "a")), synth_item(item, str(tmp_path / "b"))
    for c1, c2 in zip(r1["clips"], r2["clips"]):
        assert (tmp_path / "a" / c1["path"]).read_bytes() == (tmp_path / "b" / c2["path"]).read_bytes()


def test_sounds_are_deterministic_and_labelled():
    rng = random.Random(5)
    for _ in range(6):
        r = plan_sound(rng, with_speech=False)
        x, y = render_sound(r), render_sound(r)
        assert np.array_equal(x, y) and x.dtype == np.float32 and np.isfinite(x).all()
        assert r["label"] and r["caption"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in root.rglob("*") if p.is_file() and p.suffix in (".wav", ".json")
            and p.parent.name != root.name}


def test_tiny_corpus_resumes_without_regenerating(tmp_path, capsys):
    out = tmp_path / "corpus"
    args = ["synth", "--out", str(out), "--hours", str(TINY_HOURS), "--seed", "1", "--jobs", "2",
            "--engines", "espeak", "--no-judge", "--no-progress"]
    cfg = SynthConfig(out=out, hours=TINY_HOURS, seed=1, jobs=2, engines=("espeak",), judge=False, progress=False,
                      stop_after=3)
    with pytest.raises(SynthInterrupted):
        build_corpus(cfg)  # a simulated kill after 3 items
    before = _snapshot(out)
    n_done = len(list((out / "items").glob("*.synth.json")))
    assert n_done >= 3 and not (out / "summary.json").exists()

    assert data_cli.main(args) == 0  # resume through the command line
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert "minutes per task" in printed and summary["output_voice"] in printed
    run = summary["run"]
    assert run["reused_synth"] == n_done
    assert run["synthesized_this_run"] == run["planned"] - n_done  # nothing made twice
    after = _snapshot(out)
    done_ids = {p.name.removesuffix(".synth.json") for p in (out / "items").glob("*.synth.json")
                if f"items/{p.name}" in before}
    checked = 0
    for path, stamp in before.items():  # files of finished items stay untouched (half-made items are redone)
        if Path(path).stem.rsplit("_", 1)[0] in done_ids or Path(path).name.removesuffix(".synth.json") in done_ids:
            assert after.get(path) == stamp, f"{path} was rewritten on resume"
            checked += 1
    assert checked >= 2 * n_done

    # the evaluation toolkit reads every manifest as written (paths relative to the manifest, as the official
    # kit resolves them): no bad rows
    from kimia.eval.datasets import load_manifest

    for mf in sorted((out / "manifests").glob("*.jsonl")):
        m = load_manifest(mf, check_audio=True, min_seconds=0.0, max_seconds=600.0)
        assert not m.bad, f"{mf.name}: {m.bad[:2]}"

    # manifests agree with the summary, files exist at the stated rates, tasks all present
    per_task, per_engine, train_texts, eval_texts = {}, {}, set(), set()
    for mf in sorted((out / "manifests").glob("*.jsonl")):
        for r in read_manifest(mf):
            assert set(EVAL_KIT_FIELDS) <= set(r)
            per_task[r["task"]] = per_task.get(r["task"], 0) + r["duration"]
            per_engine[r["engine"]] = per_engine.get(r["engine"], 0) + r["duration"]
            for p in [r["audio_path"]] if isinstance(r["audio_path"], str) else r["audio_path"]:
                assert sf.info(p).samplerate == 16000
            if r["target_audio_path"]:
                assert sf.info(r["target_audio_path"]).samplerate == 24000
            (eval_texts if r["split"] == "eval" else train_texts).add(normalize_text(r["text"]))
    assert set(per_task) == set(summary["tasks"])
    budget = TINY_HOURS * 3600 / len(summary["tasks"])
    for task, secs in per_task.items():  # balanced: every task reaches its share of accepted audio (top-ups)
        assert secs >= budget - 0.01, (task, secs, budget)
    assert summary["items"]["accepted"] == sum(summary["items"]["accepted_per_task"].values())
    for task, secs in per_task.items():
        assert summary["hours"]["per_task"][task] == pytest.approx(secs / 3600, abs=1e-5)
    for eng, secs in per_engine.items():
        assert summary["hours"]["per_engine"][eng] == pytest.approx(secs / 3600, abs=1e-5)
    assert summary["hours"]["input"] == pytest.approx(sum(per_task.values()) / 3600, abs=1e-5)
    assert not (train_texts & eval_texts - {""})
    convs = read_conversations(out / "finetune" / "train.jsonl") + read_conversations(out / "finetune" / "eval.jsonl")
    qa = summary["items"]["accepted_per_task"].get("spoken_qa", 0)
    assert len(convs) == summary["items"]["accepted"] + qa  # spoken questions also answered in text only
    assert sum(c["task"] == "spoken_qa_text" for c in convs) == qa
    for c in convs:
        assert c["task_type"] in ("understanding", "speech2speech")
        assert c["conversation"][-1]["role"] == "assistant"
        for m in c["conversation"]:
            if m["message_type"] == "audio":
                assert Path(m["content"]).is_file()

    # a third run finds everything done and makes nothing
    assert data_cli.main(args) == 0
    again = json.loads((out / "summary.json").read_text())["run"]
    assert again["synthesized_this_run"] == 0 and again["reused_final"] == run["planned"]


def test_a_grown_corpus_links_the_items_of_the_smaller_one(tmp_path):
    """reuse_from: a corpus of twice the hours (same seed) hard-links every item of the smaller one instead of
    making it again, and ends up with the same records and manifests as the same corpus built from nothing."""
    from kimia.errors import ConfigError

    def cfg(out, hours, **kw):
        return SynthConfig(out=tmp_path / out, hours=hours, seed=3, jobs=2, engines=("espeak",), judge=False,
                           progress=False, tasks=("asr", "spoken_qa", "sound"), **kw)

    small = build_corpus(cfg("small", TINY_HOURS))
    grown = build_corpus(cfg("grown", 2 * TINY_HOURS, reuse_from=tmp_path / "small"))
    scratch = build_corpus(cfg("scratch", 2 * TINY_HOURS))
    n_small = small["run"]["planned"]
    assert grown["run"]["linked"] == n_small > 0
    assert grown["run"]["synthesized_this_run"] == grown["run"]["planned"] - n_small > 0
    for f in (tmp_path / "small").rglob("*"):
        if f.is_file() and f.suffix in (".wav", ".json") and f.parent != tmp_path / "small":
            twin = tmp_path / "grown" / f.relative_to(tmp_path / "small")
            assert twin.stat().st_ino == f.stat().st_ino, f"{f} not linked"
    for key in ("items", "hours"):
        assert grown[key] == scratch[key]
    for mf in sorted((tmp_path / "scratch" / "manifests").glob("*.jsonl")):
        assert (tmp_path / "grown" / "manifests" / mf.name).read_text().replace("/grown/", "/scratch/") == \
            mf.read_text(), mf.name
    with pytest.raises(ConfigError, match="no items/ folder"):
        cfg("other", TINY_HOURS, reuse_from=tmp_path / "nowhere")


def test_channels_are_seeded_and_only_on_train_speech():
    import random

    import numpy as np

    from kimia.data.augment import apply_channel, plan_channel

    chans = [plan_channel(random.Random(k)) for k in range(200)]
    assert 0.2 < sum(c is None for c in chans) / 200 < 0.5
    assert any(c and "lowpass_hz" in c for c in chans) and any(c and "rt60" in c for c in chans)
    sr = 16000
    t = np.arange(sr) / sr
    x = (0.3 * np.sin(2 * np.pi * 300 * t) + 0.3 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32)
    ch = {"seed": 1, "gain_db": 0.0, "lowpass_hz": 3500}
    y = apply_channel(x, sr, ch)
    assert y.shape == x.shape and np.array_equal(y, apply_channel(x, sr, ch))  # deterministic
    spec = np.abs(np.fft.rfft(y))
    assert spec[6000] < 0.01 * spec[300]  # the 6 kHz tone is gone, the 300 Hz one stays
    noisy = apply_channel(x, sr, {"seed": 2, "gain_db": 0.0, "noise_snr_db": 10.0, "noise_color": "pink"})
    snr = 10 * np.log10(np.mean(x**2) / np.mean((noisy / (np.abs(noisy).max() / np.abs(x).max()) - x) ** 2))
    assert 5 < snr < 15
    assert np.array_equal(apply_channel(x, sr, None), x)
    out_voice = resolve_output_voice("espeak:en-us+m3", ["espeak"])
    items = [make_item("asr", k, 0, ["espeak"], out_voice, 0.3) for k in range(40)]
    assert all("channel" not in it for it in items if it["split"] == "eval")
    assert all("channel" in it for it in items if it["split"] == "train")
    assert all("channel" not in make_item("asr", k, 0, ["espeak"], out_voice, 0.3, augment=False) for k in range(5))


def test_task_weights_share_out_the_hours(tmp_path):
    import pytest

    from kimia.errors import ConfigError

    out_voice = resolve_output_voice("espeak:en-us+m3", ["espeak"])
    cfg = SynthConfig(out=tmp_path, hours=0.2, engines=("espeak",), tasks=("asr", "spoken_qa"),
                      task_weights={"asr": 3.0})
    items = plan(cfg, ["espeak"], out_voice)
    secs = {t: sum(i["est_seconds"] for i in items if i["task"] == t) for t in ("asr", "spoken_qa")}
    assert 2.5 < secs["asr"] / secs["spoken_qa"] < 3.5
    with pytest.raises(ConfigError, match="task_weights"):
        SynthConfig(out=tmp_path, hours=0.2, engines=("espeak",), tasks=("asr",), task_weights={"sound": 1.0})
    with pytest.raises(ConfigError, match="task_weights"):
        SynthConfig(out=tmp_path, hours=0.2, engines=("espeak",), tasks=("asr",), task_weights={"asr": 0})


def test_speak_task_reads_text_aloud_and_is_counted_on_its_answers(tmp_path, capsys):
    """The opt-in speak task: a text prompt, the same words spoken back in the output voice. Its share of the
    hours is counted on those answers (it has no input audio); a spoken-QA answer it reads keeps the split of
    its question; and the default task set, hence every earlier corpus plan, is unchanged by it."""
    from kimia.data.synth import TASKS
    from kimia.data.texts import SPEAK_INSTRUCTIONS
    from kimia.errors import ConfigError

    assert "speak" not in TASKS and SynthConfig(out=tmp_path, hours=1.0).tasks == TASKS
    with pytest.raises(ConfigError, match="unknown task"):
        SynthConfig(out=tmp_path, hours=1.0, tasks=("speak", "sing"))

    out_voice = resolve_output_voice("espeak:en-us+m3", ["espeak"])
    for k in range(0, 120, 2):  # even items read a spoken-QA answer, in the split of the question it answers
        item = make_item("speak", k, 5, ["espeak"], out_voice, 0.3)
        qa = spoken_question(random.Random(f"5:speak:{k}"), ("arithmetic", "counting", "facts", "instructions")[(k // 2) % 4])
        assert item["category"] == "answer" and item["answer"] == qa.answer
        assert item["split"] == split_of(qa.question, 0.3)
    sentence = make_item("speak", 1, 5, ["espeak"], out_voice, 0.3)
    assert sentence["category"] == "sentence" and sentence["split"] == split_of(sentence["answer"], 0.3)

    out = tmp_path / "corpus"
    hours = 0.004
    assert data_cli.main(["synth", "--out", str(out), "--hours", str(hours), "--seed", "2", "--jobs", "1",
                          "--engines", "espeak", "--tasks", "asr", "speak", "--output-voice", "espeak:en-us+m3",
                          "--eval-fraction", "0", "--no-judge", "--no-progress"]) == 0
    assert "spoken answers per task: speak" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    budget = hours * 3600 / 2
    assert summary["hours"]["target_per_task"]["speak"] * 3600 >= budget  # counted on its spoken answers
    assert summary["hours"]["per_task"]["asr"] * 3600 >= budget
    assert "speak" not in summary["hours"]["per_task"] and summary["hours"]["input"] == summary["hours"]["per_task"]["asr"]
    rows = read_manifest(out / "manifests" / "speak_train.jsonl")
    convs = [c for c in read_conversations(out / "finetune" / "train.jsonl") if c["task"] == "speak"]
    assert rows and len(convs) == len(rows) == summary["items"]["accepted_per_task"]["speak"]
    for r, c in zip(rows, convs):
        assert r["audio_path"] is None and r["duration"] == 0 and r["target_text"] == r["answer"]
        assert sf.info(r["target_audio_path"]).samplerate == 24000
        prompt, answer = c["conversation"]
        assert c["task_type"] == "speech2speech"
        assert prompt["role"] == "user" and prompt["message_type"] == "text" and prompt["content"] == r["question"]
        assert any(t.format(text=r["answer"]) == prompt["content"] for t in SPEAK_INSTRUCTIONS)
        assert answer["role"] == "assistant" and answer["message_type"] == "audio-text"
        assert answer["content"][1] == r["answer"] and Path(answer["content"][0]).is_file()


def test_judge_transcript_fits_the_audio():
    """Whisper base loops on unclear speech: this 2.4 s answer of an early kimia-small (unintelligible, about
    five words) came back as 112 words ("5, 5, 6, 6, 6, 8, 8, 8, ..."). The judge's transcript stays within
    what the audio had time to say, and the budget leaves real speech whole."""
    audio, sr = sf.read(Path(__file__).parent / "data" / "judge_loop.flac", dtype="float32")
    assert sr == JUDGE_SAMPLE_RATE
    hyp = Judge("base").transcribe(audio)
    assert 0 < len(hyp.split()) <= 4 * audio.size / sr + 8, hyp
    # the budget is per 30 s window, within Whisper's 448 positions, and more than fast speech needs
    assert token_budget(0.0) == 8 and token_budget(600.0) == token_budget(30.0) <= 440
    assert token_budget(2.0) >= 2 * 2 * 4  # 4 words/s for 2 s, each with a punctuation token
