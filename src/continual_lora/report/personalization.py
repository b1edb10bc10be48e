"""Seed 003's table for a diffusion bench: per method, the Average Score (ACC) and the Average
Forgetting (F) under every image similarity the runs computed (DINO, CLIP-I, the stand-in),
with the base model's scores as the reference row. Reads the run folders only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from continual_lora import metrics

IMAGE_SCORERS = ("silhouette", "dino", "clip_i", "clip_t")
#: The table's metrics: every image similarity, and `recognised` (the fraction of samples
#: nearest their own task's references, under the run's first scorer).
TABLE_METRICS = (*IMAGE_SCORERS, "recognised")


def is_image_run(run_dir: Path) -> bool:
    results = json.loads((run_dir / "results.json").read_text())
    return bool(results.get("scorers")) and results["scorers"][0] in IMAGE_SCORERS


def run_scores(run_dir: Path) -> dict:
    """{label, metrics: {name: (base mean, ACC, F)}} of one finished diffusion run."""
    results = json.loads((run_dir / "results.json").read_text())
    summary = json.loads((run_dir / "metrics.json").read_text())
    details = results["details"]
    names = [n for n in TABLE_METRICS if all(n in cell for row in details for cell in row)]
    out = {}
    for name in names:
        R = np.array([[cell[name] for cell in row] for row in details])
        out[name] = (float(R[0].mean()), metrics.average_accuracy(R), metrics.forgetting(R)
                     if R.shape[1] > 1 else float("nan"))
    return {"label": summary.get("label", summary["strategy"]), "metrics": out}


def format_personalization(runs: list[dict]) -> str:
    names = [n for n in TABLE_METRICS if all(n in r["metrics"] for r in runs)]
    head = ("| method | " + " | ".join(f"Average Score {n}" for n in names) + " | "
            + " | ".join(f"Average Forgetting {n}" for n in names) + " |")
    lines = [head, "|" + "---|" * (1 + 2 * len(names))]
    base = runs[0]["metrics"]
    lines.append("| base model (reference) | " + " | ".join(f"{base[n][0]:.3f}" for n in names)
                 + " | " + " | ".join("–" for _ in names) + " |")
    for run in runs:
        m = run["metrics"]
        lines.append(f"| {run['label']} | " + " | ".join(f"{m[n][1]:.3f}" for n in names)
                     + " | " + " | ".join(f"{m[n][2]:.3f}" for n in names) + " |")
    return "\n".join(lines)


DEFINITIONS = (
    "Average Score: the mean over tasks of the task's score after the last task (ACC); Average "
    "Forgetting: the mean over all but the last task of the best score a task had minus its "
    "final score (F). A score is the mean cosine similarity of the task's fixed-seed samples to "
    "its reference images under the named image encoder; `recognised` is the fraction of its "
    "samples nearer (mean similarity) to its own references than to any other reference set "
    "of the run (every task and upstream concept), under the first encoder: similar concepts "
    "score high against each other's references, so likeness alone does not say the concept "
    "is the one asked for. The reference row is the base model before any training (mean over "
    "tasks of row 0).")
