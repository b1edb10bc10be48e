"""The report's figures of runs and benches, drawn from what a run folder holds (results.json,
metrics.json, log.jsonl): each returns the path of the PNG it wrote.

* `accuracy_matrix`: R[t, i] as a heatmap with its values, the upstream score as a last column.
* `task_curves`: each task's score across the stages, one line per task, the upstream dashed.
* `training_loss`: the loss against the global step, per task, and per data source where a
  batch mixed several (replay, joint).
* `strategy_map`: the strategies of a bench on one chart: average accuracy against forgetting
  (point size: trainable parameters), and against wall time; joint training is marked as the
  upper bound.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from continual_lora.report.plotting import pyplot, save_png

STAGE0 = "before"


def stage_labels(tasks: list[str]) -> list[str]:
    return [STAGE0] + [f"after {t}" for t in tasks]


def accuracy_matrix(R: np.ndarray, U: np.ndarray, tasks: list[str], path: Path,
                    title: str = "", score: str = "score") -> Path:
    plt = pyplot()
    has_upstream = not np.all(np.isnan(U))
    grid = np.column_stack([R, U]) if has_upstream else np.asarray(R, float)
    columns = tasks + (["upstream"] if has_upstream else [])
    rows = stage_labels(tasks)
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2.4, 0.5 * len(rows) + 1.6))
    finite = grid[np.isfinite(grid)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto",
                      vmin=low, vmax=high if high > low else low + 1e-9)
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            value = grid[r, c]
            if np.isfinite(value):
                bright = (value - low) / (high - low) > 0.6 if high > low else True
                ax.text(c, r, f"{value:.3f}", ha="center", va="center", fontsize=8,
                        color="black" if bright else "white")
    if has_upstream:
        ax.axvline(len(tasks) - 0.5, color="white", lw=2)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel(f"task scored ({score})", fontsize=8)
    ax.set_title(title or "accuracy matrix R[stage, task]", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    return save_png(fig, path)


def task_curves(R: np.ndarray, U: np.ndarray, tasks: list[str], path: Path,
                title: str = "", score: str = "score") -> Path:
    """One line per task across stages; a task's line is solid from the stage it was trained
    and dotted before (what the model scored on it before learning it)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(tasks) + 2.5), 3.6))
    x = np.arange(len(tasks) + 1)
    colors = plt.get_cmap("tab10")
    for i, task in enumerate(tasks):
        color = colors(i % 10)
        column = np.asarray(R)[:, i]
        ax.plot(x[: i + 2], column[: i + 2], ls=":", color=color, lw=1)
        ax.plot(x[i + 1:], column[i + 1:], marker="o", ms=4, color=color, label=task)
    if not np.all(np.isnan(U)):
        ax.plot(x, U, ls="--", marker="s", ms=4, color="black", label="upstream")
    ax.set_xticks(x, stage_labels(tasks), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(score, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title or "each task's score across the stages", fontsize=9)
    return save_png(fig, path)


def training_loss(steps: list[dict], path: Path, title: str = "") -> Path | None:
    """The `step` events of log.jsonl: loss against the global step per task (solid), and the
    loss on each data source where batches mixed several (thin). None without step events."""
    if not steps:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    colors = plt.get_cmap("tab10")
    tasks = list(dict.fromkeys(e["task"] for e in steps))
    sources = list(dict.fromkeys(s for e in steps for s in (e.get("loss_by_source") or {})))
    color_of = {name: colors(i % 10) for i, name in enumerate(dict.fromkeys(tasks + sources))}
    for task in tasks:
        events = [e for e in steps if e["task"] == task]
        x = [e["global_step"] for e in events]
        ax.plot(x, [e["loss"] for e in events], color=color_of[task], lw=1.6,
                label=f"training {task}")
        mixed = {s for e in events for s in (e.get("loss_by_source") or {})}
        if len(mixed) > 1:
            for source in sorted(mixed):
                points = [(e["global_step"], e["loss_by_source"][source]) for e in events
                          if source in (e.get("loss_by_source") or {})]
                ax.plot(*zip(*points, strict=True), color=color_of[source], lw=0.8, ls="--",
                        alpha=0.8, label=f"  {source} examples (during {task})")
    ax.set_xlabel("global step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if len(labels) <= 16:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title or "training loss", fontsize=9)
    return save_png(fig, path)


def strategy_map(rows: list[dict], path: Path) -> Path | None:
    """Rows of the comparison table (strategy, rank, acc, forgetting, trainable_parameters,
    wall_seconds): ACC against forgetting (size: trainable parameters) and ACC against wall
    time. `joint` is drawn as a star and its ACC as the upper-bound line."""
    points = [r for r in rows if _finite(r.get("acc")) and _finite(r.get("forgetting"))]
    if not points:
        return None
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = np.array([float(r.get("trainable_parameters") or 0) for r in points])
    scaled = 40 + 360 * np.sqrt(sizes / sizes.max()) if sizes.max() > 0 else np.full(len(points),
                                                                                       80.0)
    colors = pyplot().get_cmap("tab10")
    joint_acc = [r["acc"] for r in points if str(r["strategy"]).startswith("joint")]
    for k, (row, size) in enumerate(zip(points, scaled, strict=True)):
        is_joint = str(row["strategy"]).startswith("joint")
        label = str(row["strategy"]) + (f" r{row['rank']}" if row.get("rank") else "")
        style = {"marker": "*" if is_joint else "o", "color": "black" if is_joint
                 else colors(k % 10), "edgecolors": "white", "linewidths": 0.6, "zorder": 3}
        left.scatter(row["forgetting"], row["acc"], s=size * (1.6 if is_joint else 1), **style)
        left.annotate(label, (row["forgetting"], row["acc"]), fontsize=7, xytext=(6, 4),
                      textcoords="offset points")
        if _finite(row.get("wall_seconds")):
            right.scatter(row["wall_seconds"], row["acc"], s=80 * (1.6 if is_joint else 1),
                          **style)
            right.annotate(label, (row["wall_seconds"], row["acc"]), fontsize=7,
                           xytext=(6, 4), textcoords="offset points")
    for ax in (left, right):
        if joint_acc:
            ax.axhline(max(joint_acc), color="black", ls="--", lw=0.8,
                       label=f"joint (upper bound): ACC {max(joint_acc):.3f}")
            ax.legend(fontsize=7, loc="best")  # where it covers the fewest points
        ax.set_ylabel("average accuracy ACC ↑", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.margins(x=0.2, y=0.15)
    left.set_xlabel("forgetting ↓ (point size: trainable parameters)", fontsize=8)
    left.set_title("what each strategy kept and lost", fontsize=9)
    right.set_xlabel("wall time (s) ↓", fontsize=8)
    right.set_title("what it cost", fontsize=9)
    return save_png(fig, path)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
