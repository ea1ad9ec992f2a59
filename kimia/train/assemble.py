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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
                          check: bool = True) -> Path:
    """Write a native model folder at `out` from the stage exports; returns it.

    The folder is built in `<out>.tmp` and renamed into place, so an interrupted assembly never leaves a
    half-written folder that looks complete. With `check` the staged folder is loaded once (all parts on
    CPU) and a loader error aborts the assembly.
    """
    from kimia.model_folder import packaged_whisper_reference, write_manifest

    card = card or CardInfo()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    components: dict[str, Any] = {}
    _copy_tree(parts.lm, tmp / "lm")
    components["lm"] = "lm"
    tok = _rebase(_tokenizer_spec(parts), "lm")
    whisper = parts.whisper
    if isinstance(whisper, str) and not Path(whisper).exists():
        components["whisper"] = packaged_whisper_reference(whisper)  # CheckpointError if not a packaged name
    else:
        _copy_tree(Path(whisper), tmp / "whisper")
        components["whisper"] = "whisper"
    _copy_tree(parts.semantic_tokenizer, tmp / "semantic_tokenizer")
    components["semantic_tokenizer"] = "semantic_tokenizer"
    if (parts.detokenizer is None) != (parts.vocoder is None):
        raise ConfigError("give both the detokenizer (DiT) and the vocoder, or neither")
    if parts.detokenizer is not None:
        _copy_tree(parts.detokenizer, tmp / "detokenizer")
        _copy_tree(parts.vocoder, tmp / "vocoder")
        components.update(detokenizer="detokenizer", vocoder="vocoder")
    files = _files(tmp)
    write_manifest(tmp, components, tok, name=card.name, files=files,
                   created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if check:
        from kimia.model_folder import load_model_folder

        loaded = load_model_folder(tmp, load_detokenizer=parts.detokenizer is not None, device="cpu", dtype="float32")
        del loaded
    write_card(tmp, components, files, card)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("assembled model folder %s (%s)", out, ", ".join(components))
    return out


def write_card(folder: Path, components: dict[str, Any], files: dict[str, dict[str, Any]], card: CardInfo) -> Path:
    """Model card skeleton: parts (parameters, sources), data, compute, reproduction, evaluation, files."""
    lines = [f"# {card.name}", "", card.description or "A small Kimi-Audio model trained by kimia's own recipes.", "",
             "## Parts", "", "| part | folder / source | parameters |", "|---|---|---|"]
    for name, entry in components.items():
        if isinstance(entry, dict):
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


__all__ = ["ModelParts", "CardInfo", "assemble_model_folder", "write_card", "update_card_section", "sha256_file",
           "TOKENIZER_SPEC"]
