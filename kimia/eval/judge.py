"""Optional LLM judge through any OpenAI-compatible chat-completions endpoint, with an on-disk cache.

Off by default: a score never depends on a second model unless `--judge` is given. The endpoint and key
come from arguments or the environment (`KIMIA_JUDGE_URL` / `OPENAI_BASE_URL`, `KIMIA_JUDGE_KEY` /
`OPENAI_API_KEY`, `KIMIA_JUDGE_MODEL`, default gpt-4o-mini as in the official kit). Every answer is cached
in a jsonl file keyed by a hash of (endpoint model, messages, temperature), so a re-run or a re-score does
not pay twice and a crashed judging pass resumes.

Prompts follow the kit's two modes: reference QA = a yes/no verdict (the last line of the judge's answer:
"yes" -> 100, "no" -> 0, else invalid), open-ended = a 1-5 rating (first integer in the answer).
Only the standard library is used for HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kimia.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["Judge", "parse_yes_no", "parse_rating"]

SYSTEM_PROMPT = "You are a careful grader of answers given by a speech assistant."
REF_QA_TEMPLATE = ("Question: {question}\nReference answer: {answer}\nCandidate answer: {prediction}\n\n"
                   "Is the candidate answer correct given the reference? Reply with an explanation if needed, "
                   "and end with a last line that is only 'yes' or 'no'.")
OPEN_TEMPLATE = ("Question: {question}\nAnswer: {prediction}\n\nRate the helpfulness, relevance and accuracy of "
                 "the answer on a scale of 1 to 5. Reply with the number only.")
CAPTION_TEMPLATE = ("Reference caption: {answer}\nCandidate caption: {prediction}\n\nRate how well the candidate "
                    "describes the same audio on a scale of 1 to 5. Reply with the number only.")


def parse_yes_no(text: str) -> float | None:
    """100 for a last line 'yes', 0 for 'no', None otherwise (counted as invalid, as the kit does)."""
    lines = [ln.strip().lower().strip(".!*` ") for ln in (text or "").strip().splitlines() if ln.strip()]
    if not lines:
        return None
    return {"yes": 100.0, "no": 0.0}.get(lines[-1])


def parse_rating(text: str, low: int = 1, high: int = 5) -> float | None:
    m = re.search(r"\d+", text or "")
    if not m or not (low <= int(m.group()) <= high):
        return None
    return float(m.group())


class Judge:
    """Scores records with an LLM. `score(records, recipe) -> {index: score or None}` (0-100 or 1-5)."""

    def __init__(self, url: str | None = None, key: str | None = None, model: str | None = None, *,
                 cache: str | Path | None = None, concurrency: int = 4, timeout: float = 60.0):
        self.url = (url or os.environ.get("KIMIA_JUDGE_URL") or os.environ.get("OPENAI_BASE_URL")
                    or "https://api.openai.com/v1").rstrip("/")
        self.key = key or os.environ.get("KIMIA_JUDGE_KEY") or os.environ.get("OPENAI_API_KEY")
        self.model = model or os.environ.get("KIMIA_JUDGE_MODEL") or "gpt-4o-mini"
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.cache_path = Path(cache) if cache else None
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()
        self.calls = 0  # requests actually sent (cache misses)
        if self.cache_path and self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self._cache[rec["key"]] = rec["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def _endpoint(self) -> str:
        return self.url if self.url.endswith("/chat/completions") else f"{self.url}/chat/completions"

    def ask(self, user: str, temperature: float = 0.0) -> str:
        """One chat completion (cached by content)."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        body = {"model": self.model, "messages": messages, "temperature": temperature, "top_p": 0.95,
                "max_tokens": 1024}
        key = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self._endpoint(), data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = json.loads(resp.read().decode("utf-8"))
            answer = payload["choices"][0]["message"]["content"] or ""
        except (urllib.error.URLError, OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise ConfigError(f"judge endpoint {self._endpoint()} failed: {exc}") from exc
        with self._lock:
            self.calls += 1
            self._cache[key] = answer
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n")
        return answer

    def _one(self, rec: dict, metric: str) -> float | None:
        fields = {"question": rec.get("question") or rec.get("real_prompt") or "", "answer": rec.get("answer", ""),
                  "prediction": rec.get("prediction", "")}
        if metric == "ref_qa":
            return parse_yes_no(self.ask(REF_QA_TEMPLATE.format(**fields)))
        if metric == "token_f1":
            return parse_rating(self.ask(CAPTION_TEMPLATE.format(**fields)))
        return parse_rating(self.ask(OPEN_TEMPLATE.format(**fields), temperature=0.5))

    def score(self, records: list[dict], recipe) -> dict[str, float | None]:
        """Judge every record under the recipe's metric; failures of the endpoint raise ConfigError."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            scores = list(pool.map(lambda r: self._one(r, recipe.metric), records))
        logger.info("judge: %d records, %d requests sent (the rest cached)", len(records), self.calls)
        return {str(r["index"]): s for r, s in zip(records, scores)}
