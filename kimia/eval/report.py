"""Scoring of merged predictions and the reports: metrics JSON, Markdown tables, comparisons, PNG plots.

`score_run` reads a run folder (`predictions.jsonl`, `bad_rows.jsonl`, `recipe.yaml`), scores every subset
with the recipe's metric, and writes:
- `metrics.json`: {task, dataset, model, date, eval_method, recipe, performance{subset: {...}},
  counts{scored, bad, skipped}} — the kit's performance file plus the recipe, so a figure can be redone;
- `details.jsonl`: per item reference/prediction tokens or extracted answers;
- `report.md`: a Markdown table per subset, the bad-row summary and the recipe;
- `plots/`: WER by subset and by utterance length (ASR), a confusion matrix (choice/label tasks).
`compare_runs` puts several metrics files side by side (Markdown, and a grouped bar chart) and, for runs of one
dataset, counts the items each run does better / worse than the first (a paired sign test).
Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from kimia.errors import ConfigError
from kimia.eval import metrics as M
from kimia.eval.datasets import DATASETS
from kimia.eval.normalizers import detect_language, normalize
from kimia.eval.recipes import Recipe

logger = logging.getLogger(__name__)

__all__ = ["score_run", "score_records", "markdown_report", "compare_runs", "paired_counts", "sign_test",
           "question_score", "LENGTH_BUCKETS"]

LENGTH_BUCKETS = ((0.0, 5.0), (5.0, 10.0), (10.0, 20.0), (20.0, 60.0))
OVERALL = "overall"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _lang_of(rec: dict, recipe: Recipe, dataset: str) -> str:
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    return (meta.get("lang") or rec.get("lang") or recipe.lang or DATASETS.get(dataset, (None, None))[1]
            or detect_language(str(rec.get("answer", ""))))


def _options_of(rec: dict) -> dict[str, str]:
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    opts = meta.get("options") or meta.get("choices") or rec.get("choices")
    if isinstance(opts, dict):
        return {str(k).strip("() ").upper(): str(v) for k, v in opts.items()}
    if isinstance(opts, list):
        return {chr(ord("A") + i): str(v) for i, v in enumerate(opts)}
    return M.parse_options(str(rec.get("question", "")))


def _contains(reference: str, prediction: str) -> bool:
    ref, pred = normalize(reference, "other"), normalize(prediction, "other")
    return bool(ref) and re.search(rf"(?<!\w){re.escape(ref)}(?!\w)", pred) is not None


def score_records(records: list[dict], recipe: Recipe, dataset: str = "", judge=None) -> tuple[dict, list[dict], dict]:
    """(performance {subset|overall: stats}, per-item details, extras for plots) for merged predictions."""
    by_subset: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_subset[str(rec.get("subset") or "default")].append(rec)
    subsets = sorted(by_subset)
    details: list[dict] = []
    extras: dict = {}
    perf: dict[str, dict] = {}
    metric = recipe.metric
    if metric == "wer":
        total = M.WerStats()
        buckets = {b: M.WerStats() for b in LENGTH_BUCKETS}
        for sub in subsets:
            st = M.WerStats()
            for rec in by_subset[sub]:
                lang = _lang_of(rec, recipe, dataset)
                err, n, ref, hyp = M.utterance_wer(str(rec["answer"]), rec["prediction"], lang)
                st.add(err, n)
                total.add(err, n)
                dur = rec.get("duration")
                for lo, hi in LENGTH_BUCKETS:
                    if dur is not None and lo <= dur < hi or (dur == hi == LENGTH_BUCKETS[-1][1]):
                        buckets[(lo, hi)].add(err, n)
                details.append({"index": rec["index"], "subset": sub, "lang": lang, "errors": err, "ref_len": n,
                                "ref": " ".join(ref), "hyp": " ".join(hyp)})
            perf[sub] = st.to_dict()
        perf[OVERALL] = total.to_dict()
        extras["length_buckets"] = {f"{lo:g}-{hi:g} s": s.to_dict() for (lo, hi), s in buckets.items()
                                    if s.utterances}
    elif metric in ("choice", "label"):
        labels = sorted({str(r["answer"]).strip() for r in records})
        conf = M.Confusion(labels=[] if metric == "choice" else labels)
        total = M.AccuracyStats()
        for sub in subsets:
            st = M.AccuracyStats()
            for rec in by_subset[sub]:
                if metric == "choice":
                    opts = _options_of(rec)
                    ref = M.answer_letter(str(rec["answer"]), opts) or str(rec["answer"]).strip()
                    pred = M.extract_choice(rec["prediction"], opts)
                else:
                    ref = str(rec["answer"]).strip()
                    pred = M.match_label(rec["prediction"], labels)
                st.add(pred == ref, pred is not None)
                total.add(pred == ref, pred is not None)
                conf.add(ref, pred)
                details.append({"index": rec["index"], "subset": sub, "reference": ref, "extracted": pred,
                                "correct": pred == ref})
            perf[sub] = st.to_dict()
        perf[OVERALL] = total.to_dict()
        extras["confusion"] = conf.matrix()
    elif metric == "speech_wer":
        from kimia.eval.speech import score_spoken

        perf, details = score_spoken({s: by_subset[s] for s in subsets})
    elif metric in ("ref_qa", "key_qa", "token_f1", "judge_score"):
        verdicts = judge.score(records, recipe) if judge is not None and metric != "key_qa" else None
        allstats: dict[str, list[float]] = defaultdict(list)
        scored: list[tuple[dict, float | None]] = []  # (record, its score) for the per-question figure
        for sub in subsets:
            for rec in by_subset[sub]:
                if verdicts is not None:
                    v = verdicts.get(str(rec["index"]))
                elif metric == "ref_qa":
                    v = 100.0 * _contains(str(rec["answer"]), rec["prediction"])
                elif metric == "key_qa":
                    v = 100.0 * _contains(str(rec.get("key") or rec["answer"]), rec["prediction"])
                elif metric == "token_f1":
                    v = 100.0 * M.token_f1(str(rec["answer"]), rec["prediction"], _lang_of(rec, recipe, dataset))
                else:
                    v = None  # an open-ended answer has no rule-based score: judge needed
                details.append({"index": rec["index"], "subset": sub, "score": v})
                allstats[sub].append(v)
                scored.append((rec, v))
        for sub, vals in list(allstats.items()) + [(OVERALL, [v for vs in allstats.values() for v in vs])]:
            valid = [v for v in vals if v is not None]
            perf[sub] = {"total": len(vals), "invalid": len(vals) - len(valid),
                         "score": round(sum(valid) / len(valid), 2) if valid else None}
        perf[OVERALL].update(question_score([r for r, _ in scored], [v for _, v in scored]))
        extras["judged"] = verdicts is not None
    else:  # pragma: no cover - Recipe validates the metric
        raise ConfigError(f"unknown metric {metric}")
    return perf, details, extras


def _metric_kind(metric: str) -> str:
    """What a metric scores: "wer" (word errors, lower is better), "accuracy" (right or wrong) or "score"."""
    if metric in ("wer", "speech_wer"):
        return "wer"
    return "accuracy" if metric in ("choice", "label") else "score"


def headline(perf: dict, metric: str) -> tuple[str, float | None]:
    """The one number of a subset's stats: (column name, value)."""
    kind = _metric_kind(metric)
    return {"wer": "WER %", "accuracy": "acc %", "score": "score"}[kind], perf.get(kind)


def score_run(run_dir: str | Path, *, dataset: str, model: str, recipe: Recipe | None = None, judge=None,
              plots: bool = True) -> dict:
    """Score a merged run folder and write metrics.json, details.jsonl, report.md and plots; return the metrics."""
    run_dir = Path(run_dir)
    if recipe is None:
        from kimia.eval.recipes import load_recipe
        recipe = load_recipe(run_dir / "recipe.yaml")
    records = _read_jsonl(run_dir / "predictions.jsonl")
    bad = _read_jsonl(run_dir / "bad_rows.jsonl")
    perf, details, extras = score_records(records, recipe, dataset, judge)
    result = {
        "task": recipe.task, "dataset": dataset, "model": model,
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "eval_method": recipe.metric,
        "recipe": recipe.to_dict(), "performance": perf,
        "counts": {"scored": len(records), "bad": sum(1 for b in bad if not b.get("skipped")),
                   "skipped": sum(1 for b in bad if b.get("skipped"))},
        "bad_rows": bad, **({"length_buckets": extras["length_buckets"]} if "length_buckets" in extras else {}),
    }
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (run_dir / "details.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in details),
                                           encoding="utf-8")
    (run_dir / "report.md").write_text(markdown_report(result), encoding="utf-8")
    if plots:
        from kimia.eval import plots as P
        P.write_plots(run_dir / "plots", result, extras)
    return result


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def markdown_report(result: dict) -> str:
    """A Markdown page: per-subset table, counts of bad/skipped rows, the recipe as YAML."""
    import yaml
    metric = result["eval_method"]
    perf = result["performance"]
    keys = list(dict.fromkeys(k for st in perf.values() for k in st))  # overall may carry figures of its own
    lines = [f"# {result['model']} on {result['dataset']} ({result['task']}, {metric})", "",
             "| subset | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for sub in [s for s in perf if s != OVERALL] + ([OVERALL] if OVERALL in perf else []):
        name = f"**{sub}**" if sub == OVERALL else sub
        lines.append(f"| {name} | " + " | ".join(_fmt(perf[sub].get(k)) for k in keys) + " |")
    c = result["counts"]
    lines += ["", f"Scored {c['scored']} items; {c['bad']} bad rows; {c['skipped']} skipped "
              "(audio outside the length window).", ""]
    bad = [b for b in result.get("bad_rows", []) if not b.get("skipped")]
    if bad:
        lines += ["Bad rows:", ""] + [f"- index {b.get('index')} (line {b.get('line')}): {b['reason']}"
                                      for b in bad[:50]] + [""]
    if result.get("length_buckets"):
        lines += ["| utterance length | WER % | utterances |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['wer'])} | {v['utterances']} |" for k, v in result["length_buckets"].items()]
        lines.append("")
    lines += ["Recipe:", "", "```yaml", yaml.safe_dump(result["recipe"], sort_keys=False, allow_unicode=True).rstrip(),
              "```", ""]
    return "\n".join(lines)


def item_value(detail: dict, metric: str) -> float | None:
    """One item's figure from `details.jsonl`, oriented so that higher is better (None: not scored)."""
    kind = _metric_kind(metric)
    if kind == "wer":
        n = detail.get("ref_len") or 0
        return -float(detail["errors"]) / n if n else None
    if kind == "accuracy":
        return float(bool(detail.get("correct")))
    v = detail.get("score")
    return None if v is None else float(v)


def sign_test(better: int, worse: int) -> float:
    """Two-sided exact sign-test p-value of `better` against `worse` (ties left out); 1.0 with no untied pair."""
    n, k = better + worse, min(better, worse)
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)


def _item_key(detail: dict) -> tuple[str, str]:
    return str(detail.get("subset")), str(detail.get("index"))


def paired_counts(base: list[dict], other: list[dict], metric: str) -> dict:
    """Item by item, `other` against `base` on the items both scored (matched on subset and index):
    {items, better, worse, same, p} with p the two-sided sign test of better against worse."""
    ref = {_item_key(d): item_value(d, metric) for d in base}
    better = worse = same = 0
    for d in other:
        a, b = ref.get(_item_key(d)), item_value(d, metric)
        if a is None or b is None:
            continue
        better, worse, same = better + (b > a), worse + (b < a), same + (b == a)
    return {"items": better + worse + same, "better": better, "worse": worse, "same": same,
            "p": round(sign_test(better, worse), 4)}


def _paired_section(runs: list[dict], labels: list[str], files: list[Path]) -> list[str]:
    """Markdown rows pairing every run with the first run of the same dataset and metric, item by item (only
    where both folders kept their `details.jsonl` and share scored items)."""
    rows, first = [], {}
    for i, r in enumerate(runs):
        group = (r["dataset"], r["eval_method"])
        if group not in first:
            first[group] = i
            continue
        j = first[group]
        base, other = (_read_jsonl(files[k].parent / "details.jsonl") for k in (j, i))
        c = paired_counts(base, other, r["eval_method"])
        if c["items"]:
            rows.append(f"| {r['dataset']} | {labels[i]} vs {labels[j]} | {c['items']} | {c['better']} | "
                        f"{c['worse']} | {c['same']} | {c['p']:.3g} |")
    if not rows:
        return []
    return ["", "Item by item against the first run of each dataset (p: two-sided sign test, ties left out):", "",
            "| dataset | runs | items | better | worse | same | p |", "|---" * 7 + "|", *rows]


def question_score(records: list[dict], scores: list[float | None]) -> dict:
    """{questions, question_score}: the score with every distinct question counted once.

    A synthetic eval set says one question in several voices, so a plain mean weighs a question by how many
    voices drew it; here each question's items are averaged first, then the questions. The question is the
    text the audio says (`audio_content`, or a corpus record's `text`); {} when records do not carry it."""
    by_q: dict[str, list[float]] = defaultdict(list)
    for rec, v in zip(records, scores):
        q = rec.get("audio_content") or rec.get("text")
        if not isinstance(q, str) or not q.strip():
            return {}
        if v is not None:
            by_q[" ".join(normalize(q, "other").split())].append(v)
    means = [sum(vs) / len(vs) for vs in by_q.values()]
    return {"questions": len(means), "question_score": round(sum(means) / len(means), 2) if means else None}


def compare_runs(metrics_files: Iterable[str | Path], out_md: str | Path | None = None,
                 out_png: str | Path | None = None) -> str:
    """Side-by-side table of several runs (rows: dataset/subset, columns: runs), then, for runs of one dataset,
    the items each later run does better / worse than the first (from `details.jsonl`); optionally a bar chart."""
    runs, files = [], []
    for f in metrics_files:
        f = Path(f)
        f = f / "metrics.json" if f.is_dir() else f
        if not f.is_file():
            raise ConfigError(f"no metrics file at {f}")
        runs.append(json.loads(f.read_text(encoding="utf-8")))
        files.append(f)
    if not runs:
        raise ConfigError("compare needs at least one run")
    labels = [f"{r['model']}" for r in runs]
    if len(set(labels)) < len(labels):  # same model twice (e.g. two recipes): add the recipe name
        labels = [f"{r['model']} ({r['recipe'].get('name')})" for r in runs]
    if len(set(labels)) < len(labels):  # e.g. two model folders both called "model": name the run folders
        labels = [str(f.parent) for f in files]
    rows: dict[tuple[str, str], list] = {}
    for i, r in enumerate(runs):
        for sub, st in r["performance"].items():
            col, val = headline(st, r["eval_method"])
            rows.setdefault((f"{r['dataset']}/{sub}", col), [None] * len(runs))[i] = val
    lines = ["| dataset/subset | metric | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
    for (name, col), vals in sorted(rows.items()):
        lines.append(f"| {name} | {col} | " + " | ".join(_fmt(v) for v in vals) + " |")
    lines += _paired_section(runs, labels, files)
    md = "\n".join(lines) + "\n"
    if out_md:
        Path(out_md).write_text(md, encoding="utf-8")
    if out_png:
        from kimia.eval import plots as P
        P.comparison_plot(Path(out_png), labels, rows)
    return md
