"""The diagnosis's figures, drawn with the report's plotting helpers (headless, PNGs written
whole): each returns the path it wrote, or None when there is nothing to draw.

* `pair_heatmaps`: per pair of tasks (rows) and layer (columns): the opposed ratio, the cosine,
  the input-side and output-side subspace overlap.
* `layer_norms`: ‖τ_t‖/‖W0‖ per task (rows) and layer (columns): which layers moved.
* `drift_curves`: the upstream CKA per layer, one line per stage.
* `bench_chart`: each run's forgetting against its mean opposed ratio and mean overlap between
  consecutive tasks, one point per strategy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from continual_lora.diagnose.measures import CHANCE_OPPOSED
from continual_lora.report.plotting import pyplot, save_png

PANELS = (("opposed_ratio", "opposed ratio (≈0.71: unrelated signs)", "magma", (0.0, 1.0)),
          ("cosine", "cosine of τ_i, τ_j", "coolwarm", (-1.0, 1.0)),
          ("overlap_input", "input subspace overlap (rows of A)", "viridis", (0.0, 1.0)),
          ("overlap_output", "output subspace overlap (columns of ΔW)", "viridis", (0.0, 1.0)))


def _heatmap(ax, grid: np.ndarray, rows: list[str], columns: list[str], cmap: str,
             limits: tuple[float, float], title: str, annotate: bool, digits: int = 2) -> None:
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", vmin=limits[0],
                      vmax=limits[1])
    if annotate:
        for r in range(grid.shape[0]):
            for c in range(grid.shape[1]):
                if np.isfinite(grid[r, c]):
                    ax.text(c, r, f"{grid[r, c]:.{digits}f}", ha="center", va="center", fontsize=6,
                            color=_text_color(grid[r, c], cmap, limits))
    ax.set_xticks(range(len(columns)), columns, fontsize=7, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)


def _text_color(value: float, cmap: str, limits: tuple[float, float]) -> str:
    """Readable on the cell: viridis and magma are dark at their low end; coolwarm is light
    in the middle and only mid-dark at its ends."""
    if cmap == "coolwarm":
        return "black"
    span = limits[1] - limits[0]
    return "white" if span > 0 and (value - limits[0]) / span < 0.5 else "black"


def _grid(values: list[list[float | None]]) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in values], dtype=float)


def pair_heatmaps(diagnosis: dict, path: Path, title: str = "") -> Path | None:
    pairs = diagnosis["pairs"]
    if not pairs:
        return None
    plt = pyplot()
    rows = [f"{p['tasks'][0]} → {p['tasks'][1]}" for p in pairs]
    # Layers with nothing to compare in any pair (a pooler the model never uses) are left out.
    keep = [k for k in range(len(diagnosis["layers"]))
            if any(_finite(p["per_layer"]["overlap_input"][k]) for p in pairs)]
    columns = [diagnosis["layers"][k] for k in keep]
    annotate = len(rows) * len(columns) <= 120
    fig, axes = plt.subplots(2, 2, figsize=(max(8.0, 0.55 * len(columns) * 2 + 4),
                                            max(4.5, 0.32 * len(rows) * 2 + 2.5)))
    for ax, (key, label, cmap, limits) in zip(axes.flat, PANELS, strict=True):
        grid = _grid([[p["per_layer"][key][k] for k in keep] for p in pairs])
        _heatmap(ax, grid, rows, columns, cmap, limits, label, annotate)
        ax.set_xlabel("layer", fontsize=7)
    fig.suptitle(title or "interference between tasks, per layer (rows: earlier → later task)",
                 fontsize=9)
    return save_png(fig, path)


def layer_norms(diagnosis: dict, path: Path, title: str = "") -> Path | None:
    norms = diagnosis.get("relative_norm")
    if not norms:
        return None
    plt = pyplot()
    grid = _grid(norms["per_layer"])
    columns = diagnosis["layers"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(columns) + 2.5),
                                    0.45 * len(norms["tasks"]) + 1.8))
    finite = grid[np.isfinite(grid)]
    high = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    _heatmap(ax, grid, norms["tasks"], columns, "viridis", (0.0, high),
             title or "which layers moved: ‖τ_t‖ / ‖W0‖",
             len(columns) * len(norms["tasks"]) <= 120, digits=3)
    ax.set_xlabel("layer", fontsize=7)
    ax.set_ylabel("task", fontsize=7)
    return save_png(fig, path)


def drift_curves(drift: dict | None, path: Path, title: str = "") -> Path | None:
    if not drift or not drift.get("cka"):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    x = np.arange(len(drift["layers"]))
    colors = plt.get_cmap("viridis")
    stages = drift["stages"]
    for k, (stage, values) in enumerate(zip(stages, drift["cka"], strict=True)):
        ax.plot(x, _grid([values])[0], marker="o", ms=3,
                color=colors(k / max(1, len(stages) - 1)), label=stage)
    ax.set_xticks(x, drift["layers"], fontsize=7)
    ax.set_xlabel("layer", fontsize=7)
    ax.set_ylabel("linear CKA with the base (1: unchanged)", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower left")
    ax.set_title(title or f"upstream representation drift ({drift['texts']} probe texts)",
                 fontsize=8)
    return save_png(fig, path)


def bench_chart(runs: list[dict], path: Path) -> Path | None:
    """`runs`: the bench summary's rows (label, forgetting and the consecutive-pair means)."""
    points = [r for r in runs if _finite(r.get("forgetting"))]
    if not points:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    colors = plt.get_cmap("tab10")
    panels = (("opposed_ratio_consecutive", "mean opposed ratio, consecutive tasks",
               "unrelated signs"),
              ("overlap_input_consecutive", "mean input overlap, consecutive tasks", "chance"),
              ("overlap_output_consecutive", "mean output overlap, consecutive tasks", "chance"))
    for ax, (key, label, reference_name) in zip(axes, panels, strict=True):
        shown = [r for r in points if _finite(r.get(key))]
        for k, row in enumerate(shown):
            ax.scatter(row[key], row["forgetting"], color=colors(k % 10), s=50, zorder=3)
            ax.annotate(row["label"], (row[key], row["forgetting"]), fontsize=7, xytext=(5, 3),
                        textcoords="offset points")
        reference = _reference(key, shown)
        if reference is not None:
            ax.axvline(reference, color="grey", ls="--", lw=0.8, label=reference_name)
            ax.legend(fontsize=7, loc="best")
        # At least MIN_SPAN wide around the points and the reference: differences in the
        # third decimal must not fill the axis as if they were large.
        values = [r[key] for r in shown] + ([reference] if reference is not None else [])
        if values:
            middle = (min(values) + max(values)) / 2
            half = max(MIN_SPAN, max(values) - min(values)) / 2 * 1.25
            ax.set_xlim(middle - half, middle + half)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("forgetting ↓", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.margins(y=0.2)
    fig.suptitle("do the strategies that forget less interfere less?", fontsize=9)
    return save_png(fig, path)


MIN_SPAN = 0.1


def _reference(key: str, rows: list[dict]) -> float | None:
    """The level a bench panel's numbers compare with: √½ for the opposed ratio, the mean chance
    overlap of the runs for an overlap."""
    if key.startswith("opposed_ratio"):
        return CHANCE_OPPOSED
    chance = [r[f"chance_{key}"] for r in rows if _finite(r.get(f"chance_{key}"))]
    return sum(chance) / len(chance) if chance else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
