"""Write complete tiny model folders with random weights, for API/CLI tests.

`write_tiny_model(folder)` writes kimia's NATIVE layout (a `kimia.json` manifest + one subfolder per component,
each `config.json` + `model.safetensors`) with dimensions that fit together: Whisper width 64 (x4 = the tiny
LLM's adaptor input 256), a 1024-code semantic tokenizer (= the tiny LLM's 1024 audio ids = the tiny DiT's
vocabulary), the `llm` reference fixture's tiny tiktoken rank file with the release special order from id 285
(the fixture vocabulary). `write_glm_tokenizer(folder)` writes a semantic tokenizer in the GLM-4-Voice
(official) folder format, to complete an official-layout folder whose other parts are the reference fixtures.

Weights are random but deliberately not tiny (N(0, 1/fan_in) matrices, 0.2-scaled embeddings, as the reference
fixtures use) so greedy decisions are not near-ties that fp32 rounding could flip.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tests.reference import find_fixtures

SEED = 1234


def _randomise(module: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)) and m.weight.dim() >= 2:
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(0.2 * torch.randn(m.weight.shape, generator=g))


def _save(module: nn.Module, config: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _fixture_dir(kind: str) -> Path:
    found = find_fixtures(kind)
    assert found, f"no reference fixture folder of kind {kind!r} (KIMIA_REFERENCE_FIXTURES)"
    return found[0].path


def tiny_rank_file(llm_dir: Path | None = None) -> Path:
    """The tiny tiktoken rank file shipped with the `llm` fixture (its shrunk vocabulary's BPE part)."""
    (path,) = sorted((llm_dir or _fixture_dir("llm")).glob("*tiktoken.model"))
    return path


def write_glm_tokenizer(folder: str | Path, seed: int = SEED, codebook: int = 1024) -> Path:
    """A tiny semantic tokenizer in the glm-4-voice-tokenizer layout (WhisperVQConfig + flat keys)."""
    from kimia.encoders.semantic import SemanticEncoder, SemanticTokenizerConfig

    g = torch.Generator().manual_seed(seed + 3)
    cfg = SemanticTokenizerConfig.from_name("tiny")
    cfg.quantize_vocab_size = codebook
    enc = SemanticEncoder(cfg)
    _randomise(enc, g)
    hf = {
        "architectures": ["WhisperVQEncoder"], "model_type": "whisper", "activation_function": "gelu",
        "d_model": cfg.d_model, "encoder_attention_heads": cfg.n_heads, "encoder_ffn_dim": cfg.ffn_dim,
        "encoder_layers": cfg.quantize_position, "num_mel_bins": cfg.num_mel_bins,
        "max_source_positions": cfg.max_source_positions, "quantize_position": cfg.quantize_position,
        "pooling_position": cfg.pooling_position, "pooling_kernel_size": cfg.pooling_kernel_size,
        "pooling_type": cfg.pooling_type, "quantize_vocab_size": cfg.quantize_vocab_size,
        "quantize_causal_block_size": cfg.quantize_causal_block_size, "quantize_causal_encoder": False,
        "quantize_encoder_only": True, "encoder_causal_convolution": True, "encoder_causal_attention": False,
    }
    return _save(enc, hf, Path(folder))


def write_tiny_model(folder: str | Path, seed: int = SEED, *, detokenizer: bool = True) -> Path:
    """Write a complete native tiny model folder at `folder` and return it."""
    from kimia.checkpoints.native import save_native_lm
    from kimia.detokenizer.bigvgan import BigVGAN, BigVGANConfig, save_vocoder
    from kimia.detokenizer.dit import DiT, DiTConfig
    from kimia.detokenizer.loader import save_dit
    from kimia.encoders.semantic import SemanticEncoder, SemanticTokenizerConfig
    from kimia.encoders.whisper import WhisperEncoder, WhisperEncoderConfig
    from kimia.lm import AudioLM, AudioLMConfig
    from kimia.model_folder import write_manifest

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    lm_cfg = AudioLMConfig.from_name("tiny")
    lm = AudioLM(lm_cfg)
    lm.init_weights(g)
    _randomise(lm, g)
    with torch.no_grad():  # norms near 1 (as in the fixtures), so the two heads are not identical in scale
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    save_native_lm(lm, root / "lm")

    w_cfg = WhisperEncoderConfig.from_name("tiny")
    assert 4 * w_cfg.d_model == lm_cfg.kimia_adaptor_input_dim
    whisper = WhisperEncoder(w_cfg)
    _randomise(whisper, g)
    _save(whisper, w_cfg.to_dict(), root / "whisper")

    audio_vocab = lm_cfg.vocab_size - lm_cfg.kimia_token_offset
    s_cfg = SemanticTokenizerConfig.from_name("tiny")
    s_cfg.quantize_vocab_size = audio_vocab
    sem = SemanticEncoder(s_cfg)
    _randomise(sem, g)
    _save(sem, s_cfg.to_dict(), root / "semantic_tokenizer")

    (root / "tokenizer").mkdir(exist_ok=True)
    shutil.copyfile(tiny_rank_file(), root / "tokenizer" / "tiktoken.model")
    tok_spec = {"type": "tiktoken", "file": "tokenizer/tiktoken.model", "specials": {"base": lm_cfg.num_base_tokens}}

    comps = {"lm": "lm", "whisper": "whisper", "semantic_tokenizer": "semantic_tokenizer"}
    if detokenizer:
        d_cfg = DiTConfig.from_name("tiny")
        assert d_cfg.semantic_vocab_size >= audio_vocab
        dit = DiT(d_cfg)
        _randomise(dit, g)
        save_dit(dit, root / "detokenizer")
        voc = BigVGAN(BigVGANConfig.from_name("tiny"))
        _randomise(voc, g)
        save_vocoder(voc, root / "vocoder")
        comps.update(detokenizer="detokenizer", vocoder="vocoder")
    write_manifest(root, comps, tok_spec, name="tiny-random")
    return root


def write_official_layout(folder: str | Path, seed: int = SEED, *, llm_dir: Path | None = None,
                          whisper_dir: Path | None = None, detok_dir: Path | None = None) -> Path:
    """An official-layout folder assembled (by symlinks) from reference fixture folders: the LLM checkpoint
    (`llm` kind, or `llm_dir`), `whisper-large-v3/` (`whisper_features`), `audio_detokenizer/` + `vocoder/`
    (`detokenizer`), plus a tiny GLM-format semantic tokenizer written beside it as `glm-4-voice-tokenizer/`."""
    llm = llm_dir or _fixture_dir("llm")
    whisper = whisper_dir or _fixture_dir("whisper_features") / "whisper-large-v3"
    detok = detok_dir or _fixture_dir("detokenizer")
    root = Path(folder) / "Kimi-Audio-tiny"
    root.mkdir(parents=True, exist_ok=True)
    shards = set(json.loads((llm / "model.safetensors.index.json").read_text())["weight_map"].values())
    for name in ("config.json", "model.safetensors.index.json", *sorted(shards)):
        (root / name).symlink_to(llm / name)
    (root / tiny_rank_file(llm).name).symlink_to(tiny_rank_file(llm))
    (root / "whisper-large-v3").symlink_to(whisper)
    (root / "audio_detokenizer").symlink_to(detok / "audio_detokenizer")
    (root / "vocoder").symlink_to(detok / "vocoder")
    write_glm_tokenizer(Path(folder) / "glm-4-voice-tokenizer", seed)
    return root
