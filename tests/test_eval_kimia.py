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
from kimia.eval.runner import KimiAudioPredictor, finished_predictions, run_dataset
from tests.tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", detokenizer=False)
    return KimiAudioPredictor(str(folder), device="cpu")


class Counting:
    """Wraps the real predictor: counts the items it was asked for, can stop like a kill after N batches."""

    def __init__(self, inner, stop_after_batches=None):
        self.inner, self.stop, self.batches, self.items = inner, stop_after_batches, 0, []

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
