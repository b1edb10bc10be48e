"""The per-round table of a knowledge-addition bench (seed 004's view), read from run folders.

For each row of a bench (a strategy) and each round t: acquisition of round t, retention of the
earlier rounds, and the upstream perplexity (general text the base model was good at) after
round t; `metrics.per_round` defines the first two.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from continual_lora import metrics


def run_rounds(run_dir: Path) -> dict:
    """{label, tasks, base_perplexity, rounds: [{round, task, acquisition, retention, retained,
    seen, upstream_perplexity}]} of one finished run folder."""
    results = json.loads((run_dir / "results.json").read_text())
    summary = json.loads((run_dir / "metrics.json").read_text())
    ups = results.get("upstream_details") or [None] * len(results["R"])
    ppl = [u.get("perplexity") if u else None for u in ups]
    rounds = []
    for t, row in enumerate(metrics.per_round(results["R"]), start=1):
        rounds.append({"round": t, "task": results["tasks"][t - 1], **row,
                       "upstream_perplexity": ppl[t]})
    return {"label": summary.get("label", summary["strategy"]), "tasks": results["tasks"],
            "base_perplexity": ppl[0], "base_scores": results["R"][0], "rounds": rounds}


def _cell(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def format_rounds(runs: list[dict]) -> str:
    """One markdown table: a row per (strategy, round)."""
    lines = ["| strategy | round | acquisition | retention of earlier | retained share | "
             "all rounds so far | upstream perplexity |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['label']} | base | – | – | – | – | "
                     f"{_cell(run['base_perplexity'], 2)} |")
        for r in run["rounds"]:
            lines.append(f"| {run['label']} | {r['round']} {r['task']} | "
                         f"{_cell(r['acquisition'])} | {_cell(r['retention'])} | "
                         f"{_cell(r['retained'])} | {_cell(r['seen'])} | "
                         f"{_cell(r['upstream_perplexity'], 2)} |")
    return "\n".join(lines)
