"""``lvr eval report RUN``: one Markdown and one HTML page over every evaluation of a run.

Written to ``runs/<run>/eval/report.md``, ``report.html`` and ``plots/*.png`` (matplotlib, Agg):

- a summary table: robust accuracy with its 95% CI (Wilson, or bootstrap over questions) next to the strict (official) accuracy, the
  format rate, the accuracy over answered questions, the error count and the constant-letter floor;
- the settings table (frames, fps, max pixels, sampling, prompt, parser) — a score is only
  meaningful with them;
- paired differences: B - A for every two evaluations of one benchmark on their common
  questions (paired CI, discordant counts, exact McNemar p);
- per evaluation: accuracy per category with CI bars, per duration bucket, the confusion matrix of
  predicted vs gold letters (with "none" for unparsed answers and "error" for failed rows), which
  extraction rule fired how often, and the error reasons;
- accuracy vs frames for every (benchmark, model, other settings) series of a sweep.
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lvr.artifacts import read_table, rows_to_table
from lvr.errors import LvrError
from lvr.eval.extract import extract_choice
from lvr.eval.options import option_labels
from lvr.eval.prompting import labels_of
from lvr.eval.runner import load_eval_dirs
from lvr.eval.scoring import floor_letter, paired_difference, pct_text, per_question
from lvr.layout import EvalRunLayout, RunLayout
from lvr.reasons import group_errors

SETTING_KEYS = ("frames", "fps", "max_pixels", "temperature", "top_p", "max_tokens", "prompt",
                "prompt_version", "parser", "backend", "subtitles", "judge")  # fmt: skip


@dataclass
class Entry:
    """One evaluation folder, loaded."""

    name: str
    manifest: dict[str, Any]
    scores: list[dict[str, Any]]
    predictions: list[dict[str, Any]]
    labels: dict[str, str] = field(default_factory=dict)  # qa_id -> option labels

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest.get("settings", {})

    def score(self, metric: str, group_by: str, group: str | None = None) -> dict[str, Any] | None:
        for s in self.scores:
            if (
                s["metric"] == metric
                and s["group_by"] == group_by
                and (group is None or s["group"] == group)
            ):
                return s
        return None

    def groups(self, metric: str, group_by: str) -> list[dict[str, Any]]:
        return [s for s in self.scores if s["metric"] == metric and s["group_by"] == group_by]


def load_entry(folder: Path) -> Entry:
    """Read one evaluation folder (manifest, scores, predictions, question labels)."""
    paths = EvalRunLayout(folder)
    labels = {}
    if paths.questions.is_dir():
        for q in read_table(paths.questions, "questions").to_pylist():
            labels[q["qa_id"]] = labels_of(q)
    return Entry(
        name=folder.name,
        manifest=json.loads(paths.manifest.read_text()),
        scores=read_table(paths.scores, "scores").to_pylist(),
        predictions=read_table(paths.predictions, "predictions").to_pylist(),
        labels=labels,
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else pct_text(x)


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded numbers by value: ``-f16`` before ``-f128`` (not after)."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name) if t)


def _ci(s: dict[str, Any] | None) -> str:
    if s is None or s["accuracy"] is None:
        return "n/a"
    if s["ci_low"] is None:
        return _pct(s["accuracy"])
    return f"{_pct(s['accuracy'])} [{_pct(s['ci_low'])}, {_pct(s['ci_high'])}]"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _plt() -> Any:
    """matplotlib's pyplot (Agg), or None without the `eval` extra: the report then has tables
    and no plots (an API evaluation on the core install still gets its report)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bounds(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy and CI bounds in percent (a missing CI collapses onto the accuracy)."""
    acc = np.array([s["accuracy"] for s in rows], dtype=np.float64)
    low = np.array(
        [s["accuracy"] if s["ci_low"] is None else s["ci_low"] for s in rows], np.float64
    )
    high = np.array(
        [s["accuracy"] if s["ci_high"] is None else s["ci_high"] for s in rows], np.float64
    )
    return acc * 100, low * 100, high * 100


def plot_groups(entry: Entry, group_by: str, path: Path) -> Path | None:
    """Bar chart of robust accuracy per group with 95% CI error bars and the floor as a tick."""
    rows = [s for s in entry.groups("robust", group_by) if s["accuracy"] is not None]
    if not rows:
        return None
    plt = _plt()
    if plt is None:
        return None
    names = [s["group"] for s in rows]
    acc, low, high = _bounds(rows)  # each [G], percent
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.5))
    x = np.arange(len(rows))
    ax.bar(x, acc, yerr=[acc - low, high - acc], capsize=4, color="#4c78a8", label="robust")
    floors = [s["floor"] for s in rows]
    if any(f is not None for f in floors):
        ys = [100 * f if f is not None else np.nan for f in floors]
        ax.scatter(x, ys, marker="_", s=400, color="#e45756", label="floor", zorder=3)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{entry.name}: by {group_by}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion(entry: Entry) -> tuple[list[str], list[str], np.ndarray]:
    """Counts of (gold letter, predicted letter | none | error) over multiple-choice rows."""
    mc = [r for r in entry.predictions if r["format"] == "mc" and r["answer"]]
    golds = sorted({r["answer"] for r in mc})
    preds = sorted(
        {r["extracted"] for r in mc if r["extracted"] and r["error"] is None} | set(golds)
    )
    cols = [*preds, "none", "error"]
    mat = np.zeros((len(golds), len(cols)), dtype=np.int64)  # [gold, predicted]
    for r in mc:
        col = "error" if r["error"] is not None else (r["extracted"] or "none")
        mat[golds.index(r["answer"]), cols.index(col)] += 1
    return golds, cols, mat


def plot_confusion(entry: Entry, path: Path) -> Path | None:
    """Heat map of the confusion matrix, counts written in the cells."""
    golds, cols, mat = confusion(entry)
    if not golds:
        return None
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(cols), 1 + 0.5 * len(golds)))
    ax.imshow(mat, cmap="Blues")
    dark = mat.max() / 2 if mat.max() else 1
    for (i, j), v in np.ndenumerate(mat):
        color = "white" if v > dark else "black"
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(golds)), golds)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(entry.name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def frame_series(entries: list[Entry]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Group evaluations that differ only in the frame budget: label -> [(frames, overall score)]."""
    series: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for e in entries:
        others = {k: v for k, v in e.settings.items() if k not in {"frames", "hash", "parser"}}
        label = f"{e.manifest.get('benchmark')} | {e.manifest.get('model')}"
        key = label + " | " + json.dumps(others, sort_keys=True, default=str)
        group = e.manifest.get("headline_group", "overall")
        s = e.score("robust", group)
        if s is not None and s["accuracy"] is not None:
            series[key].append((int(e.settings.get("frames", 0)), s))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in series.items()}


def plot_frames(entries: list[Entry], path: Path) -> Path | None:
    """Accuracy vs frames (log2 x axis), one line with a CI band per series."""
    series = frame_series(entries)
    if not series:
        return None
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, points in series.items():
        xs = np.array([p[0] for p in points])
        ys, lo, hi = _bounds([p[1] for p in points])
        label = " | ".join(key.split(" | ")[:2])
        ax.plot(xs, ys, marker="o", label=label)
        ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for points in series.values() for p in points})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("frames")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _floor_letter(e: Entry) -> str | None:
    return floor_letter([r["answer"] for r in e.predictions], [r["format"] for r in e.predictions])


def chance_level(e: Entry) -> float | None:
    """Expected accuracy of a uniform random guess: the mean over questions of 1/k_q.

    k_q is the number of options of question q, so a benchmark mixing 4- and 5-option (or up to
    8-option) questions does not read 25%; an open-ended question counts 0 (no guess to make).
    Each question counts once, whatever its number of passes.
    """
    per_q: dict[str, float] = {}
    for r in e.predictions:
        k = len(r["options"] or [])
        per_q[r["qa_id"]] = 1.0 / k if r["format"] == "mc" and k else 0.0
    return float(np.mean(list(per_q.values()))) if per_q else None


def summary_table(entries: list[Entry]) -> tuple[list[str], list[list[str]]]:
    """Headline numbers, one row per evaluation."""
    head = ["evaluation", "n", "errors", "robust [95% CI]", "strict (official)", "format",
            "robust, answered only", "floor", "floor letter", "chance (mean 1/k)"]  # fmt: skip
    rows = []
    for e in entries:
        group = e.manifest.get("headline_group", "overall")
        robust = e.score("robust", group)
        rows.append(
            [
                # Every non-question-weighted headline is named (n counts groups for nonlinear).
                e.name + ("" if group == "overall" else f" ({group})"),
                str(robust["n"]) if robust else "0",
                str(robust["errors"]) if robust else "0",
                _ci(robust),
                _pct((e.score("strict", group) or {}).get("accuracy")),
                _pct((e.score("format", group) or {}).get("accuracy")),
                _pct((e.score("robust_answered", group) or {}).get("accuracy")),
                _pct(robust["floor"] if robust else None),
                str(_floor_letter(e)),
                _pct(chance_level(e) if group == "overall" else None),  # of an accuracy only
            ]
        )
    return head, rows


def _robust_by_question(e: Entry) -> dict[str, float]:
    """qa_id -> robust score (mean over passes, an error row as wrong): the headline's values."""
    if not e.predictions:
        return {}
    q = per_question(rows_to_table(e.predictions, "predictions"))
    return dict(zip(q["qa_id"].tolist(), q["robust"].tolist(), strict=True))


def _signed(x: float | None) -> str:
    return "n/a" if x is None else ("+" if x > 0 else "") + pct_text(x)


def paired_table(entries: list[Entry], n_boot: int = 1000) -> tuple[list[str], list[list[str]]]:
    """B - A robust accuracy for every two evaluations of one benchmark, on their common questions.

    Paired: the CI resamples questions with both evaluations' answers together (see
    ``scoring.paired_difference``); non-overlapping per-model CIs are not the test.
    """
    head = ["A", "B", "common questions", "robust B - A [paired 95% CI]", "only A right",
            "only B right", "McNemar exact p"]  # fmt: skip
    values = [_robust_by_question(e) for e in entries]
    rows = []
    for i, a in enumerate(entries):
        for j in range(i + 1, len(entries)):
            b = entries[j]
            if a.manifest.get("benchmark") != b.manifest.get("benchmark"):
                continue
            d = paired_difference(values[i], values[j], n_boot=n_boot)
            if d is None:
                continue
            ci = (
                "" if d["ci_low"] is None else f" [{_signed(d['ci_low'])}, {_signed(d['ci_high'])}]"
            )
            p = "n/a" if d["p"] is None else f"{d['p']:.3g}"
            rows.append([a.name, b.name, str(d["n"]), _signed(d["diff"]) + ci,
                         str(d["only_a"]), str(d["only_b"]), p])  # fmt: skip
    return head, rows


def settings_table(entries: list[Entry]) -> tuple[list[str], list[list[str]]]:
    """Frame budget, sampling, prompt and parser of every evaluation."""
    head = ["evaluation", *SETTING_KEYS, "passes"]
    rows = []
    for e in entries:
        passes = e.manifest.get("config", {}).get("passes", 1)
        rows.append([e.name, *(str(e.settings.get(k)) for k in SETTING_KEYS), str(passes)])
    return head, rows


def group_table(entry: Entry, group_by: str) -> tuple[list[str], list[list[str]]]:
    head = [group_by, "n", "errors", "robust [95% CI]", "strict", "floor"]
    rows = []
    for s in entry.groups("robust", group_by):
        strict = entry.score("strict", group_by, s["group"])
        rows.append([s["group"], str(s["n"]), str(s["errors"]), _ci(s),
                     _pct(strict["accuracy"] if strict else None), _pct(s["floor"])])  # fmt: skip
    return head, rows


def rule_table(entry: Entry) -> tuple[list[str], list[list[str]]]:
    """How often each extraction rule decided (re-derived from the stored responses)."""
    counts: Counter[str] = Counter()
    for r in entry.predictions:
        if r["format"] != "mc" or r["error"] is not None:
            continue
        labels = entry.labels.get(r["qa_id"]) or option_labels(len(r["options"] or []))
        counts[extract_choice(r["response"], labels, r["options"])[1]] += 1
    return ["rule", "rows"], [[k, str(v)] for k, v in counts.most_common()]


def error_table(entry: Entry) -> tuple[list[str], list[list[str]]]:
    """Error rows grouped by reason (ids, paths and numbers blanked), with one example each."""
    groups = group_errors(r["error"] for r in entry.predictions)
    rows = [[reason, str(n), example[:160]] for reason, n, example in groups[:20]]
    return ["reason", "rows", "example"], rows


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "_none_\n"
    esc = [[c.replace("|", "\\|") for c in r] for r in [head, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines) + "\n"


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


NOTES = (
    "Headline accuracy counts every question; rows with errors (missing video, decode failure, "
    "backend failure, malformed benchmark row, judge failure) count as wrong. An answer the "
    "extraction cannot read (no offered letter, a hedge such as 'B or C') is wrong in every "
    "column: 'answered only' drops the error rows, not unparsed answers. With K passes a "
    "question scores its mean over passes (an errored pass as 0) and 'answered only' drops a "
    "question with any errored pass. "
    "'strict' is the official comparison (the <answer> text must equal the gold letter exactly); "
    "'robust' uses lvr's ranked extraction (never a random letter). 'floor' is the accuracy of "
    "always answering the benchmark's most common gold letter; 'chance' the expected accuracy of "
    "a uniform random guess, the mean over questions of 1/(options of that question) (open-ended "
    "questions 0; n/a beside a macro or nonlinear headline). 95% CIs over questions: Wilson "
    "score interval when every question scores 0 or 1 (one pass), else percentile bootstrap "
    "(seeded; K passes give fractional per-question values; macro: stratified). MLVU's headline "
    "is the mean of per-task accuracies (macro); Video-MME-v2's is its grouped non-linear score "
    "(nonlinear, over groups of 4 questions; n and errors count groups). "
    "Errors are grouped by reason (ids and paths blanked). Percentages have one decimal, ties "
    "rounded half up; evaluations are listed by name with numbers in numeric order (f16 < f128)."
)


PAIRED = (
    "B - A is the difference of robust accuracy (question-weighted, errors as wrong, passes "
    "averaged) over the questions both evaluations hold. Its 95% CI is a paired percentile "
    "bootstrap over those questions; 'only A/B right' count the discordant questions (with "
    "passes: A/B scored higher), and the p-value is the two-sided exact McNemar test on them (0/1 "
    "scores only). With no discordant question the bootstrap interval is [0, 0]; read the "
    "counts and p then. Two models' separate CIs overlapping does not mean their difference is not "
    "significant: on the same questions, use this table."
)


def write_report(run: Path) -> list[Path]:
    """Write ``report.md``, ``report.html`` and plots for every evaluation under ``run/eval``.

    Args:
        run: Run folder.

    Returns:
        The written files (Markdown, HTML, then the PNGs).

    Raises:
        LvrError: The run holds no finished evaluation.
    """
    layout = RunLayout(Path(run))
    dirs = load_eval_dirs(run)
    if not dirs:
        raise LvrError(f"no evaluations under {layout.eval}; run `lvr eval run` first")
    out = layout.eval
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    # Folder names sort "-f128" before "-f16"; order evaluations by the numbers in their names.
    entries = sorted((load_entry(d) for d in dirs), key=lambda e: _natural_key(e.name))
    sections: list[tuple[str, list[tuple[str, Any]]]] = []  # (title, [(kind, payload)])
    pngs: list[Path] = []
    frames_png = plot_frames(entries, plots / "accuracy_vs_frames.png")
    top: list[tuple[str, Any]] = [("p", NOTES), ("table", summary_table(entries))]
    top += [("h3", "Settings"), ("table", settings_table(entries))]
    paired = paired_table(entries)
    if paired[1]:
        top += [("h3", "Paired differences (same benchmark, common questions)"), ("p", PAIRED)]
        top += [("table", paired)]
    if frames_png:
        pngs.append(frames_png)
        top += [("h3", "Accuracy vs frames"), ("img", frames_png)]
    sections.append(("Summary", top))
    for e in entries:
        sections.append((e.name, _entry_section(e, plots, pngs)))
    md, page = _render(sections, out)
    md_path, html_path = layout.report, layout.report.with_suffix(".html")
    md_path.write_text(md, encoding="utf-8")
    html_path.write_text(page, encoding="utf-8")
    return [md_path, html_path, *pngs]


def _entry_section(e: Entry, plots: Path, pngs: list[Path]) -> list[tuple[str, Any]]:
    parts: list[tuple[str, Any]] = []
    official = sorted(
        {s["group_by"] for s in e.scores} - {"overall", "macro", "category", "duration_bucket"}
    )
    for group_by in (*official, "category", "duration_bucket"):
        table = group_table(e, group_by)
        if not table[1]:  # the benchmark has no such field
            continue
        parts += [("h3", f"By {group_by}"), ("table", table)]
        png = plot_groups(e, group_by, plots / f"{e.name}_{group_by}.png")
        if png:
            pngs.append(png)
            parts.append(("img", png))
    png = plot_confusion(e, plots / f"{e.name}_confusion.png")
    if png:
        pngs.append(png)
        parts += [("h3", "Confusion (gold rows, predicted columns)"), ("img", png)]
    parts += [("h3", "Extraction rules"), ("table", rule_table(e))]
    parts += [("h3", "Errors"), ("table", error_table(e))]
    for note in e.manifest.get("notes", []):
        parts.append(("p", f"Note: {note}"))
    return parts


def _render(sections: list[tuple[str, list[tuple[str, Any]]]], out: Path) -> tuple[str, str]:
    md = ["# lvr evaluation report\n"]
    body = ["<h1>lvr evaluation report</h1>"]
    for title, parts in sections:
        md.append(f"## {title}\n")
        body.append(f"<h2>{html.escape(title)}</h2>")
        for kind, payload in parts:
            if kind == "table":
                md.append(_md_table(*payload))
                body.append(_html_table(*payload))
            elif kind == "img":
                rel = payload.relative_to(out).as_posix()
                md.append(f"![{payload.stem}]({rel})\n")
                body.append(f'<img src="{html.escape(rel)}" alt="{html.escape(payload.stem)}">')
            elif kind == "h3":
                md.append(f"### {payload}\n")
                body.append(f"<h3>{html.escape(payload)}</h3>")
            else:
                md.append(f"{payload}\n")
                body.append(f"<p>{html.escape(payload)}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
        "margin:8px 0}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>lvr evaluation report</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
    return "\n".join(md), page
