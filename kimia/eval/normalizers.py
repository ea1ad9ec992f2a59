"""Text normalization and tokenization for WER/CER, following the official evaluation kit's rules.

A WER figure is only comparable with published ones when both sides go through the same normalization,
so this module reproduces the kit's pipeline (KIMI_AUDIO.md §8) step by step:

1. `remove_special`: drop `<|...|>` tags, collapse whitespace, remove spaces before ``!,.?;:``; for
   Chinese remove all whitespace.
2. Language normalization: English = Whisper's `EnglishTextNormalizer` (spelling map, numbers to digits,
   contractions) followed by Whisper's `BasicTextNormalizer`; Chinese = number/date/money/percent/phone
   normalization into Chinese words, then every punctuation or symbol mark becomes a space; any other
   language = the basic normalizer.
3. `tokenize`: sacrebleu's "zh" scheme (each CJK character is one token, the 13a rules for the rest),
   lowercased, tokens made only of punctuation dropped.

Whisper's normalizers come from the `whisper-normalizer` package and the Chinese number reading from
`cn2an`; both are imported lazily so the rest of kimia works without the `eval` extra.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from kimia.errors import ConfigError

__all__ = ["remove_special", "normalize", "tokenize", "wer_tokens", "detect_language", "is_cjk", "SUPPORTED_LANGUAGES"]

SUPPORTED_LANGUAGES = ("en", "zh", "yue", "other")

_SPECIAL_TAG = re.compile(r"<\|.*?\|>")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([!,.?;:])")
_SPACES = re.compile(r"\s+")


def is_cjk(ch: str) -> bool:
    """True for a CJK ideograph (the characters sacrebleu's zh tokenizer splits one by one)."""
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2EBEF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
            or 0x3000 <= cp <= 0x303F or 0xFF00 <= cp <= 0xFFEF or 0x3040 <= cp <= 0x30FF)


def detect_language(text: str) -> str:
    """'zh' when the text holds any CJK ideograph, else 'en' (used when neither item nor recipe says)."""
    return "zh" if any(0x4E00 <= ord(c) <= 0x9FFF for c in text) else "en"


def remove_special(text: str, lang: str = "en") -> str:
    """Step 1 of the kit: strip `<|...|>` tags and tidy whitespace (all of it removed for Chinese)."""
    text = _SPECIAL_TAG.sub(" ", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text).lstrip()
    if lang == "zh":
        text = _SPACES.sub("", text)
    return text


@functools.lru_cache(maxsize=None)
def _whisper_normalizers():
    try:
        from whisper_normalizer.basic import BasicTextNormalizer
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("WER normalization needs the `whisper-normalizer` package "
                          "(pip install 'kimia[eval]')") from exc
    return EnglishTextNormalizer(), BasicTextNormalizer()


# ------------------------------------------------------------------------------------------- Chinese
_DIGITS_ZH = "零一二三四五六七八九"
_PHONE = re.compile(r"(?<![\d.])(?:\+?86[- ]?)?(1[3-9]\d{9}|0\d{2,3}-?\d{7,8}|\d{7,})(?![\d.])")
_MONEY_PREFIX = re.compile(r"[¥￥]\s*(\d+(?:\.\d+)?)")
_DOLLAR_PREFIX = re.compile(r"\$\s*(\d+(?:\.\d+)?)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _read_digits(m: re.Match) -> str:
    return "".join(_DIGITS_ZH[int(d)] for d in m.group(0) if d.isdigit())


def normalize_chinese_numbers(text: str) -> str:
    """Numbers, dates, money, percentages, fractions and phone numbers to Chinese words.

    Long digit runs (phone numbers, ids) are read digit by digit as cn_tn does; years before 年 are read
    digit by digit and other numbers as cardinals (cn2an's 'an2cn' transform covers dates, %, fractions,
    decimals and signs).
    """
    try:
        import cn2an
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("Chinese WER normalization needs the `cn2an` package (pip install 'kimia[eval]')") from exc
    text = _THOUSANDS.sub("", text)
    text = _PHONE.sub(_read_digits, text)
    text = _MONEY_PREFIX.sub(r"\1元", text)
    text = _DOLLAR_PREFIX.sub(r"\1美元", text)
    if not any(c.isdigit() for c in text):
        return text
    try:
        return cn2an.transform(text, "an2cn")
    except Exception:  # cn2an rejects some odd digit patterns: fall back to digit-by-digit reading
        return re.sub(r"\d+", _read_digits, text)


def _punct_to_space(text: str) -> str:
    return "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)


def normalize_chinese(text: str) -> str:
    """cn_tn-like normalization: numbers into words, then every punctuation/symbol mark becomes a space."""
    text = normalize_chinese_numbers(text)
    return _SPACES.sub(" ", _punct_to_space(text)).strip()


# ------------------------------------------------------------------------------------------- pipeline
def normalize(text: str, lang: str = "en") -> str:
    """Steps 1-2: the language-specific normalized string (not yet tokenized)."""
    if lang not in SUPPORTED_LANGUAGES:
        lang = "other"
    text = remove_special(text or "", lang)
    english, basic = _whisper_normalizers()
    if lang == "en":
        return basic(english(text))
    if lang == "zh":
        return normalize_chinese(text)
    if lang == "yue":
        try:
            import zhconv  # optional: traditional -> simplified as the kit does
            text = zhconv.convert(text, "zh-cn")
        except ImportError:
            pass
    return basic(text)


_13A_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_13A_PERIOD_COMMA = re.compile(r"([^0-9])([\.,])")
_13A_COMMA_PERIOD = re.compile(r"([\.,])([^0-9])")
_13A_DASH = re.compile(r"([0-9])(-)")


def _tokenize_13a(text: str) -> str:
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} "
    text = _13A_PUNCT.sub(r" \1 ", text)
    text = _13A_PERIOD_COMMA.sub(r"\1 \2 ", text)
    text = _13A_COMMA_PERIOD.sub(r" \1 \2", text)
    text = _13A_DASH.sub(r"\1 \2 ", text)
    return text


def _is_punct_token(tok: str) -> bool:
    return all(unicodedata.category(c)[0] in "PS" for c in tok)


def tokenize(normalized: str) -> list[str]:
    """Step 3: CJK characters one token each, 13a rules elsewhere; lowercase; punctuation tokens dropped."""
    spaced = "".join(f" {c} " if is_cjk(c) else c for c in normalized)
    toks = _tokenize_13a(spaced).lower().split()
    return [t for t in toks if not _is_punct_token(t)]


def wer_tokens(text: str, lang: str = "en") -> list[str]:
    """The full pipeline: the token list a reference or hypothesis contributes to the edit distance."""
    return tokenize(normalize(text, lang))
