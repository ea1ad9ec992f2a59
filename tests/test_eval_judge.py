"""LLM judge client against a local OpenAI-compatible endpoint (a tiny HTTP server in a thread).

The server grades by a fixed rule so the expected scores are known; under test are the request format,
the verdict parsing, the cache (a second pass sends no request) and the wiring into `score_run`.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import soundfile as sf

from kimia.errors import ConfigError
from kimia.eval.datasets import load_manifest
from kimia.eval.judge import Judge, parse_rating, parse_yes_no
from kimia.eval.recipes import load_recipe
from kimia.eval.report import score_run
from kimia.eval.runner import run_dataset


class _Handler(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        user = body["messages"][-1]["content"]
        if "Reference answer:" in user:
            ref = user.split("Reference answer:")[1].split("\n")[0].strip().lower()
            cand = user.split("Candidate answer:")[1].split("\n")[0].strip().lower()
            answer = "Reasoning here.\nyes" if ref in cand else ("Reasoning.\nno" if cand else "unsure")
        else:
            answer = "4"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    _Handler.requests = []
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_parsers():
    assert parse_yes_no("The answer matches.\nYes.") == 100.0
    assert parse_yes_no("no") == 0.0
    assert parse_yes_no("yes\nmaybe") is None and parse_yes_no("") is None
    assert parse_rating("Score: 4") == 4.0 and parse_rating("9") is None and parse_rating("none") is None


class _Pred:
    def __init__(self, answers):
        self.answers = answers

    def predict_batch(self, items, recipe):
        return [self.answers[it.index] for it in items]


def test_judge_scores_ref_qa_and_caches(tmp_path, endpoint):
    sf.write(tmp_path / "a.wav", np.zeros(4000, np.float32), 16000)
    rows = [{"index": i, "audio_path": "a.wav", "question": "What falls?", "answer": a, "subset": "s"}
            for i, a in enumerate(["rain", "snow", "hail"])]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    man = load_manifest(tmp_path / "qa.jsonl")
    run_dataset(man, _Pred({"0": "It is rain.", "1": "hail", "2": ""}), load_recipe("audio_qa"), tmp_path / "run",
                progress=False)
    cache = tmp_path / "cache.jsonl"
    judge = Judge(endpoint, key="sk-test", model="judge-model", cache=cache, concurrency=2)
    res = score_run(tmp_path / "run", dataset="qa", model="m", judge=judge, plots=False)
    # rain -> yes (100), snow vs hail -> no (0), empty -> "unsure" = invalid
    assert res["performance"]["overall"] == {"total": 3, "invalid": 1, "score": 50.0}
    assert judge.calls == 3 and len(_Handler.requests) == 3
    req = _Handler.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0.0
    again = Judge(endpoint, key="sk-test", model="judge-model", cache=cache)
    res2 = score_run(tmp_path / "run", dataset="qa", model="m", judge=again, plots=False)
    assert res2["performance"] == res["performance"]
    assert again.calls == 0 and len(_Handler.requests) == 3  # everything came from the cache


def test_without_judge_ref_qa_falls_back_to_containment(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(4000, np.float32), 16000)
    rows = [{"index": i, "audio_path": "a.wav", "question": "q", "answer": a, "subset": "s"}
            for i, a in enumerate(["rain", "snow"])]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dataset(load_manifest(tmp_path / "qa.jsonl"), _Pred({"0": "Rain!", "1": "snowy"}), load_recipe("audio_qa"),
                tmp_path / "run", progress=False)
    res = score_run(tmp_path / "run", dataset="qa", model="m", plots=False)
    assert res["performance"]["overall"] == {"total": 2, "invalid": 0, "score": 50.0}


def test_unreachable_endpoint_is_a_config_error():
    judge = Judge("http://127.0.0.1:9/v1", key="k", timeout=2)
    with pytest.raises(ConfigError, match="judge endpoint"):
        judge.ask("hello")
