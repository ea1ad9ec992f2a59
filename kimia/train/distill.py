"""`kimia train distill`: behaviour-alignment conversations, a spoken input paired with what a teacher model
answers to the same words given as text.

Why: the small model's audio path answers held-out spoken questions far worse than its text path answers the
same questions read (kimia-small v15 on corpus seed 3: held-out facts 0 % heard, 50 % read). A labelled answer
exists only for the corpus' own question kinds; a teacher's text answer exists for every sentence the corpus
speaks. Training the audio path to reply to speech as the text path replies to its words (sequence-level
distillation, the behaviour-alignment idea of BLSP) asks it to reach what the trunk knows, on every ASR
sentence of the corpus, without new labels.

Input: eval-kit manifests of a `kimia data synth` corpus; a row is used when it has one `audio_path` and its
words in `audio_content`, and its `split` is the one asked for (default train: eval sentences stay unseen).
The teacher is a `KimiAudio` folder answering in text, greedy, batched; `--teacher-lm` swaps in another LM
folder with the same tokenizer, trained in the Kimi-Audio prompt layout (SmolLM2 as packaged is not: see
docs/training.md). Each record is
`{"task": "distill", "task_type": "understanding", "index": ..., "conversation": [user audio, assistant text]}`
with the audio path absolute: the jsonl goes straight into the lm recipe's `data.manifests`. Rows whose index
is already in the output file are skipped and records are appended batch by batch, so an interrupted run
continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kimia.errors import ConfigError

logger = logging.getLogger(__name__)

TASK = "distill"


def distill_rows(manifests: Sequence[str | Path], *, split: str | None = "train", limit: int = 0
                 ) -> list[dict[str, Any]]:
    """Rows of eval-kit manifests that can be distilled: one audio file (resolved path) and its words, of
    `split` (None: every split); `limit` > 0 keeps the first `limit`."""
    from kimia.train.data import read_audio_manifest

    rows = [r for r in read_audio_manifest(manifests, ("audio_path", "audio_content", "index"))
            if split is None or r.get("split") == split]
    if not rows:
        raise ConfigError(f"no {split or ''} row with audio_path and audio_content in {[str(m) for m in manifests]}")
    return rows[:limit] if limit > 0 else rows


def distill(teacher: Any, rows: Sequence[dict[str, Any]], out: str | Path, *, batch: int = 8,
            max_new_tokens: int = 64) -> dict[str, int]:
    """Answer each row's words with `teacher` (a loaded `KimiAudio`) and append the records to `out`.
    Returns counts: written, skipped_done (already in `out`), empty (the teacher said nothing: no record)."""
    if batch < 1 or max_new_tokens < 1:
        raise ConfigError(f"batch and max_new_tokens must be >= 1, got {batch} and {max_new_tokens}")
    out = Path(out)
    done: set[str] = set()
    if out.is_file():
        for n, line in enumerate(out.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    done.add(str(json.loads(line)["index"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"{out}:{n}: not a distill record (delete the file to start again)") from None
    todo = [r for r in rows if str(r["index"]) not in done]
    stats = {"written": 0, "skipped_done": len(rows) - len(todo), "empty": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(todo), batch):
        chunk = todo[i : i + batch]
        convs = [[{"role": "user", "message_type": "text", "content": r["audio_content"]}] for r in chunk]
        answers = teacher.generate_batch(convs, output_type="text", max_new_tokens=max_new_tokens,
                                         text_temperature=0.0)
        lines = []
        for r, (_, text) in zip(chunk, answers):
            text = text.strip()
            if not text:
                stats["empty"] += 1
                continue
            conv = [{"role": "user", "message_type": "audio", "content": str(Path(r["audio_path"]).resolve())},
                    {"role": "assistant", "message_type": "text", "content": text}]
            lines.append(json.dumps({"task": TASK, "task_type": "understanding", "index": str(r["index"]),
                                     "source": r["audio_content"], "conversation": conv}, ensure_ascii=False))
        with out.open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        stats["written"] += len(lines)
        logger.info("distill: %d / %d rows answered", min(i + batch, len(todo)), len(todo))
    return stats


def add_distill_args(p: Any) -> None:
    p.add_argument("--teacher", required=True, help="model folder whose text answers are the targets")
    p.add_argument("--teacher-lm", default=None,
                   help="an LM folder answering in place of the teacher folder's LM (same tokenizer, trained "
                        "in the Kimi-Audio prompt layout)")
    p.add_argument("--manifests", nargs="+", required=True, help="eval-kit manifests of a kimia corpus")
    p.add_argument("--out", required=True, help="jsonl of distill conversations (appended; resumable)")
    p.add_argument("--split", default="train", help="rows of this split only ('all': every split)")
    p.add_argument("--limit", type=int, default=0, help="first N usable rows (0: all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: auto)")


def run_distill(args: Any) -> int:
    from kimia.api import KimiAudio

    rows = distill_rows(args.manifests, split=None if args.split == "all" else args.split, limit=args.limit)
    over = {"lm_path": args.teacher_lm} if args.teacher_lm else {}
    teacher = KimiAudio(args.teacher, load_detokenizer=False, device=args.device, **over)
    stats = distill(teacher, rows, args.out, batch=args.batch, max_new_tokens=args.max_new_tokens)
    print(json.dumps({"out": str(args.out), "rows": len(rows), **stats}))
    return 0


__all__ = ["TASK", "add_distill_args", "distill", "distill_rows", "run_distill"]
