"""The short text that links a diagnosis's numbers to what a user can change.

It reads only the diagnosis dict, states each number next to the level it should be compared
with (chance for the overlaps, √½ for the opposed ratio, 1 for CKA), and names the strategies
that act on what it found: seed 003 traces forgetting to conflicting updates (orthogonal
strategies and merging keep them apart), seed 002 to rank (a lower rank forgets less, of the
upstream task too).
"""

from __future__ import annotations

import math

from continual_lora.diagnose.measures import CHANCE_OPPOSED
from continual_lora.diagnose.tables import fmt

#: An overlap this many times what random subspaces give is "shared"; below LOW_OVERLAP times
#: it the subspaces are about as apart as random ones.
SHARED_OVERLAP = 5.0
LOW_OVERLAP = 2.0
#: An opposed ratio counts as conflicting this far above √½ (closer is noise around chance).
OPPOSED_MARGIN = 0.02
#: Cosines beyond ±COSINE_NOTABLE are worth a sentence.
COSINE_NOTABLE = 0.1
#: Per-run numbers (forgetting included) closer than this are ties when runs are ranked: on the
#: demo's held-out sets 0.01 of forgetting is one to three examples per task.
TIE_TOLERANCE = 0.01
#: A rank correlation weaker than this (in size) is reported as no clear relation.
CLEAR_RHO = 0.5


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def layer_span(labels: list[str]) -> str:
    """`4–5` for adjacent numbered layers, else a list (`1, 4`)."""
    if len(labels) == 2 and all(x.isdigit() for x in labels) \
            and abs(int(labels[0]) - int(labels[1])) == 1:
        low, high = sorted(labels, key=int)
        return f"layers {low}–{high}"
    return ("layer " if len(labels) == 1 else "layers ") + ", ".join(labels)


def _top_layers(pair: dict, key: str, labels: list[str], count: int = 2) -> list[str]:
    values = pair["per_layer"][key]
    ranked = sorted((v, label) for v, label in zip(values, labels, strict=True) if _finite(v))
    return [label for _, label in ranked[::-1][:count]]


def _comparable(pair: dict) -> bool:
    return (pair["consecutive"] and _finite(pair["overlap_input"])
            and _finite(pair["chance_overlap_input"]) and pair["chance_overlap_input"] > 0)


def pair_to_describe(diagnosis: dict) -> tuple[dict | None, str]:
    """The consecutive pair (t−1, t) of the stage where the earlier tasks lost the most, with a
    sentence saying so; without a recorded drop, the pair whose input overlap stands highest
    above chance."""
    pairs = [p for p in diagnosis["pairs"] if _comparable(p)]
    if not pairs:
        return None, ""
    drops = diagnosis.get("old_task_drop") or []
    stages = [(d, t) for t, d in enumerate(drops, start=1) if _finite(d) and d > 0]
    if stages:
        drop, t = max(stages)
        match = [p for p in pairs if p["j"] == t]
        if match:
            tasks = diagnosis["tasks"]
            return match[0], (f"The earlier tasks lost most while {tasks[t - 1]} was trained "
                              f"(their mean score fell by {drop:.3f}).")
    return max(pairs, key=lambda p: p["overlap_input"] / p["chance_overlap_input"]), ""


def pair_sentence(pair: dict, labels: list[str]) -> str:
    """What a pair of tasks shares and how far its updates oppose each other."""
    a, b = pair["tasks"]
    ratio = pair["overlap_input"] / pair["chance_overlap_input"]
    share = ("share most of their input subspace" if pair["overlap_input"] >= 0.5 else
             "share much of their input subspace" if ratio >= SHARED_OVERLAP else
             "overlap somewhat in their input subspace" if ratio >= LOW_OVERLAP else
             "write into nearly orthogonal input subspaces")
    where = layer_span(_top_layers(pair, "overlap_input", labels))
    times = f"{ratio:.1f}" if ratio < 10 else f"{ratio:.0f}"
    text = (f"Tasks {a} and {b} {share} (overlap {fmt(pair['overlap_input'], 2)}, "
            f"{times}× chance, highest at {where}; output side "
            f"{fmt(pair['overlap_output'], 2)})")
    if _finite(pair["opposed_ratio"]):
        text += (f", and the update of {b} opposes that of {a} on "
                 f"{_percent(pair['opposed_ratio'])} of its norm (unrelated signs: "
                 f"{_percent(CHANCE_OPPOSED)})")
    if _finite(pair["cosine"]) and abs(pair["cosine"]) >= COSINE_NOTABLE:
        turn = "partly undoes" if pair["cosine"] < 0 else "partly repeats"
        text += f"; cosine {fmt(pair['cosine'], 2)}: {b} {turn} {a}"
    return text + "."


def advice(pair: dict) -> str:
    """What to change, given how the most interfering consecutive pair interferes."""
    ratio = pair["overlap_input"] / pair["chance_overlap_input"]
    conflicting = (_finite(pair["opposed_ratio"])
                   and pair["opposed_ratio"] >= CHANCE_OPPOSED + OPPOSED_MARGIN) \
        or (_finite(pair["cosine"]) and pair["cosine"] <= -COSINE_NOTABLE)
    if ratio >= SHARED_OVERLAP and conflicting:
        return ("The later task rewrites the directions the earlier one used, against it: an "
                "orthogonal strategy (ortho_init, olora) or a lower rank should forget less "
                "here.")
    if ratio >= SHARED_OVERLAP:
        return ("The updates share directions but oppose each other no more than unrelated "
                "updates would: seed 003's conflict does not show in the weights here. Separate "
                "adapters (merge_reinit; ortho_init and olora also keep them orthogonal) remove "
                "the sharing; a bench shows whether that forgets less.")
    if ratio < LOW_OVERLAP:
        return ("The adapters barely share directions, so conflicts between them do not explain "
                "what is forgotten: look at the upstream drift (CKA) and at the heads; replay "
                "or lwf act on those.")
    return ("Some sharing: an orthogonal strategy (ortho_init, olora) or a lower rank would "
            "reduce it; a bench shows whether that forgets less.")


def run_verdict(diagnosis: dict) -> list[str]:
    """The run's verdict: the stage that forgot, its pair of updates, what to change, the
    layers that moved, the upstream drift."""
    lines = []
    retrained = diagnosis["task_vectors"]["definition"] == "retrained_difference"
    if retrained:
        lines.append("joint retrains a fresh adapter at every stage: its τ_t are differences "
                     "of independent adapters, so overlaps and oppositions here say how "
                     "retraining moved the model, not how tasks conflict.")
    pair, when = pair_to_describe(diagnosis)
    if pair is not None:
        # No advice for joint: its stage-to-stage changes are not updates stacked on each other.
        lines += [x for x in (when, pair_sentence(pair, diagnosis["layers"]),
                              "" if retrained else advice(pair)) if x]
    summary = diagnosis.get("summary") or {}
    top = summary.get("top_moving_layers")
    if top:
        moved = ", ".join(f"{x['layer']} ({x['relative_norm']:.3f})" for x in top)
        lines.append(f"Layers that moved most (‖τ_t‖/‖W0‖, mean over tasks): {moved}; a lower "
                     "rank or adapting fewer layers (lora.layers) bounds how far they go "
                     "(seed 002).")
    drift = diagnosis.get("drift") or {}
    if drift.get("cka"):
        lines.append(drift_sentence(drift, (diagnosis.get("metrics") or {})
                                    .get("upstream_retention")))
    forgetting = (diagnosis.get("metrics") or {}).get("forgetting")
    if _finite(forgetting):
        lines.append(f"Forgetting of this run: {fmt(forgetting)}.")
    return lines


def drift_sentence(drift: dict, retention) -> str:
    """Where the upstream representation moved, after the last task."""
    last, layers = drift["cka"][-1], drift["layers"]
    lowest = min(range(len(last)), key=lambda k: last[k])
    text = (f"Upstream representation after the last task: CKA with the base {fmt(last[0])} "
            f"at layer {layers[0]}, {fmt(last[-1])} at the last layer")
    if lowest != len(last) - 1:
        text += f", lowest {fmt(last[lowest])} at layer {layers[lowest]}"
    text += " (1: unchanged)"
    if _finite(retention):
        text += f"; upstream retention {fmt(retention)}"
    return text + "."


def _ordered(rows: list[dict], key: str) -> str:
    ranked = sorted((r for r in rows if _finite(r.get(key))), key=lambda r: r[key])
    return ", ".join(f"{r['label']} {fmt(r[key])}" for r in ranked)


COMPARED_TITLES = {"opposed_ratio_consecutive": "mean opposed ratio",
                   "cosine_consecutive": "mean cosine",
                   "overlap_input_consecutive": "mean input overlap",
                   "overlap_output_consecutive": "mean output overlap"}


def bench_verdict(diagnosis: dict) -> list[str]:
    """Do the runs that forget less interfere less (seed 003's account)? Orderings and rank
    correlations over the sequentially trained runs, with the spread of each number across
    runs and how many runs they rest on."""
    rows = [r for r in diagnosis["runs"] if r["strategy"] != "joint"]
    corr = diagnosis["correlations"]
    if not any(_finite(r.get("forgetting")) for r in rows):
        return ["No finished sequential run with a forgetting score: nothing to compare."]
    lines = ["Forgetting, lowest first: " + _ordered(rows, "forgetting") + "."]
    for key, title in COMPARED_TITLES.items():
        lines.append(f"{title[0].upper() + title[1:]} between consecutive tasks, lowest first: "
                     + _ordered(rows, key) + ".")
    if corr["n"] < 3:
        lines.append(f"Only {corr['n']} sequentially trained run(s): too few to compare "
                     "orderings.")
        return lines
    groups: dict[str, list[str]] = {"agree": [], "weak": [], "against": []}
    for key, title in COMPARED_TITLES.items():
        rho = corr.get(key)
        values = [r[key] for r in rows if _finite(r.get(key))]
        if rho is None or not values:
            continue
        spread = max(values) - min(values)
        text = f"{title} (ρ = {rho:+.2f}" if _finite(rho) else f"{title} (ρ undefined"
        text += f", spread {spread:.3f}"
        text += ": no real difference)" if spread < TIE_TOLERANCE else ")"
        # Less interference is a lower opposed ratio and overlap, but a higher cosine.
        along = -rho if key == "cosine_consecutive" else rho
        if spread < TIE_TOLERANCE or not _finite(rho) or abs(rho) < CLEAR_RHO:
            groups["weak"].append(text)
        else:
            groups["agree" if along > 0 else "against"].append(text)
    titles = {"agree": "As seed 003 argues, the runs that forget less interfere less by: ",
              "weak": "No clear relation with: ",
              "against": "Against seed 003's account (less forgetting with more interference): "}
    lines += [titles[g] + "; ".join(items) + "." for g, items in groups.items() if items]
    lines.append(f"ρ: Spearman rank correlation with forgetting over {corr['n']} runs and "
                 f"{corr['forgetting_levels']} distinct levels of forgetting (values within "
                 f"{corr['tie_tolerance']} ranked as ties; cosine: negative when the runs that "
                 "forget less undo each other less): an observation about this bench, not a "
                 "test.")
    return lines
