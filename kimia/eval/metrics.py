"""Scores: corpus-level WER/CER, multiple-choice and classification accuracy, a token-F1 for free text.

WER is corpus level like the official kit: Σ edit distance / Σ reference length over a subset, after the
normalization of `kimia.eval.normalizers` (Chinese is tokenized per character, so its "WER" is a CER).
The edit distance is `editdistance` (C, fast) when installed, else jiwer; both compute plain Levenshtein
over token lists.

Answer extraction is rule based, so a score never depends on a second model unless the LLM judge is
switched on explicitly (`kimia.eval.judge`):
- multiple choice: the option letter the model gave ("B", "(B)", "Answer: B", "the answer is B."), else
  the option whose text the prediction contains; no random fallback (an unparsable answer is wrong and
  counted as `unparsed`, so a reader sees how many there were);
- classification: the label set is every distinct reference label of the dataset; the prediction maps to
  the label it names (exact normalized match first, then the earliest whole-word mention).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from kimia.eval.normalizers import normalize, wer_tokens

__all__ = ["edit_distance", "WerStats", "corpus_wer", "extract_choice", "parse_options", "match_label",
           "AccuracyStats", "confusion_counts", "token_f1"]


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two token lists (substitution, insertion, deletion cost 1)."""
    try:
        import editdistance
        return int(editdistance.eval(list(ref), list(hyp)))
    except ImportError:
        if not ref or not hyp:
            return max(len(ref), len(hyp))
        import jiwer
        out = jiwer.process_words(" ".join(ref), " ".join(hyp))
        return out.substitutions + out.deletions + out.insertions


@dataclass
class WerStats:
    """Corpus WER of one subset: `errors / ref_words`, reported ×100 like the kit."""

    errors: int = 0
    ref_words: int = 0
    utterances: int = 0

    def add(self, errors: int, ref_words: int) -> None:
        self.errors += errors
        self.ref_words += ref_words
        self.utterances += 1

    @property
    def wer(self) -> float:
        """WER in percent (0 for an empty subset with no reference words and no errors)."""
        if self.ref_words == 0:
            return 0.0 if self.errors == 0 else 100.0
        return 100.0 * self.errors / self.ref_words

    def to_dict(self) -> dict:
        return {**asdict(self), "wer": round(self.wer, 2)}


def utterance_wer(reference: str, prediction: str, lang: str) -> tuple[int, int, list[str], list[str]]:
    """(errors, reference length, reference tokens, hypothesis tokens) of one item."""
    ref, hyp = wer_tokens(reference, lang), wer_tokens(prediction, lang)
    return edit_distance(ref, hyp), len(ref), ref, hyp


def corpus_wer(pairs: Iterable[tuple[str, str]], lang: str = "en") -> WerStats:
    """Corpus WER over (reference, prediction) pairs in one language."""
    stats = WerStats()
    for ref, hyp in pairs:
        errors, n, _, _ = utterance_wer(ref, hyp, lang)
        stats.add(errors, n)
    return stats


# --------------------------------------------------------------------------------- multiple choice
_OPTION_LINE = re.compile(r"(?:^|\n|\s)\(?([A-J])[\).:]\s*(.+?)(?=\s+\(?[A-J][\).:]\s|\n|[.?!;]\s|[.?!;]?$)")
_LETTER_PATTERNS = [
    re.compile(r"^\s*\(?([A-J])\)?\s*(?:[.:)\-]|$)"),                      # "B", "(B)", "B.", "B: ..."
    re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-J])\)?\b", re.I),  # "the answer is (B)"
]


def parse_options(question: str) -> dict[str, str]:
    """Lettered options embedded in a question ("A. cat\\nB. dog" or "(A) cat (B) dog") -> {letter: text}."""
    return {m.group(1): m.group(2).strip() for m in _OPTION_LINE.finditer(question)}


def extract_choice(prediction: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter a free-text answer picks, or None when it cannot be told (no random fallback)."""
    text = (prediction or "").strip()
    letters = set(options) if options else set("ABCDEFGHIJ")
    for pat in _LETTER_PATTERNS:
        m = pat.search(text)
        if m and m.group(1) in letters:
            return m.group(1)
    if options:  # the option text itself: earliest mention wins, the longer text on a tie
        low = normalize(text, "other")
        best = None
        for letter, opt in options.items():
            norm = normalize(opt, "other")
            m = re.search(rf"(?<!\w){re.escape(norm)}(?!\w)", low) if norm else None
            if m and (best is None or (m.start(), -len(norm)) < best[0]):
                best = ((m.start(), -len(norm)), letter)
        if best:
            return best[1]
    return None


def answer_letter(answer: str, options: dict[str, str] | None = None) -> str | None:
    """The reference letter: the answer is a letter ("B", "(B)") or one of the option texts."""
    return extract_choice(answer, options)


# ----------------------------------------------------------------------------------- classification
def match_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The label a prediction names: exact normalized match, else the earliest whole-word mention."""
    norm = {lab: normalize(lab, "other") for lab in labels}
    pred = normalize(prediction or "", "other")
    for lab, n in norm.items():
        if n and n == pred:
            return lab
    best, best_pos = None, None
    for lab, n in sorted(norm.items(), key=lambda kv: -len(kv[1])):
        if not n:
            continue
        m = re.search(rf"(?<!\w){re.escape(n)}(?!\w)", pred)
        if m and (best_pos is None or m.start() < best_pos):
            best, best_pos = lab, m.start()
    return best


@dataclass
class AccuracyStats:
    """Accuracy of one subset in percent; `unparsed` predictions count as wrong and are reported."""

    correct: int = 0
    total: int = 0
    unparsed: int = 0

    def add(self, ok: bool, parsed: bool = True) -> None:
        self.total += 1
        self.correct += int(ok)
        self.unparsed += int(not parsed)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": round(self.accuracy, 2)}


@dataclass
class Confusion:
    """Counts of (reference label, predicted label); None predictions are the column 'unparsed'."""

    labels: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def add(self, ref: str, pred: str | None) -> None:
        self.counts[(ref, pred if pred is not None else "<unparsed>")] += 1

    def matrix(self) -> tuple[list[str], list[str], list[list[int]]]:
        """(row labels, column labels, counts[row][col]); rows = references, columns = predictions."""
        rows = sorted({r for r, _ in self.counts} | set(self.labels))
        cols = rows + (["<unparsed>"] if any(p == "<unparsed>" for _, p in self.counts) else [])
        return rows, cols, [[self.counts.get((r, c), 0) for c in cols] for r in rows]


def confusion_counts(pairs: Iterable[tuple[str, str | None]], labels: Sequence[str] = ()) -> Confusion:
    conf = Confusion(labels=list(labels))
    for ref, pred in pairs:
        conf.add(ref, pred)
    return conf


def token_f1(reference: str, prediction: str, lang: str = "en") -> float:
    """Bag-of-tokens F1 (SQuAD style) in [0, 1] after WER normalization: a judge-free score for free text."""
    ref, hyp = Counter(wer_tokens(reference, lang)), Counter(wer_tokens(prediction, lang))
    common = sum((ref & hyp).values())
    if not ref or not hyp:
        return float(ref == hyp)
    if common == 0:
        return 0.0
    p, r = common / sum(hyp.values()), common / sum(ref.values())
    return 2 * p * r / (p + r)
