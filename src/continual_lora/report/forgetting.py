"""Which classes a run forgot, and whether they were the ones close to the new task (seed 002's
Figures 3 and 4), read from a finished classifier run's `predictions.npz`.

* **Per-class forgetting**: after each task t, every class of what the model knew before (the
  upstream probe's classes when the probe has classes, else the classes of the tasks before t)
  with its accuracy before and after task t, and the number of its held-out examples that
  went from right to wrong ("forgotten") during task t. What task t itself did is what can be
  set against task t's domain; `cumulative` compares with when the class was learned instead
  (for the upstream classes: the base model), which after one task is the same thing.
* **Contextual forgetting**: where class names are WordNet nouns, each old class's Wu-Palmer
  similarity to task t's domain (by default the mean over task t's own class names; or a word
  given per task, as seed 002 compares ImageNet classes with "car"). Seed 002's comparison is
  the similarity distribution of all classes (one weight per held-out image) against that of
  the forgotten images: if forgetting is contextual, the forgotten images sit at higher
  similarity. Also given: the two weighted means, and the Spearman correlation over classes
  between similarity and accuracy drop.

A class name is looked up as a noun lemma of the packaged WordNet (spaces as underscores;
ImageNet-style labels "tench, Tinca tinca" try each comma-separated name; a synset id such as
`n02084071` is taken as is). The packaged WordNet keeps no sense ranking, so a sense is chosen
in two steps: senses whose first lemma is the name (its head word: "bird" the animal rather
than "shuttlecock, bird", "two" the number rather than the playing card), then, among those,
the one in the lexicographer file most common among all the names' senses (animals →
noun.animal, digits → noun.quantity: "bear" is the animal, not the investor); ties go to
WordNet's file order.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from continual_lora import metrics
from continual_lora.report.plotting import pyplot, save_png

SYNSET_ID = re.compile(r"^[nv]\d{8}$")


@dataclass
class ClassDrop:
    name: str
    before: float
    after: float
    drop: float
    examples: int
    forgotten: int  # held-out examples right when learned, wrong after


@dataclass
class StageForgetting:
    """The old classes' forgetting after task `stage` (named `task`)."""

    stage: int
    task: str
    source: str  # "upstream" or "earlier tasks"
    classes: list[ClassDrop]


@dataclass
class ContextualStage:
    stage: int
    task: str
    domain: list[str]
    #: (class, similarity to the domain, drop, examples, forgotten), classes with a synset
    classes: list[tuple[str, float, float, int, int]] = field(default_factory=list)
    similarity_all: float = float("nan")  # mean over held-out examples
    similarity_forgotten: float = float("nan")  # mean over forgotten examples
    spearman: float = float("nan")  # over classes: similarity vs accuracy drop
    unresolved: list[str] = field(default_factory=list)


def load_predictions(run_dir: Path) -> dict[str, np.ndarray]:
    path = Path(run_dir) / "predictions.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished run folder?")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _task_names(pred: dict[str, np.ndarray]) -> list[str]:
    """Task names in stage order (from the `labels/<task>` keys, in the order written)."""
    return [k.removeprefix("labels/") for k in pred if k.startswith("labels/")
            and k != "labels/upstream"]


def _stages(pred: dict[str, np.ndarray]) -> int:
    return max(int(k.split("/")[1].removeprefix("stage")) for k in pred
               if k.startswith("correct/"))


def _drops(labels, before, after, names) -> list[ClassDrop]:
    rows = metrics.per_class_forgetting(labels, before, after, names)
    lab, b, a = np.asarray(labels), np.asarray(before, bool), np.asarray(after, bool)
    out = []
    for name, acc_b, acc_a, drop in rows:
        c = list(names).index(name)
        mask = lab == c
        out.append(ClassDrop(name, acc_b, acc_a, drop, int(mask.sum()),
                             int((mask & b & ~a).sum())))
    return out


def class_forgetting(pred: dict[str, np.ndarray],
                     cumulative: bool = False) -> list[StageForgetting]:
    """Per-class forgetting after every task t (see the module docstring): by default what
    task t itself made the model forget (stage t-1 → t), else, with `cumulative`, everything
    lost since the class was learned (the upstream classes: since stage 0)."""
    tasks = _task_names(pred)
    out = []
    for t in range(1, _stages(pred) + 1):
        if "labels/upstream" in pred and f"correct/stage{t}/upstream" in pred:
            names = [str(x) for x in pred["classes/upstream"]]
            start = 0 if cumulative else t - 1
            out.append(StageForgetting(t, tasks[t - 1], "upstream", _drops(
                pred["labels/upstream"], pred[f"correct/stage{start}/upstream"],
                pred[f"correct/stage{t}/upstream"], names)))
            continue
        rows: list[ClassDrop] = []
        for i, name in enumerate(tasks[: t - 1], start=1):
            if f"classes/{name}" not in pred:
                continue
            classes = [f"{name}/{c}" for c in pred[f"classes/{name}"]]
            start = i if cumulative else t - 1
            rows += _drops(pred[f"labels/{name}"], pred[f"correct/stage{start}/{name}"],
                           pred[f"correct/stage{t}/{name}"], classes)
        rows.sort(key=lambda r: (-r.drop, r.name))
        out.append(StageForgetting(t, tasks[t - 1], "earlier tasks", rows))
    return out


# --------------------------------------------------------------------------------------------
# WordNet


def _candidates(name: str, by_lemma: dict[str, list]) -> list:
    """A name's noun senses; those where it is the synset's first lemma (its head word: "bird"
    the animal, not "shuttlecock, bird") when there are any."""
    found = []
    for part in name.split(","):
        key = part.strip().lower().replace(" ", "_")
        found += by_lemma.get(key, [])
    heads = [s for s in found if s.lemmas[0].lower() in
             {p.strip().lower().replace(" ", "_") for p in name.split(",")}]
    return heads or found


@functools.lru_cache(maxsize=1)
def _noun_index() -> tuple[frozenset[str], dict[str, list]]:
    """(every synset id, lower-case lemma → its noun synsets in file order), built once."""
    from continual_lora.data.wordnet import load_wordnet

    synsets = load_wordnet()
    by_lemma: dict[str, list] = {}
    for s in synsets:
        if s.synset.startswith("n"):
            for lemma in s.lemmas:
                by_lemma.setdefault(lemma.lower(), []).append(s)
    return frozenset(s.synset for s in synsets), by_lemma


def resolve_synsets(names: list[str]) -> dict[str, str | None]:
    """Each name's noun synset id (or None): see the module docstring for the choice."""
    ids, by_lemma = _noun_index()
    bare = {n: n.split("/")[-1] for n in names}  # "task/class" → "class"
    found = {n: _candidates(bare[n], by_lemma) for n in names}
    votes = Counter(lex for n in names for lex in {s.lexname for s in found[n]})
    out: dict[str, str | None] = {}
    for n in names:
        if SYNSET_ID.match(bare[n]) and bare[n] in ids:
            out[n] = bare[n]
        else:  # max() keeps the first of equal votes, i.e. WordNet's order
            out[n] = max(found[n], key=lambda s: votes[s.lexname]).synset if found[n] else None
    return out


def contextual_forgetting(pred: dict[str, np.ndarray],
                          domains: dict[str, list[str]] | None = None,
                          cumulative: bool = False) -> list[ContextualStage]:
    """Similarity of the old classes to each task's domain against what that task made them
    forget (`cumulative`: everything lost since they were learned)."""
    from scipy.stats import spearmanr

    from continual_lora.data.wordnet import index_by_id, load_wordnet, wu_palmer

    by_id = index_by_id(load_wordnet())
    stages = class_forgetting(pred, cumulative)
    out = []
    for stage in stages:
        domain = (domains or {}).get(stage.task)
        if domain is None:
            key = f"classes/{stage.task}"
            domain = [str(c) for c in pred[key]] if key in pred else []
        old = [c.name for c in stage.classes]
        synsets = resolve_synsets(old + domain)
        domain_ids = [synsets[d] for d in domain if synsets[d]]
        result = ContextualStage(stage.stage, stage.task, domain,
                                 unresolved=[n for n in old + domain if not synsets[n]])
        out.append(result)
        if not domain_ids:
            continue
        for c in stage.classes:
            if synsets[c.name]:
                sim = float(np.mean([wu_palmer(synsets[c.name], d, by_id) for d in domain_ids]))
                result.classes.append((c.name, sim, c.drop, c.examples, c.forgotten))
        if len(result.classes) < 2:
            continue
        sims = np.array([r[1] for r in result.classes])
        examples = np.array([r[3] for r in result.classes], dtype=float)
        forgotten = np.array([r[4] for r in result.classes], dtype=float)
        result.similarity_all = float(np.average(sims, weights=examples))
        if forgotten.sum() > 0:
            result.similarity_forgotten = float(np.average(sims, weights=forgotten))
        drops = np.array([r[2] for r in result.classes])
        if np.ptp(sims) > 0 and np.ptp(drops) > 0:
            result.spearman = float(spearmanr(sims, drops).statistic)
    return out


# --------------------------------------------------------------------------------------------
# Figures (PNG, matplotlib's Agg backend: no display needed)


def plot_class_forgetting(stages: list[StageForgetting], path: Path, top: int = 20,
                          title: str = "") -> Path:
    """One panel per task: the `top` old classes that lost the most accuracy after it
    (seed 002's Figure 3), bars of the accuracy drop, labelled with forgotten/total."""
    plt = pyplot()
    # A first task with nothing learned before it (no upstream classes) has nothing to forget:
    # no empty panel for it.
    stages = [s for s in stages if s.classes] or stages[:1]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 0.28 * top + 1.6),
                             squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        rows = stage.classes[:top][::-1]  # largest drop on top
        names = [r.name for r in rows]
        drops = [100 * r.drop for r in rows]
        colors = ["#c0392b" if d > 0 else "#7f8c8d" for d in drops]
        ax.barh(names, drops, color=colors)
        for y, r in enumerate(rows):
            ax.annotate(f"{r.forgotten}/{r.examples}", (max(100 * r.drop, 0), y),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.axvline(0, color="black", lw=0.6)
        ax.set_title(f"task {stage.stage}: {stage.task}", fontsize=9)
        ax.set_xlabel(f"accuracy drop of {stage.source} classes (points)", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def plot_contextual(stages: list[ContextualStage], path: Path, title: str = "") -> Path:
    """One panel per task: the Wu-Palmer similarity to the task's domain of all old classes'
    held-out examples against that of the forgotten ones (seed 002's Figure 4), with each
    class as a point (similarity, accuracy drop) and the two weighted means."""
    plt = pyplot()
    usable = [s for s in stages if len(s.classes) >= 2]
    fig, axes = plt.subplots(2, max(1, len(usable)), figsize=(4.2 * max(1, len(usable)), 6.4),
                             squeeze=False)
    bins = np.linspace(0, 1, 21)
    for col, stage in enumerate(usable):
        sims = np.array([r[1] for r in stage.classes])
        examples = np.array([r[3] for r in stage.classes], dtype=float)
        forgotten = np.array([r[4] for r in stage.classes], dtype=float)
        top, bottom = axes[0][col], axes[1][col]
        top.hist(sims, bins=bins, weights=examples / examples.sum(), alpha=0.5,
                 label="all held-out images", color="#2c3e50")
        if forgotten.sum() > 0:
            top.hist(sims, bins=bins, weights=forgotten / forgotten.sum(), alpha=0.6,
                     label="forgotten images", color="#c0392b")
            top.axvline(stage.similarity_forgotten, color="#c0392b", ls="--", lw=1)
        top.axvline(stage.similarity_all, color="#2c3e50", ls="--", lw=1)
        domain = ", ".join(stage.domain[:4]) + (" ..." if len(stage.domain) > 4 else "")
        top.set_title(f"after {stage.task}: similarity to {domain}", fontsize=8)
        top.set_xlabel("Wu-Palmer similarity", fontsize=8)
        top.set_ylabel("share", fontsize=8)
        top.legend(fontsize=7)
        bottom.scatter(sims, [100 * r[2] for r in stage.classes], color="#2c3e50", s=14)
        for r in stage.classes:
            bottom.annotate(r[0].split("/")[-1], (r[1], 100 * r[2]), fontsize=6,
                            xytext=(2, 2), textcoords="offset points")
        bottom.axhline(0, color="black", lw=0.6)
        bottom.set_xlabel("Wu-Palmer similarity to the task's domain", fontsize=8)
        bottom.set_ylabel("accuracy drop (points)", fontsize=8)
        bottom.set_title(f"Spearman ρ = {stage.spearman:.2f}", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
    if not usable:
        axes[0][0].text(0.5, 0.5, "no class names found in WordNet", ha="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------
# A run folder's forgetting report


FIGURES = "figures"


def _finished_runs(folder: Path) -> list[Path]:
    """`folder` itself when it is a run folder, else the run folders of a bench."""
    if (folder / "predictions.npz").is_file():
        return [folder]
    runs = sorted(p.parent for p in folder.glob("runs/*/predictions.npz"))
    if not runs:
        raise FileNotFoundError(f"{folder} holds no finished run (no predictions.npz in it or "
                                "in runs/*/): give a run or bench folder")
    return runs


def forgetting_report(run_dir: Path, top: int = 20,
                      domains: dict[str, list[str]] | None = None,
                      cumulative: bool = False) -> dict:
    """Write `figures/class_forgetting.png`, `figures/contextual_forgetting.png` (when class
    names are WordNet nouns) and `figures/forgetting.json` into a run folder; returns the
    numbers."""
    import json

    from continual_lora.checkpoint import write_json_atomic

    run_dir = Path(run_dir)
    pred = load_predictions(run_dir)
    if not any(k.startswith("classes/") for k in pred):
        raise ValueError(f"{run_dir}: predictions.npz has no class names (a causal LM or "
                         "diffusion run, or a run made before they were saved): per-class "
                         "forgetting needs a classifier run")
    label = run_dir.name
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        label = f"{m.get('label', label)}" + (f", rank {m['rank']}" if m.get("rank") else "")
    stages = class_forgetting(pred, cumulative)
    contextual = contextual_forgetting(pred, domains, cumulative)
    out = run_dir / FIGURES
    out.mkdir(exist_ok=True)
    label += " (cumulative)" if cumulative else ""
    files = [plot_class_forgetting(stages, out / "class_forgetting.png", top, label)]
    if any(len(s.classes) >= 2 for s in contextual):
        files.append(plot_contextual(contextual, out / "contextual_forgetting.png", label))
    numbers = {
        "cumulative": cumulative,
        "class_forgetting": [{"stage": s.stage, "task": s.task, "source": s.source,
                              "classes": [vars(c) for c in s.classes]} for s in stages],
        "contextual": [{"stage": c.stage, "task": c.task, "domain": c.domain,
                        "similarity_all": c.similarity_all,
                        "similarity_forgotten": c.similarity_forgotten,
                        "spearman": c.spearman, "unresolved": c.unresolved,
                        "classes": [dict(zip(("name", "similarity", "drop", "examples",
                                              "forgotten"), r, strict=True))
                                    for r in c.classes]} for c in contextual],
        "figures": [str(f.relative_to(run_dir)) for f in files],
    }
    write_json_atomic(out / "forgetting.json", numbers)
    return numbers


def format_forgetting(numbers: dict, top: int = 5) -> str:
    lines = []
    for stage, ctx in zip(numbers["class_forgetting"], numbers["contextual"], strict=True):
        worst = ", ".join(f"{c['name']} {100 * c['drop']:+.0f}" for c in stage["classes"][:top])
        lines.append(f"{'after' if numbers['cumulative'] else 'during'} task {stage['stage']} "
                     f"({stage['task']}): most forgotten "
                     f"{stage['source']} classes (accuracy drop, points): {worst}")
        if ctx["classes"]:
            lines.append(f"  Wu-Palmer similarity to {', '.join(ctx['domain'][:4])}: all "
                         f"{ctx['similarity_all']:.3f}, forgotten "
                         f"{ctx['similarity_forgotten']:.3f}, Spearman(similarity, drop) "
                         f"{ctx['spearman']:.2f}")
    lines.append("figures: " + ", ".join(numbers["figures"]))
    return "\n".join(lines)
