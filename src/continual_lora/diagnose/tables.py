"""diagnosis.md: the diagnosis as Markdown tables, with what each number means (the command prints
the same text)."""

from __future__ import annotations

import math

MEANING = """\
- opposed ratio: ‖τ_j on the entries whose sign opposes τ_i‖ / ‖τ_j‖ (seed 003, Fig. 2): 0 for
  identical updates, 1 for exactly opposite ones, about 0.71 when the signs are unrelated.
- cosine: of τ_i and τ_j over all entries (negative: task j undoes task i).
- input / output overlap: mean squared cosine of the principal angles between the top-r row
  spaces (input side; for a task's own adapter, the rows of its A) or column spaces (output
  side) of τ_i and τ_j, per module, averaged: 1 shared, 0 orthogonal; (chance) is what random
  subspaces of those sizes give. A fresh adapter's A starts random, so separate adapters start
  near chance (ortho_init: at 0); one adapter trained on (naive, replay, lwf) starts every task
  from the A of the one before.
- ‖τ_t‖/‖W0‖: the size of task t's update relative to the base weights it changes.
- CKA: linear CKA of the upstream probe's pooled representations, base vs adapted model, per
  layer: 1 unchanged (up to rotation and scale); lower, the representation moved.
"""


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def pair_table(diagnosis: dict) -> str:
    rows = [[f"{p['tasks'][0]} → {p['tasks'][1]}" + ("" if p["consecutive"] else " (not adjacent)"),
             fmt(p["opposed_ratio"]), fmt(p["cosine"]),
             f"{fmt(p['overlap_input'])} ({fmt(p['chance_overlap_input'])})",
             f"{fmt(p['overlap_output'])} ({fmt(p['chance_overlap_output'])})"]
            for p in diagnosis["pairs"]]
    return _table(["earlier → later task", "opposed ratio", "cosine", "input overlap (chance)",
                   "output overlap (chance)"], rows)


def norm_table(diagnosis: dict) -> str:
    norms = diagnosis["relative_norm"]
    rows = [[task, fmt(total, 4), *[fmt(v, 4) for v in per_layer]]
            for task, total, per_layer in zip(norms["tasks"], norms["total"], norms["per_layer"],
                                              strict=True)]
    return _table(["task", "all layers", *[_layer(x) for x in diagnosis["layers"]]], rows)


def drift_table(drift: dict) -> str:
    rows = [[stage, *[fmt(v) for v in values]]
            for stage, values in zip(drift["stages"], drift["cka"], strict=True)]
    return _table(["stage", *[_layer(x) for x in drift["layers"]]], rows)


def _layer(label: str) -> str:
    return f"layer {label}" if label.isdigit() else label


def run_markdown(diagnosis: dict) -> str:
    title = diagnosis["label"] + (f" (rank {diagnosis['rank']})" if diagnosis.get("rank") else "")
    tv = diagnosis["task_vectors"]
    drops = [(task, drop) for task, drop in zip(diagnosis["tasks"],
                                                  diagnosis.get("old_task_drop") or [],
                                                  strict=False) if drop is not None]
    parts = [f"# Diagnosis: {title}", "", *diagnosis["verdict"], ""]
    if drops:
        parts += ["How much the earlier tasks' mean score fell during each stage: "
                  + ", ".join(f"{task} {fmt(drop)}" for task, drop in drops) + ".", ""]
    parts += [f"Task vectors (`{tv['definition']}`): {tv['explanation']}.",
             *[f"Note: {n}." for n in tv["notes"]], "",
             "## Between tasks (all layers; per layer in figures/diagnosis_pairs.png)", "",
             pair_table(diagnosis), ""]
    without = diagnosis.get("modules_without_update") or {}
    if without:
        names = ", ".join(sorted(without))
        parts += [f"Left out of the pairs where their update is zero: {names}.", ""]
    if diagnosis.get("relative_norm"):
        parts += ["## Which layers moved: ‖τ_t‖ / ‖W0‖", "", norm_table(diagnosis), ""]
    drift = diagnosis["drift"]
    if drift.get("cka"):
        parts += [f"## Upstream drift: linear CKA with the base ({drift['probe']}, "
                  f"{drift['texts']} texts)", "", drift_table(drift), ""]
        if drift.get("note"):
            parts += [f"Note: {drift['note']}.", ""]
    else:
        parts += [f"Upstream drift not measured: {drift.get('skipped')}.", ""]
    parts += ["## What the numbers mean", "", MEANING]
    return "\n".join(parts)


BENCH_COLUMNS = (("forgetting", "forgetting"), ("upstream_retention", "upstream retention"),
                 ("opposed_ratio_consecutive", "opposed ratio"),
                 ("cosine_consecutive", "cosine"),
                 ("overlap_input_consecutive", "input overlap"),
                 ("overlap_output_consecutive", "output overlap"),
                 ("cka_last_layer_after_last_task", "CKA last layer, end"))


def bench_table(rows: list[dict]) -> str:
    body = []
    for row in rows:
        top = ", ".join(f"{x['layer']} ({x['relative_norm']:.3f})"
                        for x in row.get("top_moving_layers") or [])
        body.append([row["label"], str(row.get("rank") or "–"),
                     *[fmt(row.get(key)) for key, _ in BENCH_COLUMNS], top or "–",
                     row["definition"]])
    return _table(["strategy", "rank", *[title for _, title in BENCH_COLUMNS],
                   "top moving layers (‖τ‖/‖W0‖, mean over tasks)", "task vectors"], body)


def bench_markdown(diagnosis: dict) -> str:
    corr = diagnosis["correlations"]
    parts = [f"# Diagnosis of the bench {diagnosis['source']['path']}", "",
             *diagnosis["verdict"], "",
             "Per run, means over consecutive task pairs (task t against task t+1); CKA at the "
             "last layer after the last task. Each run's own diagnosis.md has the per-pair and "
             "per-layer numbers.", "", bench_table(diagnosis["runs"]), "",
             f"Spearman rank correlation with forgetting over the {corr['n']} sequentially "
             f"trained runs ({', '.join(corr['runs'])}; joint retrains from the base and is "
             "left out):", ""]
    parts += [f"- {title}: {fmt(corr.get(key), 2)}" for key, title in BENCH_COLUMNS[2:]]
    for skipped in diagnosis["skipped"]:
        parts.append(f"\nNot diagnosed: {skipped['run']}: {skipped['reason']}")
    parts += ["", "## What the numbers mean", "", MEANING]
    return "\n".join(parts)


def terminal_text(kind: str, diagnosis: dict) -> str:
    """What the command prints: the verdict and the main table."""
    if kind == "bench":
        skipped = [f"not diagnosed: {s['run']}: {s['reason']}" for s in diagnosis["skipped"]]
        return "\n".join([*diagnosis["verdict"], "", bench_table(diagnosis["runs"]), *skipped])
    tv = diagnosis["task_vectors"]
    return "\n".join([*diagnosis["verdict"], "", pair_table(diagnosis), "",
                      f"task vectors ({tv['definition']}): {tv['explanation']}",
                      *[f"note: {n}" for n in tv["notes"]]])
