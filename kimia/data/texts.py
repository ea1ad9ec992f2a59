"""Offline text sources and the task templates of the synthetic corpus.

Text comes only from what a Debian machine ships (the fortune cookie files, WordNet's usage examples and the
system word list) plus templates written here (arithmetic, counting, simple facts, instructions, dialogues).
Everything is driven by an explicit `random.Random`, so one seed always gives the same texts.

The held-out split is decided by the *sentence*: `split_of(text)` hashes the normalised sentence, so the
same sentence always lands in the same split whatever task, voice or seed uses it, and no evaluation sentence
is ever spoken in the training split.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from kimia.errors import ConfigError

logger = logging.getLogger(__name__)

FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortune", "/usr/share/fortunes")
WORDNET_DIRS = ("/usr/share/wordnet",)  # Debian wordnet-base: data.{noun,verb,adj,adv}
DEFAULT_TEXT_SOURCES = ("fortune",)  # read-speech sentence pools of a corpus unless it names others
WORD_LISTS = ("/usr/share/dict/american-english", "/usr/share/dict/british-english", "/usr/share/dict/words")

ASR_INSTRUCTIONS = (
    "Please transcribe the spoken content into written text.",
    "Please transcribe this audio.",
    "Transcribe the speech.",
    "Write down what is said in this recording.",
    "What does the speaker say? Give the exact words.",
    "Convert this speech to text.",
)

SPEAK_INSTRUCTIONS = (  # the speak task: {text} is what the answer says, word for word
    "Read this aloud: {text}",
    "Say the following sentence: {text}",
    "Please read out: {text}",
    "Speak this text: {text}",
    "Read the following out loud. {text}",
)

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words of an integer in [-999999, 999999] ("one hundred twenty three"; no "and")."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    if n < 1_000_000:
        rest = n % 1000
        return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))
    raise ValueError(f"number_words supports |n| < 1000000, got {n}")


def normalize_text(text: str) -> str:
    """Lower-case words, digits spelled out, symbols read aloud, punctuation dropped (for WER and hashing)."""
    t = text.lower().replace("’", "'")
    t = re.sub(r"(?<=\d),(?=\d{3})", "", t)  # 1,000 -> 1000
    t = t.replace("+", " plus ").replace("×", " times ").replace("=", " equals ").replace("%", " percent ")
    t = re.sub(r"(?<=\d) - (?=\d)", " minus ", t)  # "7 - 2"; but "5-4-3" is a spoken list
    t = re.sub(r"(?<=\d)-(?=\d)", " ", t)
    t = re.sub(r"(?<=\d)\s*x\s*(?=\d)", " times ", t)
    t = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " " if len(m.group()) <= 6 else m.group(), t)
    t = re.sub(r"[^a-z0-9' ]+", " ", t)
    t = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", t)
    return " ".join(t.split())


def split_of(sentence: str, eval_fraction: float) -> str:
    """'eval' or 'train' for a sentence, from a hash of its normalised form (independent of the seed)."""
    h = int.from_bytes(hashlib.sha1(normalize_text(sentence).encode()).digest()[:4], "big") / 2**32
    return "eval" if h < eval_fraction else "train"


# ----------------------------------------------------------------------------------------- sources
_SENTENCE_OK = re.compile(r"^[A-Za-z][A-Za-z ,.'?!;:-]*[.?!]?$")
_FALLBACK_SUBJECTS = ("the old man", "a small dog", "my sister", "the teacher", "our neighbour", "the young girl",
                      "a tall farmer", "the little bird", "his friend", "the baker")
_FALLBACK_VERBS = ("found", "painted", "carried", "opened", "washed", "bought", "dropped", "cleaned", "moved", "sold")
_FALLBACK_OBJECTS = ("a red box", "the wooden door", "a green apple", "the heavy bag", "a blue cup",
                     "the broken chair", "a warm coat", "the long rope", "the square table", "the yellow kite")
_FALLBACK_PLACES = ("in the morning", "near the river", "after dinner", "at the market", "before the rain",
                    "in the garden", "on the way home", "at school", "by the lake", "late at night")


def _readable(s: str) -> bool:
    """A sentence both pools keep: 4..18 words, letters and plain punctuation, no all-capitals word longer than
    one letter (acronyms and shouting read badly)."""
    words = s.split()
    return (4 <= len(words) <= 18 and bool(_SENTENCE_OK.match(s))
            and not any(len(w.strip(",.'?!;:-")) > 1 and w.strip(",.'?!;:-").isupper() for w in words))


@lru_cache(maxsize=1)
def fortune_sentences() -> tuple[str, ...]:
    """Clean short English sentences (4..18 words, letters and plain punctuation only) from fortune files."""
    out: set[str] = set()
    for d in FORTUNE_DIRS:
        root = Path(d)
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*")):
            if not f.is_file() or f.suffix in (".dat", ".u8") or f.is_symlink() or "off" in f.parts:
                continue
            try:
                raw = f.read_text(encoding="utf-8", errors="ignore")
            except OSError:
                continue
            for cookie in raw.split("\n%\n"):
                if "--" in cookie or "\t" in cookie:
                    continue  # attributions, quoted dialogue, poems
                flat = " ".join(cookie.split())
                out.update(x for x in re.split(r"(?<=[.?!])\s+", flat) if _readable(x))
    return tuple(sorted(out))


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """Common lower-case words (3..8 letters, no apostrophes) from the system word list, or a small fallback."""
    for p in WORD_LISTS:
        path = Path(p)
        if path.is_file():
            words = {w.strip() for w in path.read_text(encoding="utf-8", errors="ignore").splitlines()}
            good = sorted(w for w in words if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 8)
            if good:
                return tuple(good)
    return tuple(sorted({w.split()[-1] for w in _FALLBACK_OBJECTS}))


def template_sentence(rng: random.Random) -> str:
    """A simple generated sentence, used when no fortune files are installed (and for variety)."""
    s = f"{rng.choice(_FALLBACK_SUBJECTS)} {rng.choice(_FALLBACK_VERBS)} {rng.choice(_FALLBACK_OBJECTS)} " \
        f"{rng.choice(_FALLBACK_PLACES)}."
    return s[0].upper() + s[1:]


@lru_cache(maxsize=1)
def wordnet_sentences() -> tuple[str, ...]:
    """WordNet 3.0's usage examples (the quoted phrases of its glosses, ~33k) that pass `_readable`
    (4..18 words, letters and plain punctuation), first letter upper-cased and a full stop added when none ends
    them. Broad vocabulary, everyday syntax: "He pulled down the bill of his cap and trudged ahead." """
    out: set[str] = set()
    for d in WORDNET_DIRS:
        for pos in ("noun", "verb", "adj", "adv"):
            path = Path(d) / f"data.{pos}"
            if not path.is_file():
                continue
            for line in path.read_text(encoding="latin-1").splitlines():
                if line.startswith(" ") or "|" not in line:
                    continue  # the licence header; synset lines are "offset ... | gloss; \"example\"; ..."
                for q in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                    s = " ".join(q.split())
                    s = s[:1].upper() + s[1:]
                    if s and s[-1] not in ".?!":
                        s += "."
                    if _readable(s):
                        out.add(s)
    return tuple(sorted(out))


@lru_cache(maxsize=1)
def wordnet_meanings(min_count: int = 5) -> tuple[tuple[str, str], ...]:
    """(noun, definition) of WordNet 3.0's common one-word nouns: those whose first sense is tagged at least
    `min_count` times in WordNet's sense-frequency list (cntlist.rev; ~2.7k nouns at 5), with that sense's
    definition (its gloss up to the first ';', examples dropped) when it is a plain phrase of at most 16 words
    (~2.2k kept). Empty when wordnet-base is not installed."""
    for d in WORDNET_DIRS:
        root = Path(d)
        if not all((root / f).is_file() for f in ("cntlist.rev", "index.noun", "data.noun")):
            continue
        common: set[str] = set()
        for line in (root / "cntlist.rev").read_text(encoding="latin-1").splitlines():
            key, sense, count = line.split()  # "hammer%1:06:00:: 1 12": noun (1:) sense 1, tagged 12 times
            lemma, _, kind = key.partition("%")
            if kind.startswith("1:") and sense == "1" and int(count) >= min_count and lemma.isalpha() \
                    and lemma.islower():
                common.add(lemma)
        first: dict[str, int] = {}  # noun -> byte offset of its most frequent synset in data.noun
        for line in (root / "index.noun").read_text(encoding="latin-1").splitlines():
            f = line.split()
            if not line.startswith(" ") and f and f[0] in common:
                first[f[0]] = int(f[4 + int(f[3]) + 2])  # lemma pos synsets pointers <ptrs> senses tagged offs
        out = []
        with (root / "data.noun").open("rb") as fh:
            for noun, off in sorted(first.items()):
                fh.seek(off)
                gloss = fh.readline().decode("latin-1").split("|", 1)[1]
                definition = " ".join(gloss.split(";")[0].split()).strip()
                if definition and _SENTENCE_OK.match(definition) and len(definition.split()) <= 16:
                    out.append((noun, definition.rstrip(".")))
        return tuple(out)
    return ()


class TextSource(NamedTuple):
    """A read-speech sentence pool: its loader, the Debian package that installs it, and whether a corpus that
    names it may go on without it (template sentences then fill in)."""

    load: Callable[[], tuple[str, ...]]
    package: str
    optional: bool = False


TEXT_SOURCES = {"fortune": TextSource(fortune_sentences, "fortunes", optional=True),
                "wordnet": TextSource(wordnet_sentences, "wordnet-base")}


@lru_cache(maxsize=8)
def sentence_pool(sources: tuple[str, ...] = DEFAULT_TEXT_SOURCES) -> tuple[str, ...]:
    """The read-speech sentences of `sources` (names of TEXT_SOURCES), joined. An optional source (fortune) may
    be empty (the corpus then reads template sentences only); any other source named must be installed."""
    bad = [x for x in sources if x not in TEXT_SOURCES]
    if bad or not sources:
        raise ConfigError(f"unknown text source(s) {bad or '(none)'}; known: {', '.join(TEXT_SOURCES)}")
    out: set[str] = set()
    for name in sources:
        src = TEXT_SOURCES[name]
        got = src.load()
        if not got and not src.optional:
            raise ConfigError(f"text source {name!r} has no sentences here: install the Debian package "
                              f"{src.package} (scripts/setup-data-system.sh)")
        out.update(got)
    return tuple(sorted(out))


def asr_sentence(rng: random.Random, sources: tuple[str, ...] = DEFAULT_TEXT_SOURCES) -> str:
    """A read-speech sentence: 4 in 5 from the pool of `sources` (when it has any), else a template one."""
    pool = sentence_pool(sources)
    if pool and rng.random() < 0.8:
        return rng.choice(pool)
    return template_sentence(rng)


# ------------------------------------------------------------------------------------ spoken QA
@dataclass
class QA:
    """One question/answer pair: `question` is spoken, `answer` is the full reply, `key` the short answer."""

    category: str
    question: str
    answer: str
    key: str
    turns: list[tuple[str, str]] = field(default_factory=list)  # earlier (user, assistant) turns (dialogues)
    qkey: str = ""  # words the judge must hear in the spoken question (its numbers, the named word)
    turn_keys: list[str] = field(default_factory=list)  # the same for each earlier user turn


_FACTS = (
    ("What color is the sky on a clear day?", "The sky is blue.", "blue"),
    ("How many days are in a week?", "There are seven days in a week.", "seven"),
    ("How many legs does a spider have?", "A spider has eight legs.", "eight"),
    ("What is the capital of France?", "The capital of France is Paris.", "paris"),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "cold"),
    ("How many hours are in a day?", "There are twenty four hours in a day.", "twenty four"),
    ("What color is grass?", "Grass is green.", "green"),
    ("How many months are in a year?", "There are twelve months in a year.", "twelve"),
    ("What animal says moo?", "A cow says moo.", "cow"),
    ("What is frozen water called?", "Frozen water is called ice.", "ice"),
    ("How many legs does a dog have?", "A dog has four legs.", "four"),
    ("What is the opposite of up?", "The opposite of up is down.", "down"),
    ("Which planet do we live on?", "We live on the Earth.", "earth"),
    ("What color is a banana?", "A banana is yellow.", "yellow"),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour.", "sixty"),
    ("What do bees make?", "Bees make honey.", "honey"),
    ("What is the opposite of day?", "The opposite of day is night.", "night"),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels.", "two"),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "rome"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "tokyo"),
    ("How many sides does a triangle have?", "A triangle has three sides.", "three"),
    ("What color is snow?", "Snow is white.", "white"),
    ("What is the largest ocean?", "The largest ocean is the Pacific Ocean.", "pacific"),
    ("What do cats drink?", "Cats drink milk and water.", "milk"),
)
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
_MONTHS = ("january february march april may june july august september october november "
           "december").split()
_NAMES = ("Alice", "Peter", "Maria", "John", "Emma", "David", "Sarah", "Tom", "Anna", "James", "Laura", "Mark")
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown")
_OPS = (("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b))


def _arith(rng: random.Random) -> tuple[str, str, int]:
    name, fn = rng.choice(_OPS)
    if name == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 10)
    elif name == "minus":
        a = rng.randint(2, 20)
        b = rng.randint(1, a)
    else:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
    return f"{number_words(a)} {name} {number_words(b)}", name, fn(a, b)


def _sentence(s: str) -> str:
    return s[0].upper() + s[1:]


def spoken_question(rng: random.Random, category: str | None = None) -> QA:
    """A question to be spoken, with its text answer. Categories: arithmetic, counting, facts, instructions."""
    category = category or rng.choice(("arithmetic", "counting", "facts", "instructions"))
    if category == "arithmetic":
        expr, _, value = _arith(rng)
        v = number_words(value)
        return QA(category, f"What is {expr}?", _sentence(f"{expr} is {v}."), v, qkey=expr)
    if category == "counting":
        kind = rng.randrange(4)
        if kind == 0:
            a = rng.randint(1, 5)
            b = a + rng.randint(3, 9)
            seq = ", ".join(number_words(i) for i in range(a, b + 1))
            return QA(category, f"Count from {number_words(a)} to {number_words(b)}.", _sentence(seq + "."), seq,
                      qkey=f"{number_words(a)} {number_words(b)}")
        if kind == 1:
            b = rng.randint(1, 4)
            a = b + rng.randint(3, 7)
            seq = ", ".join(number_words(i) for i in range(a, b - 1, -1))
            return QA(category, f"Count backwards from {number_words(a)} to {number_words(b)}.",
                      _sentence(seq + "."), seq, qkey=f"{number_words(a)} {number_words(b)}")
        if kind == 2:
            n = rng.randint(1, 98)
            return QA(category, f"What number comes after {number_words(n)}?",
                      _sentence(f"{number_words(n + 1)} comes after {number_words(n)}."), number_words(n + 1),
                      qkey=number_words(n))
        words = rng.sample(word_list(), rng.randint(2, 6))
        n = len(words)
        return QA(category, f"How many words are in this list: {', '.join(words)}?",
                  _sentence(f"there are {number_words(n)} words."), number_words(n), qkey=" ".join(words))
    if category == "facts":
        if rng.random() < 0.3:
            seq = rng.choice((_DAYS, _MONTHS))
            i = rng.randrange(len(seq))
            nxt = seq[(i + 1) % len(seq)]
            what = "day" if seq is _DAYS else "month"
            return QA(category, f"Which {what} comes after {seq[i].capitalize()}?",
                      f"{nxt.capitalize()} comes after {seq[i].capitalize()}.", nxt, qkey=seq[i])
        q, a, k = rng.choice(_FACTS)
        return QA(category, q, a, k)
    if category == "instructions":
        kind = rng.randrange(3)
        if kind == 0:
            w = rng.choice(word_list())
            n = rng.randint(2, 4)
            return QA(category, f"Say the word {w} {number_words(n)} times.",
                      _sentence(" ".join([w] * n) + "."), " ".join([w] * n), qkey=f"{w} {number_words(n)}")
        if kind == 1:
            s = template_sentence(rng)
            return QA(category, f"Repeat after me: {s}", s, normalize_text(s), qkey=normalize_text(s))
        a, b = rng.sample(_COLORS, 2)
        return QA(category, f"Which word comes first in the alphabet, {a} or {b}?",
                  _sentence(f"{min(a, b)} comes first."), min(a, b), qkey=f"{a} {b}")
    raise ValueError(f"unknown spoken question category {category!r}")


MEANING_QUESTIONS = ("What does the word {w} mean?", "What is the meaning of the word {w}?",
                     "Tell me what {w} means.", "Can you explain what {w} means?")


def meaning_question(rng: random.Random) -> QA:
    """A spoken question about what a common English noun means (WordNet), answered with its definition: the
    `meaning` task, general questions over a ~2.2k-word vocabulary, unlike the corpus' few dozen facts."""
    pool = wordnet_meanings()
    if not pool:
        raise ConfigError("the meaning task needs WordNet: install the Debian package wordnet-base "
                          "(scripts/setup-data-system.sh)")
    word, definition = rng.choice(pool)
    return QA("meaning", rng.choice(MEANING_QUESTIONS).format(w=word), _sentence(f"{word} means {definition}."),
              "", qkey=word)


def dialogue(rng: random.Random) -> QA:
    """A two-turn spoken dialogue; the final question depends on the first turn."""
    kind = rng.randrange(3)
    if kind == 0:
        name = rng.choice(_NAMES)
        t1 = (f"Hello, my name is {name}.", f"Nice to meet you, {name}.")
        return QA("memory", "What is my name?", f"Your name is {name}.", name.lower(), [t1], turn_keys=[name])
    if kind == 1:
        color = rng.choice(_COLORS)
        t1 = (f"My favourite color is {color}.", f"{color.capitalize()} is a lovely color.")
        return QA("memory", "What is my favourite color?", f"Your favourite color is {color}.", color, [t1],
                  turn_keys=[color])
    a, b = rng.randint(1, 10), rng.randint(1, 10)
    c = rng.randint(1, 9)
    t1 = (f"What is {number_words(a)} plus {number_words(b)}?",
          _sentence(f"{number_words(a)} plus {number_words(b)} is {number_words(a + b)}."))
    return QA("arithmetic", f"Now add {number_words(c)} to that.",
              _sentence(f"{number_words(a + b)} plus {number_words(c)} is {number_words(a + b + c)}."),
              number_words(a + b + c), [t1], qkey=number_words(c),
              turn_keys=[f"{number_words(a)} {number_words(b)}"])


STYLE_QUESTIONS = {
    "gender": ("Is the speaker a man or a woman?", {"male": "The speaker is a man.", "female": "The speaker is a woman."}),
    "speed": ("Is the speech slow, normal or fast?",
              {"slow": "The speech is slow.", "normal": "The speech is at a normal speed.",
               "fast": "The speech is fast."}),
    "pitch": ("Is the voice low, normal or high pitched?",
              {"low": "The voice is low pitched.", "normal": "The voice has a normal pitch.",
               "high": "The voice is high pitched."}),
}

__all__ = ["ASR_INSTRUCTIONS", "DEFAULT_TEXT_SOURCES", "QA", "STYLE_QUESTIONS", "TEXT_SOURCES", "TextSource", "asr_sentence",
           "dialogue", "fortune_sentences", "normalize_text", "number_words", "sentence_pool", "split_of",
           "spoken_question", "template_sentence", "word_list", "wordnet_sentences"]
