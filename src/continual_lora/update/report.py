"""The before/after report of an update: old tasks, new task, upstream probe, per-sample flips,
and the curve of new-task gain against old-task drop over steps. Printed and written beside
the adapter:

    update_report.json   everything below, as data
    update_report.md     the same as tables (with the curve's picture)
    budget_curve.csv     step, new score, gain, old mean, drop, within budget, per-task scores
    budget_curve.png     new-task gain and old-task drop against steps, with the budget line
    flips.jsonl          one line per held-out example whose correctness changed
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from continual_lora.checkpoint import write_bytes_atomic, write_json_atomic, write_text_atomic
from continual_lora.sequence import TaskData
from continual_lora.update.budget import CurvePoint


def _flips(before: np.ndarray, after: np.ndarray) -> dict:
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    return {"lost": int((before & ~after).sum()), "gained": int((~before & after).sum()),
            "examples": int(before.size)}


def build_report(tasks: list[TaskData], probe_tasks: list[int], row0, row1,
                 curve: list[CurvePoint], budget: dict) -> dict:
    *old, new = tasks
    old_rows = []
    for t in old:
        i = t.index - 1
        old_rows.append({
            "task": t.name, "scored_on": "probe" if t.index in probe_tasks else "held-out",
            "before": row0.scores[i], "after": row1.scores[i],
            "change": row1.scores[i] - row0.scores[i],
            "flips": _flips(row0.correct[i], row1.correct[i])})
    j = new.index - 1
    report = {
        "old": old_rows,
        "old_mean": None if not old_rows else {
            "before": float(np.mean([r["before"] for r in old_rows])),
            "after": float(np.mean([r["after"] for r in old_rows]))},
        "new": {"task": new.name, "before": row0.scores[j], "after": row1.scores[j],
                "gain": row1.scores[j] - row0.scores[j], "before_scored_with": row0.how[j],
                "examples": len(new.eval)},
        "upstream": None,
        "budget": {**budget, "curve": [asdict(p) for p in curve]},
    }
    if not np.isnan(row0.upstream):
        report["upstream"] = {"before": row0.upstream, "after": row1.upstream,
                              "retention": row1.upstream / row0.upstream if row0.upstream else None,
                              "flips": _flips(row0.upstream_correct, row1.upstream_correct)}
    if old_rows:
        mean = report["old_mean"]
        report["old_mean"]["drop"] = mean["before"] - mean["after"]
    return report


TABLE_HEADER = ["task", "scored on", "before", "after", "change", "lost", "gained"]


def before_after_rows(report: dict) -> list[list[str]]:
    """The before/after table's rows as text cells (old tasks, the new task, the upstream
    probe), rendered for the terminal and for Markdown alike."""
    def row(task, scored_on, before, after, flips=None):
        lost, gained = ("", "") if flips is None else (str(flips["lost"]), str(flips["gained"]))
        return [task, scored_on, f"{before:.3f}", f"{after:.3f}", f"{after - before:+.3f}",
                lost, gained]

    rows = [row(r["task"], r["scored_on"], r["before"], r["after"], r["flips"])
            for r in report["old"]]
    n = report["new"]
    rows.append(row(f"{n['task']} (new)", "held-out", n["before"], n["after"]))
    up = report["upstream"]
    if up:
        rows.append(row("upstream probe", "retrieval", up["before"], up["after"], up["flips"]))
    return rows


def format_report(report: dict) -> str:
    widths = [22, 9, 7, 7, 7, 5, 6]

    def line(cells: list[str]) -> str:
        first, second, *numbers = cells
        return (f"  {first:<{widths[0]}} {second:<{widths[1]}} "
                + " ".join(f"{c:>{w}}" for c, w in zip(numbers, widths[2:], strict=True))
                ).rstrip()

    lines = ["before/after:", line(TABLE_HEADER), *map(line, before_after_rows(report))]
    if report["old_mean"]:
        lines.append(f"  old tasks' mean drop: {report['old_mean']['drop']:.3f}")
    b = report["budget"]
    if b.get("max_forgetting") is not None:
        where = (f"restored to step {b['saved_step']} (the last within the budget)"
                 if b.get("restored") else f"final step {b['saved_step']} within the budget")
        stopped = f", stopped early at step {b['stopped_at']}" if b.get("stopped_at") else ""
        lines.append(f"  budget {b['max_forgetting']:g}: {where}{stopped}")
    return "\n".join(lines)


def _markdown(report: dict, png: str | None) -> str:
    out = ["# Update report", "", "| " + " | ".join(TABLE_HEADER) + " |",
           "|" + "---|" * len(TABLE_HEADER)]
    out += ["| " + " | ".join(cells) + " |" for cells in before_after_rows(report)]
    out += ["", "`lost`/`gained`: held-out examples right before and wrong after / wrong before "
            "and right after. A `probe` task is scored as agreement with the old model's own "
            "predictions on the new task's held-out inputs (1.0 before by construction).", "",
            "## New-task gain against old-task drop", "",
            "| step | new | gain | old mean | drop | within budget |", "|---|---|---|---|---|---|"]
    for p in report["budget"]["curve"]:
        old = "" if p["old_mean"] is None else f"{p['old_mean']:.3f}"
        out.append(f"| {p['step']} | {p['new']:.3f} | {p['gain']:+.3f} | {old} | "
                   f"{p['drop']:+.3f} | {'yes' if p['within'] else 'no'} |")
    if png:
        out += ["", f"![gain against drop]({png})"]
    return "\n".join(out) + "\n"


def _curve_csv(curve: list[dict]) -> str:
    names = list(curve[0]["old"]) if curve else []
    header = ["step", "new", "gain", "old_mean", "drop", "within"] + [f"old:{n}" for n in names]
    lines = [",".join(header)]
    for p in curve:
        old_mean = "" if p["old_mean"] is None else f"{p['old_mean']:.6f}"
        cells = [p["step"], f"{p['new']:.6f}", f"{p['gain']:.6f}", old_mean,
                 f"{p['drop']:.6f}", int(p["within"])] + [f"{p['old'][n]:.6f}" for n in names]
        lines.append(",".join(str(c) for c in cells))
    return "\n".join(lines) + "\n"


def _curve_png(curve: list[dict], budget: float | None) -> bytes:
    from continual_lora.report.plotting import png_bytes, pyplot

    plt = pyplot()
    steps = [p["step"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(steps, [p["gain"] for p in curve], marker="o", label="new-task gain")
    if any(p["old"] for p in curve):
        ax.plot(steps, [p["drop"] for p in curve], marker="s", label="old-task drop")
    if budget is not None:
        ax.axhline(budget, color="red", linestyle="--", linewidth=1, label=f"budget {budget:g}")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("score change since the old adapter")
    ax.legend(loc="best", fontsize=8)
    return png_bytes(fig)


def _flip_lines(tasks: list[TaskData], row0, row1) -> list[str]:
    lines = []
    for t in tasks:
        i = t.index - 1
        before, after = np.asarray(row0.correct[i], bool), np.asarray(row1.correct[i], bool)
        for k in np.flatnonzero(before != after):
            lines.append(json.dumps({"task": t.name, "example": int(k),
                                     "text": t.eval.texts[k],
                                     "label": t.classes[int(t.eval.labels[k])],
                                     "change": "lost" if before[k] else "gained"}))
    return lines


def write_report(out: Path, report: dict, tasks: list[TaskData], row0, row1) -> list[str]:
    """Write the report files into `out`; returns their names."""
    curve = report["budget"]["curve"]
    png = "budget_curve.png"
    write_bytes_atomic(out / png, _curve_png(curve, report["budget"].get("max_forgetting")))
    write_text_atomic(out / "budget_curve.csv", _curve_csv(curve))
    flips = _flip_lines(tasks, row0, row1)
    write_text_atomic(out / "flips.jsonl", "".join(line + "\n" for line in flips))
    write_text_atomic(out / "update_report.md", _markdown(report, png))
    write_json_atomic(out / "update_report.json", report)
    return ["update_report.json", "update_report.md", "budget_curve.csv", png, "flips.jsonl"]
