"""The audio LLM training recipe: masked cross-entropy on both streams, freezing, LoRA, native export.

Loss (reference KIMI_AUDIO.md §9): labels are both id streams shifted left by one with the pad id appended,
loss masks shifted the same way (`kimia.train.data.collate_lm`); the loss is the masked mean of the full-
vocabulary cross-entropy of the audio head against the audio labels plus the masked mean for the text head,
each divided by (mask sum + 1e-4), summed with equal weight. Cross-entropy runs in fp32 (the model returns
fp32 logits).

What trains is chosen by `freeze` (group names or glob patterns over parameter names; groups follow the
model's structure: `embeddings`, `trunk` = shared layers 0..F, `text_tail` = layers F+1.. + norm + lm_head,
`audio_branch` = mimo layers + mimo_norm + mimo_output, `adaptor`), `freeze_embedding_rows_below` (keeps the
pretrained text rows of the embedding bit-identical while new special/audio rows train: their gradient rows
are zeroed and the embedding is not weight-decayed), and `lora` (adapters on matching Linear layers, base
frozen). Export writes a native LM folder (LoRA merged) that `kimia.checkpoints.native.load_native_lm` loads,
plus the tokenizer files of the starting folder.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kimia.checkpoints.common import load_state_dict_strict
from kimia.checkpoints.native import load_native_lm, save_native_lm
from kimia.errors import ConfigError
from kimia.lm.config import AudioLMConfig
from kimia.lm.model import AudioLM, LMOutput
from kimia.train.common import LossOutput, Recipe, copy_folder_files
from kimia.train.config import OptimConfig, TrainConfig, to_dict
from kimia.train.data import LMBatch, collate_lm
from kimia.train.lora import apply_lora, load_lora_factors, lora_scales, lora_state_dict, merge_lora_state_dict

logger = logging.getLogger(__name__)

FREEZE_GROUPS = ("embeddings", "trunk", "text_tail", "audio_branch", "adaptor")
TOKENIZER_SPEC = "kimia_tokenizer.json"  # kimia tokenizer spec written by init_smollm2 beside the LM weights
LORA_FILE = "lora.safetensors"  # the trained adapters beside the merged export (scales in its metadata)


@dataclass
class LMModelSpec:
    init: str = "preset:tiny"  # "preset:<name>" (random init) or a native LM folder
    overrides: dict[str, Any] = field(default_factory=dict)  # AudioLMConfig field overrides (presets only)
    tokenizer: Any = None  # load_tokenizer spec; default: the folder's tokenizer.json spec


@dataclass
class LoRASpec:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["*.self_attn.q_proj", "*.self_attn.v_proj"])
    freeze_base: bool = True  # True: only adapters train; False: only the adapted layers' weights freeze
    # adapters to continue (a safetensors file of <layer>.lora_A/B with "scales" metadata, e.g. the pipeline's
    # lm_init/lora_start.safetensors of a model folder it continues) instead of fresh ones; the init folder's
    # weights must then be the unmerged base they apply to. None: fresh adapters (B = 0)
    init: str | None = None
    train: bool = True  # False: the adapters (fresh or `init`'s) stay as they are, e.g. to retrain only the audio
    # branch on an earlier model's trunk (with `freeze` of every other group): its text answers stay the same
    # glob patterns over adapter tensor names (e.g. "model.layers.2[4-9].*"): only the matching adapters train,
    # the others stay as they are (e.g. the text tail's, which the audio branch never reads); empty: all of them
    train_only: list[str] = field(default_factory=list)


@dataclass
class LMDataSpec:
    manifests: list[str] = field(default_factory=list)
    synthetic: int = 0  # > 0: this many synthetic examples instead of manifests (tests, smoke runs)
    max_len: int = 512
    whisper: str | None = None  # frozen Whisper encoder for features: "base", "tiny.en" or a path; None: none
    whisper_padding: str = "segment"  # "segment": every segment padded to 30 s (official); "clip": its own length
    semantic_tokenizer: str | None = None  # frozen semantic tokenizer folder; None: manifests carry audio_tokens
    cache_dir: str | None = None  # cache computed ids/features here (None: compute on the fly)
    concat_prob: float = 0.0  # long-form ASR: share of "asr" records joined with other ASR clips
    concat_max: int = 3  # most clips in one joined example
    text_qa: int = 0  # + this many text-only conversations of the corpus' question kinds (train split only)
    text_qa_eval_fraction: float = 0.1  # the corpus' eval_fraction (which questions are held out)


@dataclass
class LMTrainConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: LMModelSpec = field(default_factory=LMModelSpec)
    data: LMDataSpec = field(default_factory=LMDataSpec)
    freeze: list[str] = field(default_factory=list)
    freeze_embedding_rows_below: int = 0
    lora: LoRASpec = field(default_factory=LoRASpec)
    freeze_head_rows_below: int = 0  # audio head (mimo_output) rows [0, n) stay exact (its text rows)
    sparse_logits: bool = True  # vocabulary projections only at loss positions (same loss, less compute)
    export_dir: str | None = None  # default: <out_dir>/export


# ------------------------------------------------------------------------------------------ loss
def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of the cross-entropy: logits [B, L, V], labels [B, L], mask [B, L] -> scalar."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    m = mask.flatten().to(ce.dtype)
    return (ce * m).sum() / (m.sum() + 1e-4)


def lm_loss(out: LMOutput, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, audio, text) losses of one batch (§9). Logits are either full [B, L, V] or packed at the loss
    positions ([N, V], from `AudioLM.forward(logits_where=...)`); both give the same numbers."""

    def part(logits: torch.Tensor | None, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if logits is None:  # the audio branch was skipped: no audio loss position in the batch
            return torch.zeros((), device=labels.device)
        if logits.dim() == 3:
            return masked_ce(logits, labels, mask)
        ce = F.cross_entropy(logits.float(), labels[mask], reduction="sum")
        return ce / (mask.sum() + 1e-4)

    la = part(out.audio_logits, batch.audio_labels, batch.audio_loss_mask)
    lt = part(out.text_logits, batch.text_labels, batch.text_loss_mask)
    return la + lt, la, lt


# ------------------------------------------------------------------------------------------ freezing
def group_patterns(config: AudioLMConfig, group: str) -> list[str]:
    """Regexes of the parameter names of a structural group."""
    f = config.kimia_mimo_transformer_from_layer_index
    trunk = "|".join(str(i) for i in range(f + 1))
    tail = "|".join(str(i) for i in range(f + 1, config.num_hidden_layers)) or "(?!)"
    return {
        "embeddings": [r"model\.embed_tokens\..*"] + ([r"lm_head\..*"] if config.tie_word_embeddings else []),
        "trunk": [rf"model\.layers\.({trunk})\..*"],
        "text_tail": [rf"model\.layers\.({tail})\..*", r"model\.norm\..*"]
                     + ([] if config.tie_word_embeddings else [r"lm_head\..*"]),
        "audio_branch": [r"model\.mimo_layers\..*", r"model\.mimo_norm\..*", r"mimo_output\..*"],
        "adaptor": [r"model\.vq_adaptor\..*"],
    }[group]


def freeze(model: AudioLM, items: list[str]) -> list[str]:
    """Stop gradients for groups / glob patterns; returns the frozen parameter names."""
    frozen = []
    for item in items:
        if item in FREEZE_GROUPS:
            rx = [re.compile(p) for p in group_patterns(model.config, item)]
            hit = [n for n, _ in model.named_parameters(remove_duplicate=False) if any(r.fullmatch(n) for r in rx)]
        else:
            hit = [n for n, _ in model.named_parameters(remove_duplicate=False) if fnmatch.fnmatchcase(n, item)]
        if not hit:
            raise ConfigError(f"freeze entry {item!r} matches no parameter (groups: {FREEZE_GROUPS} or glob patterns)")
        for n in hit:
            model.get_parameter(n).requires_grad_(False)
        frozen += hit
    return frozen


def freeze_rows_below(param: nn.Parameter, n: int) -> None:
    """Zero the gradient of rows [0, n) of a 2-D parameter (with no weight decay those rows stay exact)."""
    if n <= 0:
        return

    def hook(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[:n] = 0
        return g

    param.register_hook(hook)


# ------------------------------------------------------------------------------------------ recipe
class LMRecipe(Recipe):
    name = "lm"

    def __init__(self, cfg: LMTrainConfig, dataset: Any = None):
        self.cfg = cfg
        self._dataset = dataset
        self.init_folder: Path | None = None
        self.lm_config = self._resolve_config()
        self._scales: dict[str, float] = {}

    def _resolve_config(self) -> AudioLMConfig:
        init = self.cfg.model.init
        if init.startswith("preset:"):
            return AudioLMConfig.from_name(init.split(":", 1)[1], **self.cfg.model.overrides)
        folder = Path(init)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.init {init!r} is neither 'preset:<name>' nor a native LM folder")
        if self.cfg.model.overrides:
            raise ConfigError("model.overrides only apply to presets (a folder's architecture is fixed)")
        self.init_folder = folder
        return AudioLMConfig.from_json(folder / "config.json")

    # ---- model -------------------------------------------------------------------------------------------
    def build_model(self, device: torch.device) -> nn.Module:
        if self.init_folder is None:
            model = AudioLM(self.lm_config, device=device, dtype=torch.float32)
            model.init_weights(torch.Generator(device=device).manual_seed(self.cfg.train.seed))
        else:
            model, _ = load_native_lm(self.init_folder, device=device, dtype=torch.float32)
        if self.cfg.freeze:
            frozen = freeze(model, self.cfg.freeze)
            logger.info("froze %d parameter tensors (%s)", len(frozen), ", ".join(self.cfg.freeze))
        lora = self.cfg.lora
        if lora.enabled:
            apply_lora(model, lora.targets, lora.r, lora.alpha, lora.dropout, seed=self.cfg.train.seed,
                       freeze_base=lora.freeze_base)
            self._scales = lora_scales(model)
            if lora.init:
                load_lora_factors(model, lora.init)
            names, only = list(lora_state_dict(model)), lora.train_only
            kept = [n for n in names if not lora.train or (only and not any(fnmatch.fnmatchcase(n, p) for p in only))]
            if lora.train and only and len(kept) == len(names):
                raise ConfigError(f"lora.train_only {only} matches no adapter (e.g. {names[0]})")
            for n in kept:
                model.get_parameter(n).requires_grad_(False)
        if self.cfg.freeze_embedding_rows_below > 0:
            w = model.model.embed_tokens.weight
            if w.requires_grad:
                freeze_rows_below(w, self.cfg.freeze_embedding_rows_below)
        if self.cfg.freeze_head_rows_below > 0:
            w = model.mimo_output.weight
            if w.requires_grad:
                freeze_rows_below(w, self.cfg.freeze_head_rows_below)
        self.no_decay = ({"model.embed_tokens.weight"} if self.cfg.freeze_embedding_rows_below > 0 else set()) | \
            ({"mimo_output.weight"} if self.cfg.freeze_head_rows_below > 0 else set())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        logger.info("AudioLM: %.2f M parameters, %.2f M trainable", n_all / 1e6, n_train / 1e6)
        return model

    def phase_parameters(self, model: nn.Module, phase: str) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def fsdp_modules(self, model: nn.Module) -> list[nn.Module]:
        if self.cfg.freeze_embedding_rows_below > 0 or self.cfg.freeze_head_rows_below > 0:
            # the row mask is a hook on the embedding Parameter, which fully_shard replaces by a DTensor
            raise ConfigError("freeze_embedding_rows_below / freeze_head_rows_below are not supported with "
                              "train.parallel=fsdp (use ddp)")
        return [*model.model.layers, *model.model.mimo_layers]

    # ---- data --------------------------------------------------------------------------------------------
    def dataset(self):
        if self._dataset is None:
            from kimia.train.data import SyntheticLMDataset

            d, c = self.cfg.data, self.lm_config
            if d.synthetic > 0:
                self._dataset = SyntheticLMDataset(
                    d.synthetic, num_base_tokens=c.num_base_tokens, token_offset=c.kimia_token_offset,
                    audio_vocab=c.vocab_size - c.kimia_token_offset, adaptor_dim=c.kimia_adaptor_input_dim,
                    audio_delay=c.kimia_mimo_audiodelaytokens, seed=self.cfg.train.seed)
            else:
                self._dataset = self._manifest_dataset()
        return self._dataset

    def _manifest_dataset(self):
        from kimia.prompt import PromptBuilder
        from kimia.tokens import SpecialTokens, load_tokenizer
        from kimia.train.data import AudioCache, ManifestLMDataset, read_manifests, text_qa_records

        d, c = self.cfg.data, self.lm_config
        if not d.manifests:
            raise ConfigError("data.manifests is empty and data.synthetic is 0: nothing to train on")
        spec, root = self.cfg.model.tokenizer, Path(".")
        if spec is None and self.init_folder is not None and (self.init_folder / TOKENIZER_SPEC).is_file():
            spec, root = json.loads((self.init_folder / TOKENIZER_SPEC).read_text()), self.init_folder
        tok = load_tokenizer(spec, root)
        specials = SpecialTokens.from_config(c.to_dict(), tok)
        semantic = features = None
        if d.semantic_tokenizer:
            from kimia.encoders.semantic import load_semantic_tokenizer

            semantic = load_semantic_tokenizer(d.semantic_tokenizer, device="cpu")
        if d.whisper:
            from kimia.encoders.whisper import load_continuous_extractor

            features = load_continuous_extractor(d.whisper, device="cpu", padding=d.whisper_padding)
        audio = AudioCache(token_offset=c.kimia_token_offset, semantic=semantic, features=features,
                           cache_dir=d.cache_dir)
        records = read_manifests(d.manifests)
        if d.text_qa > 0:
            records += text_qa_records(d.text_qa, seed=self.cfg.train.seed, eval_fraction=d.text_qa_eval_fraction)
        return ManifestLMDataset(records, PromptBuilder(tok, specials), max_len=d.max_len,
                                 audio=audio, concat_prob=d.concat_prob, concat_max=d.concat_max,
                                 seed=self.cfg.train.seed)

    def example_lengths(self) -> list[int]:
        ds = self.dataset()
        return [len(ds[i]) for i in range(len(ds))]

    def collate(self, items: list) -> LMBatch:
        c = self.lm_config
        return collate_lm(items, pad_id=c.pad_token_id, media_begin=c.kimia_media_begin, media_end=c.kimia_media_end,
                          adaptor_dim=c.kimia_adaptor_input_dim)

    # ---- loss --------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: LMBatch, phase: str) -> LossOutput:
        out = model(batch.audio_ids, batch.text_ids, batch.positions, continuous=batch.continuous,
                    continuous_mask=batch.continuous_mask,
                    logits_where=(batch.text_loss_mask, batch.audio_loss_mask) if self.cfg.sparse_logits else None,
                    skip_audio=False if self.whole_graph else None)
        total, la, lt = lm_loss(out, batch)
        return LossOutput(total, tokens=batch.tokens, metrics={"loss_audio": float(la.detach()), "loss_text": float(lt.detach())})

    # ---- export ------------------------------------------------------------------------------------------
    def export(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        sd = merge_lora_state_dict(state_dict, self._scales) if self._scales else dict(state_dict)
        with torch.device("meta"):
            model = AudioLM(self.lm_config)
        load_state_dict_strict(model, sd, source="trained state", assign=True)
        save_native_lm(model, folder)
        if self._scales:  # the adapters themselves too: a model folder can store them instead of merged weights
            from kimia.train.lora import lora_state_dict, save_lora_factors

            save_lora_factors(folder / LORA_FILE, lora_state_dict(state_dict), self._scales)
        if self.init_folder is not None:
            copy_folder_files(self.init_folder, folder, skip=("config.json", "model.safetensors", LORA_FILE))
        logger.info("exported native LM to %s", folder)

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)


def train_lm(cfg: LMTrainConfig, dataset: Any = None, env=None) -> tuple[Any, list[dict[str, Any]]]:
    """Build the recipe and trainer, train, export; returns (trainer, history)."""
    from kimia.train.common import run_recipe

    return run_recipe(LMRecipe(cfg, dataset), cfg, env)


__all__ = ["LMTrainConfig", "LMModelSpec", "LoRASpec", "LMDataSpec", "LMRecipe", "masked_ce", "lm_loss", "freeze",
           "group_patterns", "freeze_rows_below", "train_lm", "FREEZE_GROUPS"]
