"""The model card's Evaluation table: the headline figure of each eval result is judged against its floor."""
from kimia.train.pipeline import eval_table, headline


def test_headline_picks_the_figure_the_floors_use():
    assert headline({"errors": 313, "ref_words": 308, "wer": 101.62}) == 101.62
    assert headline({"correct": 3, "total": 5, "accuracy": 60.0}) == 60.0
    assert headline({"total": 10, "score": 90.0}) == 90.0
    assert headline(7.5) == 7.5


def test_eval_table_marks_floors():
    info = {"asr": {"recipe": "asr", "metric": "wer", "value": {"wer": 8.0, "errors": 8}, "items": 30},
            "asterisk": {"recipe": "asr", "metric": "wer", "value": {"wer": 113.4}, "items": 100},
            "sound": {"recipe": "sound_event", "metric": "label", "value": {"accuracy": 92.0}, "items": 50},
            "demo": {"question": "q.flac", "text": "Four.", "audio_seconds": 1.0, "seconds": 0.5, "first_audio_s": 0.2}}
    rows = {line.split("|")[1].strip(): line for line in eval_table(info).splitlines() if line.startswith("| ")}
    assert "<= 10: met" in rows["asr"] and "| 8.0 |" in rows["asr"]
    assert "<= 25: not met" in rows["asterisk"]
    assert ">= 90: met" in rows["sound"]
    assert "Demo question `q.flac`" in eval_table(info)


def test_reproduce_lists_a_continued_candidates_commands_in_order(tmp_path):
    from kimia.train.pipeline import Pipeline, load_pipeline_config

    plain = Pipeline(load_pipeline_config(None, [f"work_dir={tmp_path}"]))
    assert plain._card_commands()[-2] == "kimia train pipeline --config <pipeline.yaml>"
    steps = ["kimia train pipeline --config a.yaml", "kimia train pipeline --config b.yaml --force corpus lm"]
    cont = Pipeline(load_pipeline_config(None, [f"work_dir={tmp_path}", f"reproduce={steps}"]))
    cmds = cont._card_commands()
    assert cmds[0].startswith("bash scripts/setup-system.sh") and "pip install" in cmds[1]
    assert cmds[2:4] == steps and cmds[4].startswith("# rerun") and len(cmds) == 5  # commands kept verbatim
