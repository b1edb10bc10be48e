"""The report people look at: `report.html`, one self-contained page built from a run, bench or
update folder's files alone, answering at a glance what each strategy kept, what it lost and
what it cost. The figures are also written as PNGs in the folder's `figures/` (to paste into a
paper) and are embedded in the page, so it opens anywhere, offline, on its own.

* Bench: the strategies on one chart (ACC against forgetting, point size for trainable
  parameters; ACC against wall time; joint marked as the upper bound), the comparison table
  with the metrics' definitions under it, the bench's extra tables (knowledge rounds,
  personalization), then one section per run.
* Run: the accuracy matrix as a heatmap with its values, each task's score across the stages
  with the upstream score, the training loss per task and data source, per-class (and
  contextual) forgetting for classifiers, the sample grids for diffusion, and the lineage of
  every adapter the run wrote.
* Update: the before/after table, the budget curve, the loss, the new adapter's lineage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from continual_lora.checkpoint import write_text_atomic
from continual_lora.diagnose import report_section as diagnosis
from continual_lora.report import figures
from continual_lora.report.folders import (
    RunFiles,
    bench_runs,
    folder_kind,
    read_run,
    read_steps,
)
from continual_lora.report.html import esc, image, markdown_tables, page, table

REPORT_FILE = "report.html"
FIGURES = "figures"


def build_report(folder: Path, top: int = 20, domains: dict[str, list[str]] | None = None,
                 cumulative: bool = False) -> Path:
    """Write `report.html` (and the PNGs in `figures/`) into a run, bench or update folder;
    returns the page's path. `top`, `domains` and `cumulative` are the per-class forgetting
    options (see report/forgetting.py)."""
    folder = Path(folder)
    kind = folder_kind(folder)
    options = {"top": top, "domains": domains or {}, "cumulative": cumulative}
    if kind == "bench":
        html_text = _bench_page(folder, options)
    elif kind == "run":
        html_text = _run_page(folder, options)
    else:
        html_text = _update_page(folder)
    path = folder / REPORT_FILE
    write_text_atomic(path, html_text)
    return path


def write_report_or_warn(folder: Path) -> Path | None:
    """`build_report` at the end of `run`, `bench`, `demo` and `update`, its path printed. A
    report that fails to build must not turn a finished run into a failed one: it says so on
    stderr, and how to build it again."""
    import sys

    try:
        path = build_report(folder)
    except Exception as exc:  # noqa: BLE001 - the run's own files are written and kept
        print(f"warning: the HTML report could not be built ({type(exc).__name__}: {exc}); "
              f"the run's files are complete. Build it with `continual-lora report {folder}`",
              file=sys.stderr)
        return None
    print(f"report: {path}")
    return path


# -- bench and run pages -----------------------------------------------------------------------


def _bench_page(bench: Path, options: dict) -> str:
    runs = [read_run(r) for r in bench_runs(bench)]
    finished = [r for r in runs if r.metrics is not None]
    rows = _comparison_rows(finished)
    body = []
    chart = figures.strategy_map(rows, bench / FIGURES / "strategies.png")
    body.append('<section class="card"><h2>Strategies side by side</h2>'
                + image(chart, bench, "average accuracy against forgetting and wall time; "
                        "joint training is the upper bound")
                + _metrics_table(rows) + _extra_tables(bench) + "</section>")
    body.append(diagnosis.bench_section(bench))  # "" until `continual-lora diagnose` ran
    unfinished = [r.folder.name for r in runs if r.metrics is None]
    if unfinished:
        body.append(f"<p class=\"meta\">not finished (no metrics.json; shown with the stages "
                    f"they scored): {esc(', '.join(unfinished))}</p>")
    body.append("<nav>" + "".join(f'<a href="#run-{esc(r.folder.name)}">{esc(r.title)}</a>'
                                  for r in runs) + "</nav>")
    for run in runs:
        body.append(_run_section(run, bench, options, heading="h2"))
    tasks = runs[0].tasks if runs else []
    base = runs[0].base if runs else ""
    return page(f"Bench {bench.name}", f"{len(runs)} runs · {len(tasks)} tasks "
                f"({', '.join(tasks)}) · base {base}", body)


def _run_page(run_dir: Path, options: dict) -> str:
    run = read_run(run_dir)
    rows = _comparison_rows([run]) if run.metrics is not None else []
    body = [_metrics_table(rows)] if rows else [
        "<p class=\"meta\">the run has not finished: the stages scored so far are shown</p>"]
    body.append(_run_section(run, run_dir, options, heading="h2", top_level=True))
    return page(f"Run {run_dir.name}: {run.title}", f"{len(run.tasks)} tasks "
                f"({', '.join(run.tasks)}) · base {run.base}", body)


def _comparison_rows(runs: list[RunFiles]) -> list[dict]:
    from continual_lora.bench import comparison_rows
    from continual_lora.runner import finished_result

    return comparison_rows([finished_result(r.folder) for r in runs])


def _metrics_table(rows: list[dict]) -> str:
    from continual_lora.bench import DEFINITIONS, format_cell, table_columns

    if not rows:
        return ""
    columns = table_columns(rows)
    cells = [[format_cell(key, row.get(key)) for key, _ in columns] for row in rows]
    return (table([title for _, title in columns], cells, "strategies", numeric_from=1)
            + f'<pre class="defs">{esc(DEFINITIONS)}</pre>')


def _extra_tables(bench: Path) -> str:
    """The bench's own extra tables (a causal LM's rounds, a diffusion bench's scores)."""
    parts = []
    for name, title in (("rounds.md", "Knowledge rounds"),
                        ("personalization.md", "Personalization scores")):
        if (bench / name).is_file():
            parts.append(f"<h3>{title}</h3>" + markdown_tables((bench / name).read_text()))
    return "".join(parts)


def _run_section(run: RunFiles, page_dir: Path, options: dict, heading: str = "h2",
                 top_level: bool = False) -> str:
    out = run.folder / FIGURES
    name = run.folder.name
    score = "accuracy" if "accuracy" in run.definition.lower() else "score"
    parts = [f'<section class="card" id="run-{esc(name)}"><{heading}>{esc(run.title)}'
             f"</{heading}>"]
    if not top_level:
        parts.append(f'<p class="meta">run folder runs/{esc(name)}</p>')
    m = run.metrics or {}
    if m:
        parts.append(f'<p class="meta">ACC {m["acc"]:.3f} · forgetting {m["forgetting"]:.3f} · '
                     f'BWT {m["bwt"]:.3f} · upstream retention '
                     f'{_num(m.get("upstream_retention"))} · wall time '
                     f'{m.get("wall_seconds", float("nan")):.0f} s</p>')
    heat = figures.accuracy_matrix(run.R, run.U, run.tasks, out / "accuracy_matrix.png",
                                   f"{run.title}: R[stage, task]", score)
    curves = figures.task_curves(run.R, run.U, run.tasks, out / "task_curves.png",
                                 f"{run.title}: each task across the stages", score)
    parts.append('<div class="pair">'
                 + image(heat, page_dir, "accuracy matrix (rows: after each task; last column: "
                         "the upstream task)")
                 + image(curves, page_dir, "per-task score across stages (dotted: before the "
                         "task was trained)") + "</div>")
    if run.definition:
        parts.append(f'<p class="meta">score: {esc(run.definition)}</p>')
    loss = figures.training_loss(run.steps, out / "training_loss.png", f"{run.title}: loss")
    parts.append(image(loss, page_dir, "training loss per task (dashed: per data source)"))
    parts.append(_forgetting(run, page_dir, options))
    parts.append(_samples(run.folder, page_dir))
    parts.append(diagnosis.run_section(run.folder, page_dir))  # "" without diagnosis.json
    parts.append(_lineage(run.folder))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _forgetting(run: RunFiles, page_dir: Path, options: dict) -> str:
    """Per-class (and contextual) forgetting, for runs whose predictions carry class names."""
    from continual_lora.report.forgetting import forgetting_report

    if run.metrics is None or not (run.folder / "predictions.npz").is_file():
        return ""
    try:
        numbers = forgetting_report(run.folder, options["top"], options["domains"],
                                    options["cumulative"])
    except ValueError:  # no class names: a causal LM or diffusion run
        return ""
    captions = {"class_forgetting.png": "per-class forgetting: the old classes that lost the "
                "most accuracy during each task",
                "contextual_forgetting.png": "contextual forgetting: Wu-Palmer similarity of the "
                "forgotten images vs all held-out images to each task's domain"}
    images = [image(run.folder / f, page_dir, captions.get(Path(f).name, f))
              for f in numbers["figures"]]
    return "<h3>What was forgotten, class by class</h3>" + "".join(images)


def _samples(run_dir: Path, page_dir: Path) -> str:
    """A diffusion run's fixed-seed sample grids (a row per task, a column per seed)."""
    grids = sorted((run_dir / "samples").glob("stage-*.png"))
    if not grids:
        return ""
    return ("<h3>Samples (fixed seeds; a row per task and the upstream concept)</h3>"
            + "".join(image(g, page_dir, f"stage {int(g.stem.split('-')[1])}") for g in grids))


def _lineage(run_dir: Path) -> str:
    """Each adapter the run wrote, its parent, and the ancestors it was started from."""
    from continual_lora.lineage import read_lineage

    records = []
    for stage in sorted((run_dir / "tasks").glob("[0-9][0-9]-*")):
        for part in ("adapter", "model"):
            record = read_lineage(stage / part) if (stage / part).is_dir() else None
            if record is not None:
                records.append((f"tasks/{stage.name}/{part}", record))
    if not records:
        return ""
    rows = []
    for ancestor in records[0][1].get("chain", []):
        rows.append(_lineage_row("(earlier) " + ancestor["run"]["name"], ancestor))
    rows += [_lineage_row(path, record) for path, record in records]
    return ("<h3>Lineage of the adapters</h3>"
            + table(["adapter", "stage", "task", "weights sha256", "parent", "strategy",
                     "steps", "lr", "ACC so far"], rows, numeric_from=6))


def _lineage_row(where: str, record: dict) -> list:
    parent = record.get("parent")
    parents = record.get("parents")
    if parents:
        parent_text = " + ".join(f"{Path(p['path']).name} ({p['sha256'][:10]})" for p in parents)
    elif parent:
        parent_text = f"{_short_path(parent['path'])} ({parent['sha256'][:10]})"
    else:
        parent_text = "base model"
    train = record.get("train") or {}
    metrics = record.get("metrics") or {}
    return [where, record["run"]["stage"], record["run"]["task"],
            record["adapter"]["sha256"][:12], parent_text, record["strategy"]["name"],
            train.get("steps", ""), _num(train.get("lr"), "g"), _num(metrics.get("acc_so_far"))]


def _short_path(path: str) -> str:
    """The last folders of a path (`tasks/01-a/adapter`), enough to find it in the run."""
    parts = Path(path).parts
    return "/".join(parts[-3:]) if len(parts) > 3 else path


def _num(value, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return format(value, fmt)


# -- update page -------------------------------------------------------------------------------


def _update_page(out: Path) -> str:
    from continual_lora.lineage import read_lineage
    from continual_lora.update.report import TABLE_HEADER, before_after_rows

    report = json.loads((out / "update_report.json").read_text())
    body = ['<section class="card"><h2>Before and after the update</h2>',
            table(TABLE_HEADER, before_after_rows(report), "before-after", numeric_from=2)]
    if report.get("old_mean"):
        body.append(f'<p class="meta">old tasks\' mean drop: {report["old_mean"]["drop"]:.3f}'
                    "</p>")
    body.append(image(out / "budget_curve.png", out, "new-task gain and old-task drop against "
                      "steps (the forgetting budget, if one was set)"))
    loss = figures.training_loss(read_steps(out / "log.jsonl"), out / FIGURES /
                                 "training_loss.png", "update: loss")
    body.append(image(loss, out, "training loss (dashed: per data source)"))
    body.append("</section>")
    record = read_lineage(out)
    if record is not None:
        rows = [_lineage_row("(earlier) " + a["run"]["name"], a) for a in record.get("chain", [])]
        rows.append(_lineage_row(out.name, record))
        body.append('<section class="card"><h2>Lineage</h2>'
                    + table(["adapter", "stage", "task", "weights sha256", "parent", "strategy",
                             "steps", "lr", "ACC so far"], rows, numeric_from=6) + "</section>")
    new = report["new"]
    return page(f"Update {out.name}", f"new task {new['task']}: {new['before']:.3f} → "
                f"{new['after']:.3f}", body)
