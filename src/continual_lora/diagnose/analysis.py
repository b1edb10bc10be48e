"""The measures over every pair of tasks (i < j), per module, gathered per layer and overall.

One module at a time (peak memory: the T dense updates of one module):

* opposed ratio of τ_j against τ_i and the cosine of τ_i, τ_j: over the entries of a layer's
  modules taken together (and of all modules, for the overall number);
* input and output subspace overlap: per module, between the top-r row spaces (input side) and
  column spaces (output side) of τ_i and τ_j, r the rank each task trained with, then the mean
  over a layer's modules (and over all modules). For an adapter with its own factors the top-r
  row space of s·B·A is the row space of its A (B has rank r once trained), which is what
  `ortho_init` and `olora` make orthogonal;
* ‖τ_t‖ / ‖W0‖ per layer and task, when the base weights are at hand.

A module whose update is zero in some task (a pooler the model never uses gets no gradient)
has no direction to compare: it is left out of that task's pairs and named in the result.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from itertools import combinations

from continual_lora.diagnose import measures
from continual_lora.diagnose.task_vectors import TaskVectors

PAIR_MEASURES = ("opposed_ratio", "cosine", "overlap_input", "overlap_output")


def layer_of(module: str) -> str:
    """The layer a module belongs to: its path up to the first numeric part
    (`encoder.layer.3.attention.self.query` → `encoder.layer.3`), or its parent for a module
    outside the numbered layers (`pooler.dense` → `pooler`)."""
    parts = module.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:k + 1])
    return ".".join(parts[:-1]) or module


def _natural(text: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def layer_labels(layers: list[str]) -> list[str]:
    """Short labels: the layer number when the numbered layers share one prefix (`3`), the
    full path otherwise and for the others (`pooler`)."""
    numbered = [layer for layer in layers if layer.split(".")[-1].isdigit()]
    prefixes = {layer.rsplit(".", 1)[0] for layer in numbered}
    if len(prefixes) == 1:
        return [layer.rsplit(".", 1)[1] if layer in numbered else layer for layer in layers]
    return list(layers)


class _Sums:
    """What a layer (or the whole model) accumulates for one pair of tasks."""

    def __init__(self):
        self.opposed_sq = self.update_sq = 0.0
        self.dot = self.a_sq = self.b_sq = 0.0
        self.overlaps: dict[str, list[float]] = defaultdict(list)

    def add(self, tau_i, tau_j, subspaces_i, subspaces_j) -> None:
        opposed, total = measures.opposed_parts(tau_i, tau_j)
        self.opposed_sq += opposed
        self.update_sq += total
        dot, a_sq, b_sq = measures.cosine_parts(tau_i, tau_j)
        self.dot += dot
        self.a_sq += a_sq
        self.b_sq += b_sq
        for side, k in (("output", 0), ("input", 1)):
            U, V = subspaces_i[k], subspaces_j[k]
            self.overlaps[side].append(measures.subspace_overlap(U, V))
            self.overlaps[f"chance_{side}"].append(
                measures.chance_overlap(U.shape[1], V.shape[1], U.shape[0]))

    def result(self) -> dict[str, float]:
        out = {"opposed_ratio": measures.sqrt_ratio(self.opposed_sq, self.update_sq),
               "cosine": measures.cosine_of_parts(self.dot, self.a_sq, self.b_sq)}
        for key in ("input", "output"):
            out[f"overlap_{key}"] = _mean(self.overlaps[key])
            out[f"chance_overlap_{key}"] = _mean(self.overlaps[f"chance_{key}"])
        return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def analyse(vectors: TaskVectors, base_sq: dict[str, float] | None = None) -> dict:
    """Every pair's measures overall and per layer, and each task's relative norm per layer
    (`base_sq`: ‖W0‖² per module; None or missing modules: no relative norm there)."""
    modules = vectors.modules
    layers = sorted({layer_of(m) for m in modules}, key=_natural)
    n_tasks = len(vectors.tasks)
    pairs = list(combinations(range(n_tasks), 2))
    overall = {p: _Sums() for p in pairs}
    by_layer = {p: {layer: _Sums() for layer in layers} for p in pairs}
    update_sq = [defaultdict(float) for _ in range(n_tasks)]
    w0_sq: dict[str, float] = defaultdict(float)
    without_update: dict[str, list[str]] = {}
    for module in modules:
        layer = layer_of(module)
        factored = [vectors.updates[t][module] for t in range(n_tasks)]
        dense = [f.dense() for f in factored]
        norms_sq = [float(d.pow(2).sum()) for d in dense]
        zero = [vectors.tasks[t] for t in range(n_tasks) if norms_sq[t] == 0.0]
        if zero:
            without_update[module] = zero
        subspaces = [measures.factored_subspaces(f, vectors.ranks[t]) if norms_sq[t] > 0
                     else None for t, f in enumerate(factored)]
        for i, j in pairs:
            if subspaces[i] is None or subspaces[j] is None:
                continue
            overall[(i, j)].add(dense[i], dense[j], subspaces[i], subspaces[j])
            by_layer[(i, j)][layer].add(dense[i], dense[j], subspaces[i], subspaces[j])
        if base_sq is not None and module in base_sq:
            w0_sq[layer] += base_sq[module]
            for t in range(n_tasks):
                update_sq[t][layer] += norms_sq[t]
    pair_rows = []
    for i, j in pairs:
        row = {"i": i + 1, "j": j + 1, "tasks": [vectors.tasks[i], vectors.tasks[j]],
               "consecutive": j == i + 1, **overall[(i, j)].result()}
        per_layer = [by_layer[(i, j)][layer].result() for layer in layers]
        row["per_layer"] = {key: [r[key] for r in per_layer] for key in per_layer[0]}
        pair_rows.append(row)
    return {
        "tasks": list(vectors.tasks),
        "ranks": list(vectors.ranks),
        "layers": layer_labels(layers),
        "layer_paths": layers,
        "modules": len(modules),
        "modules_without_update": without_update,
        "pairs": pair_rows,
        "relative_norm": _relative_norms(vectors.tasks, layers, update_sq, w0_sq),
        "chance": {"opposed_ratio": measures.CHANCE_OPPOSED},
    }


def _relative_norms(tasks: list[str], layers: list[str], update_sq: list[dict[str, float]],
                    w0_sq: dict[str, float]) -> dict | None:
    """‖τ_t‖/‖W0‖ per task, per layer and over all modules whose W0 was found."""
    if not w0_sq:
        return None
    per_layer = [[measures.sqrt_ratio(sq[layer], w0_sq[layer]) if layer in w0_sq else math.nan
                  for layer in layers] for sq in update_sq]
    total = [measures.sqrt_ratio(sum(sq.values()), sum(w0_sq.values())) for sq in update_sq]
    return {"tasks": list(tasks), "total": total, "per_layer": per_layer}


def summarise(analysis: dict, drift: dict | None) -> dict:
    """The few numbers a reader compares across strategies: means over consecutive pairs
    (task t against task t+1, where forgetting happens first) and over all pairs, the layers
    that moved most, and the upstream CKA at the last layer after the last task."""
    out = {}
    for scope, rows in (("consecutive", [p for p in analysis["pairs"] if p["consecutive"]]),
                        ("all_pairs", analysis["pairs"])):
        for key in (*PAIR_MEASURES, "chance_overlap_input", "chance_overlap_output"):
            out[f"{key}_{scope}"] = _mean([p[key] for p in rows])
    norms = analysis.get("relative_norm")
    if norms:
        columns = list(zip(*norms["per_layer"], strict=True))
        means = [(_mean(list(c)), label) for c, label in zip(columns, analysis["layers"],
                                                              strict=True)]
        ranked = sorted((m for m in means if math.isfinite(m[0])), reverse=True)
        out["top_moving_layers"] = [{"layer": label, "relative_norm": value}
                                    for value, label in ranked[:3]]
        out["relative_norm_mean"] = _mean(norms["total"])
    if drift and drift.get("cka"):
        out["cka_last_layer_after_last_task"] = drift["cka"][-1][-1]
        out["cka_min_after_last_task"] = min(drift["cka"][-1])
    return out
