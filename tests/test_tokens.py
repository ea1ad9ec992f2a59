"""Special-token table and text tokenizer: release ids, fixture vocabularies, round trips, no injection."""

from __future__ import annotations

import json

import pytest

from kimia.errors import ConfigError
from kimia.tokens import (
    NUM_SPECIALS,
    SpecialTokens,
    TextTokenizer,
    Tokenizer,
    load_tokenizer,
    release_special_table,
)
from tests.reference import fixture_params, require


@pytest.fixture(scope="module")
def release_tok() -> TextTokenizer:
    return TextTokenizer.release()


def test_release_encoding_matches_qwen2(release_tok):
    assert release_tok.encode("Hello world, 今天天气很好。") == [9707, 1879, 11, 220, 100644, 104307, 101243, 1773]


def test_release_special_ids():
    sp = SpecialTokens.release()
    # ids of KIMI_AUDIO.md §3.3
    assert (sp.bos, sp.eos, sp.msg_end) == (151643, 151644, 151645)
    assert (sp.generic_user_msg_start, sp.generic_assistant_msg_start) == (151646, 151647)
    assert (sp.media_begin, sp.media_end) == (151661, 151663)
    assert (sp.text_blank, sp.text_eos) == (151666, 151667)
    assert (sp.user_msg_start, sp.assistant_msg_start) == (151670, 151671)
    assert (sp.speech_ct, sp.speech_ctd) == (151675, 151676)
    assert sp.pad == 152063
    assert (sp.token_offset, sp.audio_delay) == (152064, 6)
    assert sp.audio_end_ids == (151645, 151663)
    table = release_special_table()
    assert len(table) == NUM_SPECIALS and len(set(table.values())) == NUM_SPECIALS
    assert table["[EOT]"] == 151652 and table["<|reserved_token_0|>"] == 151648
    assert table["<|reserved_token_20|>"] == 151677


def test_release_tokenizer_vocab(release_tok):
    assert release_tok.n_vocab == 152064
    assert isinstance(release_tok, Tokenizer)
    sp = SpecialTokens.from_tokenizer(release_tok)
    assert sp == SpecialTokens.release()


@pytest.mark.parametrize("text", ["", "Hello world", "今天天气很好。", "  spaces\n\nnew lines\t tabs", "émoji 🎧 ok", "123 4567"])
def test_round_trip(release_tok, text):
    assert release_tok.decode(release_tok.encode(text)) == text


def test_user_text_cannot_inject_specials(release_tok):
    sp = SpecialTokens.release()
    for text in ["<|im_media_begin|>", "say <|im_kimia_text_eos|> now", "[BOS][EOS]<|reserved_token_3|>"]:
        ids = release_tok.encode(text)
        assert all(i < 151643 for i in ids), ids
        assert release_tok.decode(ids) == text
    assert sp.media_begin not in release_tok.encode("<|im_media_begin|>")


def test_decode_skips_audio_ids_and_names_specials(release_tok):
    sp = SpecialTokens.release()
    hello = release_tok.encode("Hello")
    assert release_tok.decode(hello + [sp.token_offset, sp.token_offset + 16383]) == "Hello"
    assert release_tok.decode([sp.media_begin] + hello) == "<|im_media_begin|>Hello"


def test_encode_rejects_non_text(release_tok):
    with pytest.raises(TypeError):
        release_tok.encode(b"bytes")  # type: ignore[arg-type]


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("prompt"))
def test_tiny_rank_file_reproduces_prompt_fixture_ids(fx):
    """The fixtures' stand-in tokenizer (rank file + specials at the real ids) gives the stored text ids."""
    fx = require(fx, "prompt")
    data = fx.json("prompt_cases.json")
    specials = SpecialTokens.from_official_dict(data["special_token_ids"], token_offset=data["kimia_token_offset"])
    tok = TextTokenizer.from_files(fx.path / "tiny_tiktoken.model", special_base=specials.bos)
    assert SpecialTokens.from_tokenizer(tok, token_offset=data["kimia_token_offset"]) == specials
    n = 0
    for case in data["cases"]:
        for text, ids in case["text_token_ids"].items():
            assert tok.encode(text) == ids, (case["name"], text)
            assert tok.decode(ids) == text
            n += 1
    assert n > 0


@pytest.mark.reference
@pytest.mark.parametrize("fx", fixture_params("llm"))
def test_shrunk_vocabulary_from_config(fx, tmp_path):
    """A shrunk vocabulary (specials after the 285 tiny ranks) resolves through config and tokenizer alike."""
    fx = require(fx, "llm")
    cases = fx.json("cases.json")
    config = fx.json("config.json")
    from_cfg = SpecialTokens.from_config(fx.path)
    assert from_cfg.as_official_dict() == cases["special_token_ids"]
    assert from_cfg.token_offset == cases["kimia_token_offset"] == config["kimia_token_offset"]
    assert from_cfg.audio_delay == config["kimia_mimo_audiodelaytokens"]
    assert (from_cfg.bos, from_cfg.eos) == (config["bos_token_id"], config["eos_token_ids"][0])

    # the same vocabulary through a model-folder tokenizer spec
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "tiktoken", "file": str(fx.path / "tiny_tiktoken.model")}))
    tok = load_tokenizer(json.loads((tmp_path / "tokenizer.json").read_text()), root=tmp_path)
    assert tok.n_vocab == config["kimia_token_offset"]
    assert SpecialTokens.from_config(config, tok) == from_cfg
    for text, ids in cases["text_token_ids"].items():
        assert tok.encode(text) == ids
    # decoding as generate() does: audio-range ids dropped, specials by name, bytes with replacement
    for name, run in cases["generate_runs"].items():
        assert tok.decode(run["loop_text_tokens"]) == run["decoded_text"], name


def test_config_disagreement_is_an_error():
    cfg = {"num_base_tokens": 285, "kimia_token_offset": 706, "kimia_media_begin": 304}
    with pytest.raises(ConfigError, match="kimia_media_begin"):
        SpecialTokens.from_config(cfg)


def test_tokenizer_folder_with_added_tokens(tmp_path):
    """Release-folder layout: tiktoken.model + tokenizer_config.json's added_tokens_decoder."""
    (tmp_path / "tiktoken.model").write_text("\n".join(f"{__import__('base64').b64encode(bytes([i])).decode()} {i}" for i in range(256)))
    table = release_special_table(256)
    cfg = {"added_tokens_decoder": {str(i): {"content": s, "special": True} for s, i in table.items()}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = TextTokenizer.from_folder(tmp_path)
    assert tok.special_tokens == table
    assert tok.encode("ab") == [97, 98]
    sp = SpecialTokens.from_tokenizer(tok, token_offset=tok.n_vocab)
    assert sp == SpecialTokens.from_base(256, token_offset=256 + NUM_SPECIALS)
    with pytest.raises(ConfigError):
        TextTokenizer.from_folder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="unknown tokenizer type"):
        load_tokenizer({"type": "sentencepiece", "file": "x"})


def test_tokenizer_spec_pattern_selects_pre_tokenisation():
    """A spec's "pattern" (another vocabulary's regex) is what splits the text, checked against tiktoken."""
    import tiktoken

    from kimia.tokens import QWEN2_PATTERN, load_tokenizer, qwen_rank_file, read_tiktoken_ranks

    pattern = r"[^\s]+|\s+"
    rank_file = qwen_rank_file()
    tok = load_tokenizer({"type": "tiktoken", "file": str(rank_file), "specials": "release", "pattern": pattern})
    oracle = tiktoken.Encoding(name="oracle", pat_str=pattern, mergeable_ranks=read_tiktoken_ranks(rank_file),
                               special_tokens={})
    text = "Hello world,  counting 123 items"
    assert tok.encode(text) == oracle.encode_ordinary(text)
    default = load_tokenizer({"type": "tiktoken", "file": str(rank_file), "specials": "release"})
    assert default.encode(text) != tok.encode(text)  # the default is Qwen2's pattern
    assert QWEN2_PATTERN != pattern
    with pytest.raises(ConfigError):
        load_tokenizer({"type": "tiktoken", "file": str(rank_file), "pattern": ""})
